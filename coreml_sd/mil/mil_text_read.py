"""Reading the compiled text of an ML program (`model.mil` in a `.mlmodelc`) into its MIL proto.

The text is a printout of the same program a package stores as a proto (coremltools' `MIL.proto`):
one line per op, `outputs = type(inputs)[attributes];`. Parsing it back into that proto lets the
package path's loader (coremltools' milproto reader) and the mil executor run it unchanged.

Grammar accepted (what the sources below show; whitespace and `//` comments are free):

    program(1.0)                                      version: 1.x (1.0 iOS15-17, 1.3 iOS18)
    [buildInfo = dict<string, string>({{"k", "v"}})]  optional program attributes
    {
      func main<ios16>(tensor<fp16, [2, 4, 64, 64]> sample, ...) {    opset ios15..ios18 (or CoreML5..8)
        tensor<int32, []> var_5 = const()[name = tensor<string, []>("op_5"), val = tensor<int32, []>(1)];
        int32 var_6 = const()[name = string("op_6"), val = int32(1)];             iOS18 scalar style
        tensor<fp16, [320, 4, 3, 3]> w = const()[name = string("w"), val = tensor<fp16, [320, 4, 3, 3]>(
            BLOBFILE(path = string("@model_path/weights/weight.bin"), offset = uint64(64)))];
        tensor<fp16, [2, 8]> a, tensor<fp16, [2, 8]> b = split(axis = var_5, x = x)[name = string("s")];
        tensor<fp16, [2, 16]> c = concat(axis = var_5, interleave = f, values = (a, b))[name = string("c")];
        tensor<fp16, [2, 1]> m = reduce_mean(axes = axes, keep_dims = bool(true), x = c);
      } -> (m);
    }

* Types: `tensor<T, [d, ...]>` (`?` or a symbol for an unknown size), scalars `T` or
  `tensor<T, []>`, `state<tensor<...>>`, `dict<K, V>`; element types in `mil_values.py`.
* Input bindings: a var name, a literal `T(...)` / `tensor<...>(...)` (tensor elements in `[...]`,
  nested lists flattened, a lone element for a one-element tensor), or `(b1, b2, ...)` for the
  ops taking several values. Multiple outputs are listed with commas, with or without parentheses.
  `[attributes]` (the op's `name`; `val` of a const; the iOS16 constexpr parameters) is optional.
* Not supported (an error says so): nested blocks (control flow ops), list values.

Sources (read to learn the syntax; nothing copied): coremltools 9.0's tests that read the
compiler's output (`test/blob/test_weights.py` TestWeightIDSharing: iOS16 vs iOS18 scalar styles and
BLOBFILE offsets; `test/ml_program/test_utils.py` for iOS17/iOS18; `converters/mil/backend/mil/
test_load.py`: BLOBFILE inputs of iOS18 constexpr ops), and compiled `model.mil` lines quoted or
patched by community projects (found by code search for `BLOBFILE(path`, `coremlc-version`,
`= concat(axis`): `program(1.0)`/`program(1.3)` headers with buildInfo, `func main<ios16>` and
`<ios18>`, hex floats, `values = (a, b)`, multi-output `split`, ops without `[name = ...]`.
"""

from __future__ import annotations

import bisect
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from coreml_sd.errors import ModelError, choices_text
from coreml_sd.mil.mil_values import (BY_PROTO, ELEMENT_TYPES, OPSET_PROTO, OPSET_SPEC_VERSION, ElementType,
                                      check_range, parse_float, set_elements, unquote)

_TOKEN = re.compile(r"""
    (?P<skip>\s+|//[^\n]*)
  | (?P<arrow>->)
  | (?P<number>[-+]?(?:0[xX][0-9A-Fa-f]*(?:\.[0-9A-Fa-f]*)?[pP][-+]?\d+|(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?))
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<string>"(?:[^"\\\n]|\\.)*")
  | (?P<punct>[()\[\]{}<>,=;?\-])
  | (?P<bad>.)
""", re.X | re.S)
_INTEGER = re.compile(r"[-+]?\d+")
_EOF = ("eof", "", -1)
MODEL_PATH = "@model_path/"


