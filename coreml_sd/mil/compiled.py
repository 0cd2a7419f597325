"""Compiled ML programs (`.mlmodelc`) for the mil executor: loading them, and writing them off-Mac.

Loading: `model.mil` is parsed back into the ML program proto a package holds
(`mil_text_read.py`), its weights checked in `weights/` (`blobfile.py`), and the proto read by the
same coremltools loader as a package's (`package.py`), so a compiled model and the package it
came from give the executor the same program. metadata.json (`coreml_sd.compiled_model`) gives
the specification version and must agree with the program's inputs; without it the version is the
one the newest function opset implies.

Writing (`write_compiled_model`): a `.mlmodelc`-shaped folder from a package — `model.mil` in the
compiler's syntax (`mil_text_write.py`), `weights/weight.bin` (the package's blob file, copied:
the text keeps the package's offsets, as the compiler does), `metadata.json` in the schema Apple's
pipeline reads. It has no `coremldata.bin` (Core ML's binary, undocumented), so Core ML itself
will not load it: it is for running and testing compiled-model handling off-Mac.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from coreml_sd.compiled_model import (METADATA_FILE, MIL_TO_DATA_TYPE, PROGRAM_FILE, WEIGHTS_DIR, is_compiled_model,
                                      read_metadata)
from coreml_sd.errors import ModelError, choices_text
from coreml_sd.mil.blobfile import BlobRef, check_blobs
from coreml_sd.mil.mil_text_read import ParsedText, model_relative, parse_program_text
from coreml_sd.quiet_imports import import_coremltools

WRITER = "coreml-sd-writer"
_ARRAY_TYPES = {65552: "fp16", 65568: "fp32", 65600: "fp64", 131104: "int32", 131080: "int8"}


def load_compiled_program(path, *, function_name: str | None = None):
    """The ML program of the compiled model (`.mlmodelc` folder) at `path`, as a MilProgram."""
    from coreml_sd.mil.package import milproto_load, program_from_function

    path = Path(path)
    import_coremltools()
    from coremltools.proto import Model_pb2

    spec = Model_pb2.Model()
    parsed = _parse(path, spec.mlProgram)
    names = list(parsed.program.functions)
    name = function_name or ("main" if "main" in names or len(names) != 1 else names[0])
    if name not in names:
        raise ModelError(f"{path}: no function {name!r} in {PROGRAM_FILE}; functions: {choices_text(names)}")
    _check_op_types(path, parsed)
    check_blobs(_blob_refs(path, parsed), model=path)
    version = _specification_version(path, parsed, name)
    spec.specificationVersion = version
    program = milproto_load(path, spec, path / WEIGHTS_DIR)
    return program_from_function(program.functions[name], name=name, path=path, specification_version=version,
                                 enumerated=_enumerated(path))


def _enumerated(path: Path) -> dict:
    """Enumerated input shapes declared in metadata.json (see coreml_sd.model_description)."""
    if not (path / METADATA_FILE).is_file():
        return {}
    from coreml_sd.model_description import describe_model

    return describe_model(path).shapes


def _parse(path: Path, into) -> ParsedText:
    if not is_compiled_model(path):
        raise ModelError(f"expected a compiled Core ML model (.mlmodelc folder) at {path}, found "
                         + ("a package" if (path / "Manifest.json").is_file() else
                            "a file" if path.is_file() else "nothing" if not path.exists() else "another folder"))
    file = path / PROGRAM_FILE
    if not file.is_file():
        raise ModelError(f"{path}: {PROGRAM_FILE} is missing; only compiled ML programs can be executed "
                         "(a compiled neural network has model.espresso.* instead)")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ModelError(f"{file} is not text (expected the compiled MIL program): {exc}") from None
    return parse_program_text(text, file=str(file), into=into)


def _check_op_types(path: Path, parsed: ParsedText) -> None:
    """Op types coremltools' MIL does not define cannot be loaded: name the line."""
    from coremltools.converters.mil.mil.ops.registry import SSAOpRegistry

    from coreml_sd.mil.registry import UnsupportedOpError, supported_ops

    for line, op_type, output in parsed.ops:
        if op_type != "const" and op_type not in SSAOpRegistry.core_ops:
            raise UnsupportedOpError(
                f"{path / PROGRAM_FILE}:{line}: unknown op type {op_type!r} (computing {output!r}): not a MIL op; "
                f"op types the mil executor runs: const, {choices_text(supported_ops())}")


def _blob_refs(path: Path, parsed: ParsedText) -> list[BlobRef]:
    refs = []
    for blob in parsed.blobs:
        relative = model_relative(blob.path)
        if relative is None or relative.parent != Path(WEIGHTS_DIR):
            raise ModelError(f"{path / PROGRAM_FILE}:{blob.line}: BLOBFILE path {blob.path!r}; expected a file in "
                             f"the model's weights folder (\"@model_path/{WEIGHTS_DIR}/<name>\")")
        refs.append(BlobRef(path / relative, blob.offset, blob.dtype, blob.count, f"{PROGRAM_FILE} line {blob.line}"))
    return refs


