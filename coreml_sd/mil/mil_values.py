"""MIL element types and immediate values, between the compiled text (`model.mil`) and the proto.

An ML program proto (coremltools' `MIL.proto`) stores a constant's elements in one field of
`TensorValue` chosen by its type: fp32 in `floats`, fp64 in `doubles`, int32/int16/uint16 in
`ints`, int64/uint64 in `longInts`, bool in `bools`, string in `strings`, and fp16, int8, uint8,
uint32 and the sub-byte types (int4, uint1/2/3/4/6) as raw little-endian `bytes`, sub-byte values
packed LSB first (coremltools 9.0 `converters/mil/backend/mil/helper.py` `_tensor_field_by_type`,
`IMMEDIATE_VALUE_TYPES_IN_BYTES`, `optimize/_utils.py` `pack_elements_into_bits`). The text
writes elements as numbers: integers in decimal, floats as C99 hex floats with the shortest
mantissa (`fp16(0x1p-17)`, `fp32(0x1.921fb6p+1)`, `-0x1.4p+3`, `0x0p+0`: seen in compiled
model.mil files quoted by community tools), bools as `true`/`false`, strings in double quotes.

Element type names in the text: `fp16 fp32 int32 int8 uint8 uint1 int4 bool string uint64` are seen
in compiled files and coremltools' tests; the others follow coremltools' own type names
(`types.builtin_to_string`). Proto enum numbers are MIL.proto's `DataType` (checked against
coremltools' generated module by the tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ElementType:
    name: str  # as the text writes it
    proto: int  # MIL.proto DataType
    field: str  # TensorValue field holding immediate values
    numpy: type | None  # numpy type of one element (strings: None)
    bits: int

    @property
    def is_float(self) -> bool:
        return self.name.startswith("fp")

    @property
    def is_sub_byte(self) -> bool:
        return self.bits < 8 and self.name != "bool"


ELEMENT_TYPES = {t.name: t for t in (
    ElementType("bool", 1, "bools", np.bool_, 8),
    ElementType("string", 2, "strings", None, 0),
    ElementType("fp16", 10, "bytes", np.float16, 16),
    ElementType("fp32", 11, "floats", np.float32, 32),
    ElementType("fp64", 12, "doubles", np.float64, 64),
    ElementType("int8", 21, "bytes", np.int8, 8),
    ElementType("int16", 22, "ints", np.int16, 16),
    ElementType("int32", 23, "ints", np.int32, 32),
    ElementType("int64", 24, "longInts", np.int64, 64),
    ElementType("int4", 25, "bytes", np.int8, 4),
    ElementType("uint8", 31, "bytes", np.uint8, 8),
    ElementType("uint16", 32, "ints", np.uint16, 16),
    ElementType("uint32", 33, "bytes", np.uint32, 32),
    ElementType("uint64", 34, "longInts", np.uint64, 64),
    ElementType("uint4", 35, "bytes", np.uint8, 4),
    ElementType("uint2", 36, "bytes", np.uint8, 2),
    ElementType("uint1", 37, "bytes", np.uint8, 1),
    ElementType("uint6", 38, "bytes", np.uint8, 6),
    ElementType("uint3", 39, "bytes", np.uint8, 3),
)}
BY_PROTO = {t.proto: t for t in ELEMENT_TYPES.values()}


def set_elements(tensor_value, etype: ElementType, values: list) -> None:
    """Store python `values` (in element order) into a proto TensorValue as the loader reads them."""
    target = getattr(tensor_value, etype.field)
    target.SetInParent()
    if etype.field != "bytes":
        target.values.extend(values)
    elif etype.is_sub_byte:
        target.values = _pack_bits(np.asarray(values, dtype=etype.numpy), etype.bits)
    else:
        target.values = np.asarray(values, dtype=etype.numpy).astype(np.dtype(etype.numpy).newbyteorder("<")).tobytes()


def get_elements(tensor_value, etype: ElementType, count: int) -> list:
    """The elements of a proto TensorValue as python values (`count`: number of elements)."""
    field = tensor_value.WhichOneof("value")
    if field != etype.field:
        raise ValueError(f"a {etype.name} value is stored in {field!r}; expected {etype.field!r}")
    raw = getattr(tensor_value, field).values
    if field != "bytes":
        return list(raw)
    if etype.is_sub_byte:
        return _unpack_bits(raw, etype, count).tolist()
    return np.frombuffer(raw, dtype=np.dtype(etype.numpy).newbyteorder("<")).tolist()


def _pack_bits(values: np.ndarray, bits: int) -> bytes:
    from coremltools.optimize._utils import pack_elements_into_bits

    return pack_elements_into_bits(values, bits).tobytes() if values.size else b""


def _unpack_bits(raw: bytes, etype: ElementType, count: int) -> np.ndarray:
    from coremltools.optimize._utils import restore_elements_from_packed_bits

    if count == 0:
        return np.zeros(0, dtype=etype.numpy)
    packed = np.frombuffer(raw, dtype=np.uint8)
    return restore_elements_from_packed_bits(packed, etype.bits, count, etype.name.startswith("int"))


def format_element(etype: ElementType, value) -> str:
    """One element as the text writes it."""
    if etype.name == "bool":
        return "true" if value else "false"
    if etype.name == "string":
        return quote(value)
    if etype.is_float:
        return format_float(float(value))
    return str(int(value))


def format_float(value: float) -> str:
    """C99 `%a` style: the shortest exact hex mantissa (`0x1.8p+1`, `0x1p-17`, `0x0p+0`)."""
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    mantissa, exponent = value.hex().split("p")
    if "." in mantissa:
        mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}p{exponent}"


def parse_float(text: str) -> float:
    """A float element: hex (`0x1.8p+1`), decimal, `inf`/`nan` with an optional sign."""
    body = text.lstrip("+-")
    if body.lower().startswith("0x"):
        return float.fromhex(text)
    return float(text)


def quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def unquote(token: str) -> str:
    """The string a double-quoted token spells (escapes: \\\\, \\", \\n, \\t)."""
    out, chars, i = [], token[1:-1], 0
    while i < len(chars):
        ch = chars[i]
        if ch == "\\" and i + 1 < len(chars):
            i += 1
            ch = {"n": "\n", "t": "\t"}.get(chars[i], chars[i])
        out.append(ch)
        i += 1
    return "".join(out)


def check_range(etype: ElementType, value: int) -> bool:
    """Whether the integer `value` fits the element type."""
    if etype.is_sub_byte:
        signed = etype.name.startswith("int")
        low, high = (-(1 << (etype.bits - 1)), (1 << (etype.bits - 1)) - 1) if signed else (0, (1 << etype.bits) - 1)
        return low <= value <= high
    info = np.iinfo(etype.numpy)
    return int(info.min) <= value <= int(info.max)


# Function opsets: the proto names them CoreML5..CoreML9 (coremltools `_OPSET`), the text `ios15`...
OPSET_TEXT = {"CoreML5": "ios15", "CoreML6": "ios16", "CoreML7": "ios17", "CoreML8": "ios18", "CoreML9": "ios26"}
OPSET_PROTO = {v: k for k, v in OPSET_TEXT.items()}
# Core ML specification version of each opset (coremltools `_OPSET`: iOS15 = 6 ... iOS26 = 10).
OPSET_SPEC_VERSION = {"CoreML5": 6, "CoreML6": 7, "CoreML7": 8, "CoreML8": 9, "CoreML9": 10}
