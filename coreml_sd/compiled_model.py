"""Compiled Core ML models (`.mlmodelc` folders): recognising them and reading their schema, on any OS.

This module needs neither Core ML nor coremltools nor torch: a Mac running the `coreml` backend and
a Linux box reading a download both use it. Executing the program is `coreml_sd.mil.compiled`.

What a compiled ML program folder holds (the format facts this project relies on, and where each
was learned; nothing here was copied):

* `model.mil`: the ML program as text (grammar: `coreml_sd/mil/mil_text_read.py`);
  `weights/weight.bin`: its weights in MIL blob storage, referenced from the text as
  `BLOBFILE(path = ..."@model_path/weights/weight.bin", offset = ...)` — coremltools' own tests read
  `<compiled>/model.mil` and assert such lines (coremltools 9.0, `test/blob/test_weights.py`,
  `test/ml_program/test_utils.py`, `converters/mil/backend/mil/test_load.py`).
* `metadata.json`: a JSON list whose first element describes the model. Apple's Python pipeline
  for compiled Stable Diffusion resources reads `json.load(f)[0]["inputSchema"]`, each entry with
  `name`, `shape` (a string such as `"[2, 4, 64, 64]"`) and `dataType` (`"Float16"`, `"Float32"`,
  `"Int32"`, which it lower-cases into a numpy dtype) — apple/ml-stable-diffusion
  `python_coreml_stable_diffusion/coreml_model.py`. `outputSchema` has the same form;
  `specificationVersion`, `userDefinedMetadata`, `modelType.name` (`MLModelType_mlProgram`),
  `metadataOutputVersion` ("3.0"), `isOptional`, `hasShapeFlexibility`, `formattedType`,
  `mlProgramOperationTypeHistogram` are seen in every community tool that writes or checks this
  file (found by code search; consistent across them, not documented by Apple).
* `coremldata.bin` (binary, Core ML's own; not read here) and `analytics/`: present in folders
  Core ML's compiler writes. A compiled *neural network* (not an ML program) has no `model.mil`.
* Apple's Swift pipeline loads only `.mlmodelc` resources (`TextEncoder.mlmodelc`, `Unet.mlmodelc`,
  ... beside `vocab.json`, `merges.txt`) — ml-stable-diffusion README, `swift run
  StableDiffusionSample --help`.

Public: `is_compiled_model(path)`, `read_metadata(path)`, `read_specs(path)`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coreml_sd.components import TensorSpec
from coreml_sd.errors import ModelError, choices_text

SUFFIX = ".mlmodelc"
PROGRAM_FILE = "model.mil"
METADATA_FILE = "metadata.json"
WEIGHTS_DIR = "weights"
# metadata.json dataType -> MIL element type (the names the rest of coreml_sd uses).
DATA_TYPES = {"Float16": "fp16", "Float32": "fp32", "Float64": "fp64", "Double": "fp64", "Int32": "int32",
              "Int8": "int8"}
MIL_TO_DATA_TYPE = {"fp16": "Float16", "fp32": "Float32", "fp64": "Float64", "int32": "Int32", "int8": "Int8"}


@dataclass(frozen=True)
class CompiledMetadata:
    """What a compiled model's metadata.json says about it."""

    path: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    specification_version: int | None
    user_metadata: dict = field(default_factory=dict)
    raw: dict = field(default_factory=dict)  # the whole first entry, for facts not modelled here


def is_compiled_model(path) -> bool:
    """True for a compiled Core ML model folder (`.mlmodelc`): one holding model.mil or
    coremldata.bin, or named `*.mlmodelc`, and not a package (which has Manifest.json)."""
    path = Path(path)
    if not path.is_dir() or (path / "Manifest.json").is_file():
        return False
    return path.suffix == SUFFIX or (path / PROGRAM_FILE).is_file() or (path / "coremldata.bin").is_file()


def read_metadata(path) -> CompiledMetadata:
    """The schema and metadata of the compiled model at `path`, from its metadata.json."""
    path = Path(path)
    entry = _metadata_entry(path)
    file = path / METADATA_FILE
    inputs = tuple(_feature(file, f, "inputSchema") for f in _schema(file, entry, "inputSchema"))
    outputs = tuple(_feature(file, f, "outputSchema") for f in _schema(file, entry, "outputSchema"))
    version = entry.get("specificationVersion")
    user = entry.get("userDefinedMetadata") or {}
    return CompiledMetadata(path, inputs, outputs, int(version) if version is not None else None, dict(user), entry)


def read_specs(path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """(inputs, outputs) of the compiled model at `path`, as its metadata.json declares them."""
    meta = read_metadata(path)
    return meta.inputs, meta.outputs


def _metadata_entry(path: Path) -> dict:
    if not path.is_dir():
        raise ModelError(f"expected a compiled Core ML model (.mlmodelc folder) at {path}, found "
                         + ("a file" if path.exists() else "nothing"))
    file = path / METADATA_FILE
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path}: {METADATA_FILE} is missing (a compiled model's input/output schema)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{file} is not valid JSON: {exc}") from None
    if isinstance(data, list) and data and isinstance(data[0], dict):
        return data[0]
    raise ModelError(f"{file}: expected a JSON list whose first element describes the model, "
                     f"found {type(data).__name__}{' (empty)' if data == [] else ''}")


def _schema(file: Path, entry: dict, key: str) -> list:
    schema = entry.get(key)
    if not isinstance(schema, list):
        raise ModelError(f"{file}: expected {key!r} (a list of features), found {schema!r}")
    return schema


def _feature(file: Path, feature: Any, key: str) -> TensorSpec:
    if not isinstance(feature, dict) or "name" not in feature:
        raise ModelError(f"{file}: an entry of {key!r} has no name: {feature!r}")
    name = feature["name"]
    kind = feature.get("type", "MultiArray")
    if kind != "MultiArray":
        raise ModelError(f"{file}: {key} {name!r} is of type {kind!r}; only MultiArray features are supported")
    data_type = feature.get("dataType")
    if data_type not in DATA_TYPES:
        raise ModelError(f"{file}: {key} {name!r} has dataType {data_type!r}; known: {choices_text(DATA_TYPES)}")
    return TensorSpec(name, _shape(file, name, feature.get("shape")), DATA_TYPES[data_type])


def _shape(file: Path, name: str, text: Any) -> tuple:
    try:
        shape = json.loads(text) if isinstance(text, str) else text
        if isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape):
            return tuple(shape)
    except json.JSONDecodeError:
        pass
    raise ModelError(f"{file}: feature {name!r} has shape {text!r}; expected a list of sizes such as \"[1, 77]\"")