def _specification_version(path: Path, parsed: ParsedText, function: str) -> int:
    """metadata.json's version where present (it must list the program's inputs), else the opset's."""
    if not (path / METADATA_FILE).is_file():
        return parsed.specification_version
    meta = read_metadata(path)
    declared = {s.name for s in meta.inputs}
    actual = {i.name for i in parsed.program.functions[function].inputs}
    if declared != actual:
        raise ModelError(f"{path}: {METADATA_FILE} declares inputs {choices_text(sorted(declared))} but "
                         f"{PROGRAM_FILE} takes {choices_text(sorted(actual))}")
    return max(meta.specification_version or 0, parsed.specification_version)


# -- writing ----------------------------------------------------------------------------------
def write_compiled_model(package, destination) -> Path:
    """Write the `.mlmodelc`-shaped folder of `package` (a `.mlpackage`) at `destination`."""
    from coreml_sd.mil.mil_text_write import program_text
    from coreml_sd.mil.package import package_files, read_spec

    package, destination = Path(package), Path(destination)
    spec_path, weights_dir = package_files(package)
    spec = read_spec(spec_path)
    if spec.WhichOneof("Type") != "mlProgram":
        raise ModelError(f"{package}: only ML programs can be written as compiled text")
    ct = import_coremltools()
    build_info = {WRITER: _own_version(), "coremltools-version": ct.__version__}
    text = program_text(spec.mlProgram, specification_version=spec.specificationVersion, build_info=build_info)
    from coreml_sd.outputs import replacing

    with replacing(destination) as partial:
        (partial / WEIGHTS_DIR).mkdir(parents=True)
        (partial / PROGRAM_FILE).write_text(text, encoding="utf-8")
        for weight_file in sorted(weights_dir.glob("*")) if weights_dir.is_dir() else []:
            shutil.copyfile(weight_file, partial / WEIGHTS_DIR / weight_file.name)
        metadata = [_metadata(spec, package.stem)]
        (partial / METADATA_FILE).write_text(json.dumps(metadata, indent=2, ensure_ascii=False), encoding="utf-8")
    return destination


def _metadata(spec, class_name: str) -> dict:
    """metadata.json's first entry, in the keys Apple's pipeline and Core ML's compiler use."""
    from collections import Counter

    from coreml_sd.mil.mil_values import OPSET_TEXT

    histogram: Counter = Counter()
    for function in spec.mlProgram.functions.values():
        prefix = OPSET_TEXT.get(function.opset, function.opset).capitalize()
        for op in function.block_specializations[function.opset].operations:
            if op.type != "const":
                histogram[f"{prefix}.{op.type}"] += 1
    return {
        "metadataOutputVersion": "3.0",
        "specificationVersion": spec.specificationVersion,
        "modelType": {"name": "MLModelType_mlProgram"},
        "inputSchema": [_feature(f) for f in spec.description.input],
        "outputSchema": [_feature(f) for f in spec.description.output],
        "userDefinedMetadata": dict(spec.description.metadata.userDefined),
        "mlProgramOperationTypeHistogram": dict(sorted(histogram.items())),
        "generatedClassName": class_name,
        "method": "predict",
        "isUpdatable": "0",
    }


def _feature(feature) -> dict:
    array = feature.type.multiArrayType
    dtype = _ARRAY_TYPES.get(array.dataType)
    if feature.type.WhichOneof("Type") != "multiArrayType" or dtype not in MIL_TO_DATA_TYPE:
        raise ModelError(f"feature {feature.name!r}: only multi-arrays of {choices_text(MIL_TO_DATA_TYPE)} "
                         "can be described in metadata.json")
    data_type, shape = MIL_TO_DATA_TYPE[dtype], [int(d) for d in array.shape]
    out = {
        "name": feature.name,
        "type": "MultiArray",
        "dataType": data_type,
        "shape": json.dumps(shape),  # "[2, 4, 64, 64]" (a flexible input: its default shape)
        "formattedType": f"MultiArray ({data_type} {' × '.join(map(str, shape))})",
        "hasShapeFlexibility": "0",
        "isOptional": "0",
        "shortDescription": feature.shortDescription,
    }
    if array.WhichOneof("ShapeFlexibility") == "enumeratedShapes":
        # The form coreml_sd.model_description reads (its docstring says what is assumed about it).
        listed = [" × ".join(str(int(d)) for d in s.shape) for s in array.enumeratedShapes.shapes]
        out.update(hasShapeFlexibility="1", shapeFlexibility=" | ".join(listed))
    return out


def _own_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("coreml-sd")
    except PackageNotFoundError:
        return "unknown"
