"""What a Core ML model file says about itself, read without loading its weights, on any OS.

`describe_model(path)` reads a package (`.mlpackage`: its model spec, through coremltools' proto)
or a compiled model (`.mlmodelc`: its metadata.json, else its model.mil text) and returns its
inputs and outputs (a flexible size as None), the sizes a flexible input takes (Core ML's
enumerated shapes, or the bounds of a ranged one), how many ops of each type its ML program has
(attention layout and weight compression show there), its specification version, user metadata
and size on disk. Model sources that meet a folder without our manifest (`foreign_folder.py`),
and `coreml-sd info` / `models`, read folders through this.

Format facts used, and where they were learned:

* A package's model description lists each input's default shape and, for a flexible one, either
  `enumeratedShapes` (the shapes it takes) or `shapeRange` (per dimension, lower and upper bound;
  -1 unbounded) — coremltools' `FeatureTypes.proto` (`ArrayFeatureType.ShapeFlexibility`).
* A compiled model's metadata.json marks a flexible input with `"hasShapeFlexibility": "1"`; the
  bounds of a ranged one are in `"shapeRange"` as "[[lo, hi], ...]" (GuernikaKit,
  `Utils/CoreMLMetadata.swift`, which reads SD models' sizes this way) and in a text form
  "1 x 512 x 1...2000" under `"shapeFlexibility"` (seen in community tools' fixtures). Enumerated
  shapes are read from `"shapeFlexibility"` written as shapes separated by " | " (each "2 x 4 x
  64 x 64", × or x): an assumption modelled on the ranged form, not confirmed from a Core ML
  compiler output; where neither key parses, the flexible sizes are simply unknown (None).
* metadata.json's `mlProgramOperationTypeHistogram` counts ops as "<Opset>.<opType>" in
  camelCase ("Ios16.einsum", "Ios16.constexprLutToDense"); Apple's Swift apps (Mochi Diffusion's
  `SDModel.swift`, GuernikaKit) tell split-einsum from original attention by "Ios16.einsum".
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from coreml_sd.compiled_model import PROGRAM_FILE, is_compiled_model
from coreml_sd.components import TensorSpec
from coreml_sd.errors import ModelError

# coremltools' ArrayFeatureType.ArrayDataType values
ARRAY_TYPES = {65552: "fp16", 65568: "fp32", 65600: "fp64", 131104: "int32", 131080: "int8"}
_OP_IN_TEXT = re.compile(r"=\s*([a-z_][a-z0-9_]*)\(", re.MULTILINE)
_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")


@dataclass(frozen=True)
class ModelDescription:
    """One Core ML model file's interface and program facts (see the module docstring)."""

    path: Path
    compiled: bool
    inputs: tuple[TensorSpec, ...]  # a flexible size is None
    outputs: tuple[TensorSpec, ...]
    shapes: dict[str, tuple[tuple[int, ...], ...]] = field(default_factory=dict)  # enumerated, per input
    ranges: dict[str, tuple[tuple[int, int], ...]] = field(default_factory=dict)  # ranged: (lo, hi) per dim
    defaults: dict[str, tuple[int, ...]] = field(default_factory=dict)  # a flexible input's default shape
    op_counts: dict[str, int] = field(default_factory=dict)  # op type (snake_case, no opset) -> count
    specification_version: int | None = None
    user_metadata: dict[str, str] = field(default_factory=dict)
    author: str = ""
    size_bytes: int = 0
    lut_bits: tuple[int, ...] = ()  # palettized weights: bits per index seen (packages only)

    def input(self, name: str) -> TensorSpec | None:
        return next((s for s in self.inputs if s.name == name), None)

    def output(self, name: str) -> TensorSpec | None:
        return next((s for s in self.outputs if s.name == name), None)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.outputs)