@dataclass(frozen=True)
class TextBlob:
    """A BLOBFILE reference: path inside the model folder, metadata offset, type, count, line."""

    path: str
    offset: int
    dtype: str
    count: int | None
    line: int


@dataclass
class ParsedText:
    program: object  # coremltools.proto.MIL_pb2.Program
    version: str  # "1.0", "1.3"
    specification_version: int  # implied by the newest function opset
    ops: list[tuple[int, str, str]] = field(default_factory=list)  # (line, op type, first output)
    blobs: list[TextBlob] = field(default_factory=list)


def parse_program_text(text: str, *, file: str = "model.mil", into=None) -> ParsedText:
    """Parse compiled MIL text; ModelError `file:line:col: expected ..., found ...` on bad input.

    `into`: an empty MIL_pb2.Program to fill (e.g. a Model spec's `mlProgram`: no copy).
    """
    return _Parser(text, file, into).program()


class _Parser:
    def __init__(self, text: str, file: str, into=None):
        from coremltools.proto import MIL_pb2

        self.pb = MIL_pb2
        self.file = file
        self.text = text
        self.newlines = [m.start() for m in re.finditer("\n", text)]
        self.tokens = self._scan()
        self.tok = next(self.tokens, _EOF)
        self.ahead = next(self.tokens, _EOF)
        self.result = ParsedText(MIL_pb2.Program() if into is None else into, "", 0)

    # -- tokens ---------------------------------------------------------------------------
    def _scan(self):
        for m in _TOKEN.finditer(self.text):
            kind = m.lastgroup
            if kind == "skip":
                continue
            if kind == "bad":
                self.pos_error(m.start(), f"unexpected character {m.group()!r}")
            yield kind, m.group(), m.start()

    def advance(self) -> tuple:
        tok, self.tok, self.ahead = self.tok, self.ahead, next(self.tokens, _EOF)
        return tok

    def line(self, pos: int | None = None) -> int:
        pos = self.tok[2] if pos is None else pos
        return (bisect.bisect_left(self.newlines, pos) + 1) if pos >= 0 else len(self.newlines) + 1

    def pos_error(self, pos: int, message: str):
        column = pos - (self.newlines[self.line(pos) - 2] if self.line(pos) > 1 else -1) if pos >= 0 else 1
        raise ModelError(f"{self.file}:{self.line(pos)}:{column}: {message}")

    def error(self, expected: str):
        found = "end of file" if self.tok[0] == "eof" else repr(self.tok[1])
        self.pos_error(self.tok[2], f"expected {expected}, found {found}")

    def at(self, text: str) -> bool:
        return self.tok[1] == text and self.tok[0] in ("punct", "arrow", "name")

    def accept(self, text: str) -> bool:
        if self.at(text):
            self.advance()
            return True
        return False

    def expect(self, text: str, expected: str | None = None) -> None:
        if not self.accept(text):
            self.error(expected or repr(text))

    def name(self, expected: str) -> str:
        if self.tok[0] != "name":
            self.error(expected)
        return self.advance()[1]

    def comma_list(self, close: str, item, expected: str) -> None:
        """item() for each entry of a comma-separated list ended by `close` (consumed)."""
        if self.accept(close):
            return
        while True:
            item()
            if self.accept(close):
                return
            self.expect(",", f"',' or {close!r} after {expected}")

    # -- program and functions ------------------------------------------------------------
    def program(self) -> ParsedText:
        self.expect("program", "'program(1.x)' at the start of the program text")
        self.expect("(")
        if self.tok[0] != "number" or not re.fullmatch(r"1(\.\d+)?", self.tok[1]):
            self.error("a program version 1.x")
        self.result.version = self.advance()[1]
        self.result.program.version = 1
        self.expect(")")
        if self.accept("["):
            self.comma_list("]", lambda: self.attribute(self.result.program.attributes), "a program attribute")
        self.expect("{", "'{' opening the program's functions")
        while not self.accept("}"):
            self.function()
        if self.tok[0] != "eof":
            self.error("end of file after the program's closing '}'")
        return self.result

    def function(self) -> None:
        self.expect("func", "'func' or '}' closing the program")
        name = self.name("a function name")
        self.expect("<")
        opset_pos, opset_text = self.tok[2], self.name("an opset such as ios16")
        opset = opset_text if opset_text in OPSET_SPEC_VERSION else OPSET_PROTO.get(opset_text)
        if opset is None:
            self.pos_error(opset_pos, f"unknown opset {opset_text!r}; known: {choices_text(OPSET_PROTO)}")
        self.result.specification_version = max(self.result.specification_version, OPSET_SPEC_VERSION[opset])
        self.expect(">")
        function = self.result.program.functions[name]
        function.opset = opset
        scope: set[str] = set()
        self.expect("(")
        self.comma_list(")", lambda: self.parameter(function, scope), "a function input")
        block = function.block_specializations[opset]
        self.expect("{", "'{' opening the function body")
        while not self.accept("}"):
            self.statement(block, scope)
        self.expect("->", "'-> (outputs)' after the function body")
        self.expect("(")
        self.comma_list(")", lambda: block.outputs.append(self.reference(scope)), "a function output")
        self.expect(";")

    def parameter(self, function, scope: set) -> None:
        named = function.inputs.add()
        self.value_type(named.type)
        named.name = self.define(scope)

    def define(self, scope: set) -> str:
        pos, name = self.tok[2], self.name("a variable name")
        if name in scope:
            self.pos_error(pos, f"{name!r} is defined twice")
        scope.add(name)
        return name

    def reference(self, scope: set) -> str:
        pos, name = self.tok[2], self.name("a variable name")
        if name not in scope:
            self.pos_error(pos, f"{name!r} is not defined here (expected a function input or an earlier op's output)")
        return name

    # -- statements -----------------------------------------------------------------------
    def statement(self, block, scope: set) -> None:
        line = self.line()
        op = block.operations.add()
        parenthesized = self.accept("(")
        pending: list[tuple] = []
        while True:  # outputs are defined after the op, which may not read them
            out = op.outputs.add()
            self.value_type(out.type)
            pending.append((self.tok[2], self.name("an output variable name"), out))
            if not self.accept(","):
                break
        if parenthesized:
            self.expect(")")
        self.expect("=", "'=' after the op's outputs")
        op.type = self.name("an op type")
        self.expect("(")
        self.comma_list(")", lambda: self.op_input(op, scope), "an op input")
        if self.accept("["):
            self.comma_list("]", lambda: self.attribute(op.attributes), "an op attribute")
        if self.at("{"):
            self.error("';' (nested blocks of control-flow ops are not supported)")
        self.expect(";", "';' ending the op")
        for pos, name, out in pending:
            if name in scope:
                self.pos_error(pos, f"{name!r} is defined twice")
            scope.add(name)
            out.name = name
        self.result.ops.append((line, op.type, pending[0][1]))

    def op_input(self, op, scope: set) -> None:
        pos, key = self.tok[2], self.name("an input name")
        if key in op.inputs:
            self.pos_error(pos, f"input {key!r} is given twice")
        self.expect("=")
        argument = op.inputs[key]
        if self.accept("("):
            self.comma_list(")", lambda: self.binding(argument.arguments.add(), scope), "a value")
        else:
            self.binding(argument.arguments.add(), scope)

    def binding(self, binding, scope: set) -> None:
        if self.at_literal():
            self.value(binding.value)
        else:
            binding.name = self.reference(scope)

    def at_literal(self) -> bool:
        kind, text, _ = self.tok
        return kind == "name" and ((text in ("tensor", "dict", "state") and self.ahead[1] == "<")
                                   or (text in ELEMENT_TYPES and self.ahead[1] == "("))

    def attribute(self, attributes) -> None:
        key = self.name("an attribute name")
        self.expect("=")
        self.value(attributes[key])

    # -- types ----------------------------------------------------------------------------
    def value_type(self, value_type) -> None:
        """Parse a type into a proto ValueType."""
        pos, name = self.tok[2], self.name("a type (tensor<...>, a scalar type, state<...> or dict<...>)")
        if name in ELEMENT_TYPES:
            value_type.tensorType.dataType = ELEMENT_TYPES[name].proto
            value_type.tensorType.rank = 0
            return
        if name not in ("tensor", "state", "dict"):
            self.pos_error(pos, f"expected a type, found {name!r}; types: tensor<...>, state<...>, dict<...>, "
                                f"{choices_text(ELEMENT_TYPES)}")
        self.expect("<")
        if name == "state":
            self.value_type(value_type.stateType.wrappedType)
        elif name == "dict":
            self.value_type(value_type.dictionaryType.keyType)
            self.expect(",")
            self.value_type(value_type.dictionaryType.valueType)
        else:
            self.tensor_type(value_type.tensorType)
        self.expect(">", "'>' closing the type")

    def tensor_type(self, tensor) -> None:
        tensor.dataType = self.element_type().proto
        self.expect(",")
        self.expect("[", "'[' opening the shape")
        self.comma_list("]", lambda: self.dimension(tensor.dimensions.add()), "a dimension")
        tensor.rank = len(tensor.dimensions)

    def element_type(self) -> ElementType:
        pos, name = self.tok[2], self.name("an element type")
        if name not in ELEMENT_TYPES:
            self.pos_error(pos, f"unknown element type {name!r}; known: {choices_text(ELEMENT_TYPES)}")
        return ELEMENT_TYPES[name]

    def dimension(self, dim) -> None:
        kind, text, _ = self.tok
        if kind == "number" and _INTEGER.fullmatch(text) and int(text) >= 0:
            dim.constant.size = int(text)
        elif text == "?" or kind == "name":  # unknown size, or a symbol standing for one
            dim.unknown.variadic = False
        else:
            self.error("a dimension size, '?' or a symbol")
        self.advance()

    # -- values ---------------------------------------------------------------------------
    def value(self, value) -> None:
        """A typed literal `T(...)` into a proto Value (immediate or BLOBFILE)."""
        line = self.line()
        self.value_type(value.type)
        self.expect("(", "'(' opening the value")
        kind = value.type.WhichOneof("type")
        if self.at("BLOBFILE"):
            self.blob(value, line)
        elif kind == "dictionaryType":
            self.dictionary(value)
        elif kind == "tensorType":
            self.tensor_elements(value)
        else:
            self.error(f"a value of a tensor or dict type (values of {kind} are not supported)")
        self.expect(")", "')' closing the value")

    def tensor_elements(self, value) -> None:
        tensor_type = value.type.tensorType
        etype = BY_PROTO[tensor_type.dataType]
        count = _count(tensor_type)
        pos, elements = self.tok[2], []
        if self.at("["):
            self.element_list(etype, elements)
        else:
            elements.append(self.element(etype))
        if count is not None and len(elements) != count:
            self.pos_error(pos, f"expected {count} value(s) for a {etype.name} tensor of shape "
                                f"{[d.constant.size for d in tensor_type.dimensions]}, found {len(elements)}")
        set_elements(value.immediateValue.tensor, etype, elements)

    def element_list(self, etype: ElementType, out: list) -> None:
        self.expect("[")

        def item():
            if self.at("["):
                self.element_list(etype, out)
            else:
                out.append(self.element(etype))

        self.comma_list("]", item, f"a {etype.name} value")

    def element(self, etype: ElementType):
        kind, text, pos = self.tok
        if etype.name == "string":
            if kind != "string":
                self.error("a string in double quotes")
            return unquote(self.advance()[1])
        if etype.name == "bool":
            if text not in ("true", "false"):
                self.error("true or false")
            return self.advance()[1] == "true"
        if etype.is_float:
            return self.float_element()
        if kind != "number" or not _INTEGER.fullmatch(text):
            self.error(f"an integer ({etype.name})")
        value = int(self.advance()[1])
        if not check_range(etype, value):
            self.pos_error(pos, f"{value} does not fit in {etype.name}")
        return value

    def float_element(self) -> float:
        sign = -1.0 if self.accept("-") else 1.0
        if self.tok[0] == "name" and self.tok[1].lower() in ("inf", "nan", "infinity"):
            return sign * (math.inf if self.advance()[1].lower() != "nan" else math.nan)
        if self.tok[0] != "number":
            self.error("a number (hex float such as 0x1.8p+1, decimal, inf or nan)")
        return sign * parse_float(self.advance()[1])

    def blob(self, value, line: int) -> None:
        self.expect("BLOBFILE")
        self.expect("(")
        fields: dict[str, object] = {}

        def item():
            key = self.name("'path' or 'offset'")
            if key not in ("path", "offset"):
                self.error("'path' or 'offset'")
            self.expect("=")
            fields[key] = self.bare_or_typed(ELEMENT_TYPES["string" if key == "path" else "uint64"])

        self.comma_list(")", item, "a BLOBFILE field")
        if set(fields) != {"path", "offset"}:
            self.error("a BLOBFILE with both path and offset")
        value.blobFileValue.fileName = str(fields["path"])
        value.blobFileValue.offset = int(fields["offset"])
        tensor_type = value.type.tensorType
        self.result.blobs.append(TextBlob(str(fields["path"]), int(fields["offset"]),
                                          BY_PROTO[tensor_type.dataType].name, _count(tensor_type), line))

    def bare_or_typed(self, etype: ElementType):
        """`"x"` / `64`, or `string("x")` / `tensor<string, []>("x")` / `uint64(64)`."""
        if not self.at_literal():
            return self.element(etype)
        holder = self.pb.Value()
        self.value(holder)
        tensor = holder.immediateValue.tensor
        return tensor.strings.values[0] if etype.name == "string" else _first_int(tensor)

    def dictionary(self, value) -> None:
        key_type = value.type.dictionaryType.keyType
        value_type = value.type.dictionaryType.valueType
        pairs = value.immediateValue.dictionary.values
        self.expect("{", "'{' opening the dictionary")

        def pair():
            self.expect("{", "'{' opening a key/value pair")
            entry = pairs.add()
            self.scalar(entry.key, key_type)
            self.expect(",", "',' between a key and its value")
            self.scalar(entry.value, value_type)
            self.expect("}", "'}' closing a key/value pair")

        self.comma_list("}", pair, "a key/value pair")

    def scalar(self, target, value_type) -> None:
        """A bare element (a dictionary's key or value) into a proto Value of `value_type`."""
        etype = BY_PROTO[value_type.tensorType.dataType]
        target.type.CopyFrom(value_type)
        set_elements(target.immediateValue.tensor, etype, [self.element(etype)])


def _count(tensor_type) -> int | None:
    sizes = [d.constant.size for d in tensor_type.dimensions if d.WhichOneof("dimension") == "constant"]
    return math.prod(sizes) if len(sizes) == tensor_type.rank else None


def _first_int(tensor) -> int:
    field_name = tensor.WhichOneof("value")
    if field_name == "bytes":
        return int.from_bytes(tensor.bytes.values[:8], "little")
    return int(getattr(tensor, field_name).values[0])


def model_relative(path: str) -> Path | None:
    """`@model_path/weights/weight.bin` -> `weights/weight.bin` (None if not under @model_path)."""
    return Path(path[len(MODEL_PATH):]) if path.startswith(MODEL_PATH) else None
