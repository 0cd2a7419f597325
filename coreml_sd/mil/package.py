"""Reading a `.mlpackage`: manifest -> model spec -> ML program (coremltools' own proto loader).

Everything that can be wrong with a package on disk is found here and reported as a `ModelError`
naming the file: a path that is not a package, a missing or corrupt manifest or spec, a model that
is not an ML program, a weight file that is missing, truncated or does not hold the weight read.

`load_program` also takes a compiled model (`.mlmodelc` folder): see `compiled.py`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coreml_sd.compiled_model import is_compiled_model
from coreml_sd.components import TensorSpec
from coreml_sd.errors import ModelError, choices_text
from coreml_sd.mil.blobfile import BlobRef, check_blobs
from coreml_sd.quiet_imports import import_coremltools

DATA_DIR = "Data"


@dataclass
class MilProgram:
    """A loaded ML program function, ready to compile into an executor."""

    path: Path
    function_name: str
    function: Any  # coremltools.converters.mil.mil.Function
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    specification_version: int
    # Inputs declared with Core ML enumerated shapes: name -> the shapes they take (any other is refused)
    enumerated: dict = field(default_factory=dict)



def load_program(path, *, function_name: str | None = None) -> MilProgram:
    """Load the ML program of the `.mlpackage` or compiled `.mlmodelc` at `path` (any OS; no Core ML
    runtime needed)."""
    path = Path(path)
    if is_compiled_model(path):
        from coreml_sd.mil.compiled import load_compiled_program

        return load_compiled_program(path, function_name=function_name)
    spec_path, weights_dir = package_files(path)
    spec = read_spec(spec_path)
    kind = spec.WhichOneof("Type")
    if kind != "mlProgram":
        raise ModelError(f"{path}: only ML programs (mlprogram) can be executed; this package holds a {kind!r} model")
    names = list(spec.mlProgram.functions)
    name = function_name or spec.description.defaultFunctionName or "main"
    if name not in names:
        raise ModelError(f"{path}: no function {name!r} in the ML program; functions: {choices_text(names)}")
    check_blobs(_blob_refs(spec.mlProgram, weights_dir), model=path)
    program = milproto_load(path, spec, weights_dir)
    return program_from_function(program.functions[name], name=name, path=path,
                                 specification_version=spec.specificationVersion,
                                 enumerated=enumerated_shapes(spec.description.input))


def enumerated_shapes(features) -> dict[str, tuple[tuple[int, ...], ...]]:
    """name -> shapes, for the model-description inputs declared with enumerated shapes."""
    out = {}
    for f in features:
        array = f.type.multiArrayType
        if f.type.WhichOneof("Type") == "multiArrayType" and array.WhichOneof("ShapeFlexibility") == "enumeratedShapes":
            out[f.name] = tuple(tuple(int(d) for d in s.shape) for s in array.enumeratedShapes.shapes)
    return out


def program_from_function(function, *, name: str = "main", path=Path("<in-memory program>"),
                          specification_version: int = 0, enumerated=None) -> MilProgram:
    """Wrap an in-memory coremltools MIL Function (e.g. from `mb.program`) for execution."""
    return MilProgram(
        path=Path(path),
        function_name=name,
        function=function,
        inputs=tuple(_tensor_spec(n, v) for n, v in function.inputs.items()),
        outputs=tuple(_tensor_spec(v.name, v) for v in function.outputs),
        specification_version=specification_version,
        enumerated=dict(enumerated or {}),
    )


def package_files(path: Path) -> tuple[Path, Path]:
    """(model spec file, weights folder) named by the package's Manifest.json."""
    if not path.exists():
        raise ModelError(f"expected a Core ML package (.mlpackage folder) at {path}, found nothing")
    if not path.is_dir():
        raise ModelError(
            f"{path} is a file; expected a Core ML package (.mlpackage folder) or a compiled model "
            "(.mlmodelc folder). Neural-network .mlmodel files cannot be executed here"
        )
    manifest_path = path / "Manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        root = manifest["itemInfoEntries"][manifest["rootModelIdentifier"]]["path"]
        items = manifest["itemInfoEntries"].values()
    except FileNotFoundError:
        raise ModelError(f"{path} is not a Core ML package: Manifest.json is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise ModelError(f"{manifest_path} is corrupt (expected the Core ML package manifest): {exc!r}") from None
    spec_path = path / DATA_DIR / root
    weights = [item["path"] for item in items if isinstance(item, dict) and item.get("name") == "weights"]
    weights_dir = path / DATA_DIR / (weights[0] if weights else Path(root).parent / "weights")
    return spec_path, weights_dir


def read_spec(spec_path: Path):
    import_coremltools()
    from coremltools.proto import Model_pb2
    from google.protobuf.message import DecodeError

    try:
        data = spec_path.read_bytes()
    except FileNotFoundError:
        raise ModelError(f"the package's model spec {spec_path} is missing") from None
    spec = Model_pb2.Model()
    try:
        spec.ParseFromString(data)
    except DecodeError as exc:
        raise ModelError(f"the package's model spec {spec_path} is corrupt: {exc}") from None
    if spec.WhichOneof("Type") is None:
        raise ModelError(f"the package's model spec {spec_path} is corrupt or empty: it defines no model")
    return spec


def _blob_refs(program, weights_dir: Path) -> list[BlobRef]:
    """Every weight a MIL program proto reads from a blob file (consts, constexpr parameters)."""
    refs = []
    for function in program.functions.values():
        for block in function.block_specializations.values():
            refs.extend(_blob_refs_in_block(block, weights_dir))
    return refs


def _blob_refs_in_block(block, weights_dir: Path):
    for operation in block.operations:
        values = list(operation.attributes.values()) + [
            binding.value for argument in operation.inputs.values() for binding in argument.arguments
            if binding.WhichOneof("binding") == "value"]
        for value in values:
            if value.WhichOneof("value") == "blobFileValue":
                yield _blob_ref(value, weights_dir, operation)
        for inner in operation.blocks:
            yield from _blob_refs_in_block(inner, weights_dir)


def _blob_ref(value, weights_dir: Path, operation) -> BlobRef:
    from coreml_sd.mil.mil_values import BY_PROTO

    tensor = value.type.tensorType
    sizes = [d.constant.size for d in tensor.dimensions if d.WhichOneof("dimension") == "constant"]
    count = math.prod(sizes) if len(sizes) == tensor.rank else None
    dtype = BY_PROTO[tensor.dataType].name if tensor.dataType in BY_PROTO else str(tensor.dataType)
    name = operation.outputs[0].name if operation.outputs else operation.type
    return BlobRef(weights_dir / value.blobFileValue.fileName.split("/")[-1], value.blobFileValue.offset, dtype,
                   count, f"op {name!r}")


def milproto_load(path: Path, spec, weights_dir: Path):
    """coremltools' loader, with the weights memory-mapped from the package (`weights.py`)."""
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    from coreml_sd.mil.weights import mapped_weights

    try:
        with mapped_weights(weights_dir):
            return milproto_load(spec, specification_version=spec.specificationVersion,
                                 file_weights_dir=str(weights_dir))
    except ModelError:
        raise
    except Exception as exc:  # coremltools raises bare ValueError/RuntimeError/AssertionError here
        raise ModelError(f"{path}: the ML program or its weights could not be read: {type(exc).__name__}: {exc}") from exc


def _tensor_spec(name: str, var) -> TensorSpec:
    from coremltools.converters.mil.mil import types

    if not types.is_tensor(var.sym_type):
        return TensorSpec(name, (), types.builtin_to_string(var.sym_type))
    shape = tuple(int(d) if isinstance(d, int) or hasattr(d, "__index__") else None for d in var.shape)
    return TensorSpec(name, shape, types.builtin_to_string(var.dtype))