def describe_model(path) -> ModelDescription:
    """The description of the `.mlpackage` or `.mlmodelc` at `path` (ModelError if it is neither)."""
    path = Path(path)
    if is_compiled_model(path):
        return _describe_compiled(path)
    if path.is_dir() and (path / "Manifest.json").is_file():
        return _describe_package(path)
    found = "a file" if path.is_file() else "a folder that is neither" if path.is_dir() else "nothing"
    raise ModelError(f"expected a Core ML package (.mlpackage folder) or compiled model (.mlmodelc folder) at {path}, "
                     f"found {found}")


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# -- packages -------------------------------------------------------------------------------------
def _describe_package(path: Path) -> ModelDescription:
    from coreml_sd.quiet_imports import import_coremltools

    ct = import_coremltools()
    try:
        spec = ct.utils.load_spec(str(path))
    except Exception as exc:  # coremltools raises bare Exceptions for unreadable packages
        raise ModelError(f"{path}: the model description could not be read: {type(exc).__name__}: {exc}") from exc
    inputs, shapes, ranges, defaults = _features(spec.description.input)
    outputs, _, _, _ = _features(spec.description.output)
    counts: dict[str, int] = {}
    bits: set[int] = set()
    if spec.WhichOneof("Type") == "mlProgram":
        for function in spec.mlProgram.functions.values():
            for block in function.block_specializations.values():
                _count_ops(block, counts, bits)
    meta = spec.description.metadata
    return ModelDescription(path, False, inputs, outputs, shapes, ranges, defaults, counts, spec.specificationVersion,
                            dict(meta.userDefined), meta.author, folder_size(path), tuple(sorted(bits)))


def _features(features) -> tuple[tuple[TensorSpec, ...], dict, dict, dict]:
    specs, shapes, ranges, defaults = [], {}, {}, {}
    for f in features:
        array = f.type.multiArrayType
        default = tuple(int(d) for d in array.shape)
        flexibility = array.WhichOneof("ShapeFlexibility")
        shape = default
        if flexibility == "enumeratedShapes":
            listed = tuple(tuple(int(d) for d in s.shape) for s in array.enumeratedShapes.shapes)
            shapes[f.name] = listed
            shape = flexible_shape(listed)
        elif flexibility == "shapeRange":
            bounds = tuple((int(r.lowerBound), int(r.upperBound)) for r in array.shapeRange.sizeRanges)
            ranges[f.name] = bounds
            shape = tuple(lo if lo == hi else None for lo, hi in bounds)
        if flexibility is not None:
            defaults[f.name] = default
        specs.append(TensorSpec(f.name, shape, ARRAY_TYPES.get(array.dataType, f"array type {array.dataType}")))
    return tuple(specs), shapes, ranges, defaults


def flexible_shape(shapes) -> tuple:
    """One shape for several: the sizes they share, None where they differ."""
    shapes = [tuple(s) for s in shapes]
    return tuple(dims[0] if len(set(dims)) == 1 else None for dims in zip(*shapes))


def _count_ops(block, counts: dict[str, int], bits: set[int]) -> None:
    for op in block.operations:
        counts[op.type] = counts.get(op.type, 0) + 1
        if op.type == "constexpr_lut_to_dense":
            bits.update(_lut_bits(op))
        for inner in op.blocks:
            _count_ops(inner, counts, bits)


def _lut_bits(op) -> set[int]:
    """Bits per palette index: the lookup table has 2**n entries (iOS16: (2**n,); iOS18: (..., 2**n, v))."""
    value = op.attributes.get("lut")
    if value is None and "lut" in op.inputs and op.inputs["lut"].arguments:
        value = op.inputs["lut"].arguments[0].value if op.inputs["lut"].arguments[0].WhichOneof("binding") == "value" \
            else None
    if value is None:
        return set()
    dims = [d.constant.size for d in value.type.tensorType.dimensions]
    entries = dims[0] if len(dims) == 1 else (dims[-2] if len(dims) >= 2 else 0)
    return {entries.bit_length() - 1} if entries and entries & (entries - 1) == 0 else set()


