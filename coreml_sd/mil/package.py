"""Reading a `.mlpackage`: manifest -> model spec -> ML program (coremltools' own proto loader).

Everything that can be wrong with a package on disk is found here and reported as a `ModelError`
naming the file: a path that is not a package, a missing or corrupt manifest or spec, a model that
is not an ML program, a weight file that is missing or unreadable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from coreml_sd.components import TensorSpec
from coreml_sd.errors import ModelError, choices_text
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




def load_program(path, *, function_name: str | None = None) -> MilProgram:
    """Load the ML program of the `.mlpackage` at `path` (any OS; no Core ML runtime needed)."""
    path = Path(path)
    spec_path, weights_dir = _package_files(path)
    spec = _read_spec(spec_path)
    kind = spec.WhichOneof("Type")
    if kind != "mlProgram":
        raise ModelError(f"{path}: only ML programs (mlprogram) can be executed; this package holds a {kind!r} model")
    names = list(spec.mlProgram.functions)
    name = function_name or spec.description.defaultFunctionName or "main"
    if name not in names:
        raise ModelError(f"{path}: no function {name!r} in the ML program; functions: {choices_text(names)}")
    _check_weight_files(path, spec.mlProgram, weights_dir)
    program = _milproto_load(path, spec, weights_dir)
    return program_from_function(program.functions[name], name=name, path=path,
                                 specification_version=spec.specificationVersion)


def program_from_function(function, *, name: str = "main", path=Path("<in-memory program>"),
                          specification_version: int = 0) -> MilProgram:
    """Wrap an in-memory coremltools MIL Function (e.g. from `mb.program`) for execution."""
    return MilProgram(
        path=Path(path),
        function_name=name,
        function=function,
        inputs=tuple(_tensor_spec(n, v) for n, v in function.inputs.items()),
        outputs=tuple(_tensor_spec(v.name, v) for v in function.outputs),
        specification_version=specification_version,
    )


def _package_files(path: Path) -> tuple[Path, Path]:
    """(model spec file, weights folder) named by the package's Manifest.json."""
    if not path.exists():
        raise ModelError(f"expected a Core ML package (.mlpackage folder) at {path}, found nothing")
    if not path.is_dir():
        raise ModelError(
            f"{path} is a file; expected a Core ML package (.mlpackage folder). Compiled .mlmodelc "
            "folders and neural-network .mlmodel files cannot be executed here"
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


def _read_spec(spec_path: Path):
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


def _blob_values(message):
    """Every BlobFileValue in a MIL program proto (weights stored outside the spec)."""
    for function in message.functions.values():
        for block in function.block_specializations.values():
            yield from _blob_values_in_block(block)


def _blob_values_in_block(block):
    for operation in block.operations:
        for value in operation.attributes.values():
            if value.WhichOneof("value") == "blobFileValue":
                yield value.blobFileValue
        for argument in operation.inputs.values():
            for binding in argument.arguments:
                if binding.WhichOneof("binding") == "value" and binding.value.WhichOneof("value") == "blobFileValue":
                    yield binding.value.blobFileValue
        for inner in operation.blocks:
            yield from _blob_values_in_block(inner)


def _check_weight_files(path: Path, program, weights_dir: Path) -> None:
    needed: dict[str, int] = {}
    for blob in _blob_values(program):
        name = blob.fileName.split("/")[-1]
        needed[name] = max(needed.get(name, 0), blob.offset)
    for name, last_offset in sorted(needed.items()):
        file = weights_dir / name
        if not file.is_file():
            raise ModelError(f"{path}: weight file {file} is missing (the ML program reads its weights from it)")
        if file.stat().st_size <= last_offset:
            raise ModelError(
                f"{path}: weight file {file} is truncated: {file.stat().st_size} bytes, "
                f"but the program reads a weight at offset {last_offset}"
            )


def _milproto_load(path: Path, spec, weights_dir: Path):
    from coremltools.converters.mil.frontend.milproto import load as milproto

    original = milproto._load_file_value
    reader = Fp16BlobReader(weights_dir)

    def load_file_value(context, filevalue_spec, dtype):
        if reader.handles(dtype):
            return reader.read(filevalue_spec)
        return original(context, filevalue_spec, dtype)

    # coremltools' own blob reader maps the whole weight file and keeps every page it read resident
    # until the load ends: with the copies it returns, twice the weights (a 10 GB peak for SDXL's
    # UNet). fp16 weights (all of a converted model's) are read here instead, one copy each.
    milproto._load_file_value = load_file_value
    try:
        return milproto.load(spec, specification_version=spec.specificationVersion, file_weights_dir=str(weights_dir))
    except ModelError:
        raise
    except Exception as exc:  # coremltools raises bare ValueError/RuntimeError/AssertionError here
        raise ModelError(f"{path}: the ML program or its weights could not be read: {type(exc).__name__}: {exc}") from exc
    finally:
        milproto._load_file_value = original
        reader.close()


class Fp16BlobReader:
    """fp16 weights of MIL blob storage files (weight.bin): at a blob's offset a 64-byte record —
    sentinel 0xDEADBEEF, data type (1: fp16), size in bytes, data offset — then the data there."""

    SENTINEL, FP16 = 0xDEADBEEF, 1

    def __init__(self, weights_dir: Path):
        self.weights_dir, self.files = Path(weights_dir), {}

    @staticmethod
    def handles(dtype) -> bool:
        from coremltools.converters.mil.mil import types

        return dtype == types.fp16

    def read(self, blob) -> np.ndarray:
        import struct

        name = blob.fileName.split("/")[-1]
        if name not in self.files:
            self.files[name] = open(self.weights_dir / name, "rb")
        fh = self.files[name]
        fh.seek(blob.offset)
        record = fh.read(24)
        sentinel, dtype, size, data_offset = struct.unpack("<IIQQ", record) if len(record) == 24 else (0, 0, 0, 0)
        if sentinel != self.SENTINEL or dtype != self.FP16 or size % 2:
            raise ModelError(f"{self.weights_dir / name}: no fp16 weight record at offset {blob.offset} "
                             f"(sentinel {sentinel:#x}, type {dtype}, {size} bytes)")
        fh.seek(data_offset)
        values = np.fromfile(fh, dtype="<f2", count=size // 2)
        if values.size * 2 != size:
            raise ModelError(f"{self.weights_dir / name} is truncated: the weight at {data_offset} needs {size} bytes")
        return values

    def close(self) -> None:
        for fh in self.files.values():
            fh.close()
        self.files.clear()


def _tensor_spec(name: str, var) -> TensorSpec:
    from coremltools.converters.mil.mil import types

    if not types.is_tensor(var.sym_type):
        return TensorSpec(name, (), types.builtin_to_string(var.sym_type))
    shape = tuple(int(d) if isinstance(d, int) or hasattr(d, "__index__") else None for d in var.shape)
    return TensorSpec(name, shape, types.builtin_to_string(var.dtype))