# -- compiled models ------------------------------------------------------------------------------
def _describe_compiled(path: Path) -> ModelDescription:
    from coreml_sd.compiled_model import read_metadata

    meta = read_metadata(path)
    raw_inputs = {f.get("name"): f for f in meta.raw.get("inputSchema") or [] if isinstance(f, dict)}
    inputs, shapes, ranges, defaults = [], {}, {}, {}
    for spec in meta.inputs:
        listed, bounds = _compiled_flexibility(raw_inputs.get(spec.name) or {}, len(spec.shape))
        shape = spec.shape
        if listed:
            shapes[spec.name] = listed
            shape = flexible_shape(listed)
        elif bounds:
            ranges[spec.name] = bounds
            shape = tuple(lo if lo == hi else None for lo, hi in bounds)
        elif str((raw_inputs.get(spec.name) or {}).get("hasShapeFlexibility")) == "1":
            shape = tuple(None for _ in spec.shape)  # flexible, in a form not understood here
        if shape != spec.shape:
            defaults[spec.name] = spec.shape
        inputs.append(TensorSpec(spec.name, shape, spec.dtype))
    counts = _histogram(meta.raw.get("mlProgramOperationTypeHistogram"))
    if not counts and (path / PROGRAM_FILE).is_file():
        counts = _ops_in_text((path / PROGRAM_FILE).read_text(encoding="utf-8", errors="replace"))
    author = str((meta.raw.get("author") or ""))
    return ModelDescription(path, True, tuple(inputs), meta.outputs, shapes, ranges, defaults, counts,
                            meta.specification_version, {str(k): str(v) for k, v in meta.user_metadata.items()},
                            author, folder_size(path))


def _compiled_flexibility(feature: Mapping[str, Any], rank: int):
    """(enumerated shapes, ranges) of one metadata.json input (see the module docstring)."""
    if str(feature.get("hasShapeFlexibility")) != "1":
        return (), ()
    text = str(feature.get("shapeFlexibility") or "")
    if "|" in text:
        listed = tuple(_dims(part) for part in text.split("|"))
        if all(s is not None and len(s) == rank for s in listed):
            return listed, ()
    ranges = _range_list(feature.get("shapeRange"), rank) or _range_text(text, rank)
    return (), ranges or ()


def _dims(text: str):
    parts = [p.strip() for p in re.split(r"[×x]", text)]
    return tuple(int(p) for p in parts) if parts and all(p.isdigit() for p in parts) else None


def _range_list(value, rank: int):
    try:
        bounds = json.loads(value) if isinstance(value, str) else value
        out = tuple((int(lo), int(hi)) for lo, hi in bounds)
    except (TypeError, ValueError, json.JSONDecodeError):
        return None
    return out if len(out) == rank else None


def _range_text(text: str, rank: int):
    out = []
    for part in (p.strip() for p in re.split(r"[×x]", text)):
        lo, dots, hi = part.partition("...")
        if not lo.strip().isdigit() or (dots and not hi.strip().lstrip("-").isdigit()):
            return None
        out.append((int(lo), int(hi) if dots else int(lo)))
    return tuple(out) if len(out) == rank else None


def _histogram(histogram) -> dict[str, int]:
    """{"Ios16.einsum": 2, "Ios16.constexprLutToDense": 1} -> {"einsum": 2, "constexpr_lut_to_dense": 1}."""
    if not isinstance(histogram, Mapping):
        return {}
    out: dict[str, int] = {}
    for key, count in histogram.items():
        name = _CAMEL.sub("_", str(key).rsplit(".", 1)[-1]).lower()
        out[name] = out.get(name, 0) + int(count)
    return out


def _ops_in_text(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for name in _OP_IN_TEXT.findall(text):
        if name not in ("tensor", "BLOBFILE"):
            out[name] = out.get(name, 0) + 1
    return out
