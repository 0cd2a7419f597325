"""Rewritten module -> ML program -> (compressed) `.mlpackage`, without tracing.

The program is emitted by running the module's forward with `MilOps`: weights enter it as fp16
constants sharing memory with the torch parameters, every op is typed as the module computes it
(fp16, with fp32 where the module asks, e.g. the timestep features), and coremltools then runs
its optimization passes and serializes. No fp32 copy of the weights ever exists, which is what
lets a full SD UNet convert in a few GiB (a traced fp32 graph costs several times that).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from coreml_sd.errors import CoreMLSDError, choices_text

log = logging.getLogger(__name__)

from coreml_sd.conversion_names import MIN_TARGETS, WEIGHT_MODES  # noqa: E402  (re-exported)
# The passes run on the emitted program. coremltools' default pipeline (~90 passes) is written for
# fp32 programs from its frontends (some fusions insert fp32 constants next to fp16 values and
# fail), re-validates the whole program after each pass, and mostly looks for patterns an emitted
# program does not contain; these few do the work that applies here.
PASSES = (
    "common::const_elimination",  # folds ops whose inputs are all constant
    "common::noop_elimination",  # identity ops, e.g. the ones that name outputs
    "common::remove_redundant_ops",  # identical ops on identical inputs (silu(emb) in every resnet)
    "common::dead_code_elimination",
    "common::dedup_op_and_var_names",
    "common::topological_reorder",
)
# Small tensors (biases, small convs) stay fp16: compressing them saves nothing and costs accuracy.
COMPRESSION_MIN_ELEMENTS = 2048
COMPRESSED_OP_TYPES = ("conv", "gather")


class ConversionError(CoreMLSDError):
    """A conversion step failed, or its result did not pass the parity gate."""


@dataclass(frozen=True)
class TensorIO:
    """One input or output of a package: name, shape, element type ("fp16" | "fp32").

    An input taking several shapes lists them in `shapes` (Core ML enumerated shapes; the first is
    the default) and has None in `shape` where they differ. An output's None sizes are flexible."""

    name: str
    shape: tuple | None
    dtype: str
    shapes: tuple[tuple[int, ...], ...] = ()

    @classmethod
    def enumerated(cls, name: str, shapes, dtype: str) -> "TensorIO":
        """An input taking each of `shapes` (one shape: a fixed input)."""
        shapes = tuple(dict.fromkeys(tuple(int(d) for d in s) for s in shapes))
        if len(shapes) == 1:
            return cls(name, shapes[0], dtype)
        shape = tuple(dims[0] if len(set(dims)) == 1 else None for dims in zip(*shapes))
        return cls(name, shape, dtype, shapes)

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


def core_ml_target(name: str):
    import coremltools as ct

    if name not in MIN_TARGETS:
        raise ConversionError(f"unknown minimum deployment target {name!r}; valid: {choices_text(MIN_TARGETS)}")
    return getattr(ct.target, name)


def build_program(forward: Callable[..., Sequence[Any]], module, inputs: Sequence[TensorIO],
                  outputs: Sequence[TensorIO], *, min_target: str):
    """The ML program computing `forward(ops, *inputs)` -> outputs, named and typed as given.

    An output whose shape is None takes the shape the module computes. Returns the program, the
    outputs as built (shapes resolved) and a map from weight-constant names to parameter names.
    """
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import Function, Program

    from conversion.ane.ops import MilOps

    placeholders, bindings = _placeholders(mb, inputs)
    ops = MilOps(module, size_bindings=bindings)
    prog = Program()
    with Function(placeholders, opset_version=core_ml_target(min_target)) as func:
        results = forward(ops, *[func.inputs[io.name] for io in inputs])
        if len(results) != len(outputs):
            raise ConversionError(f"the module returned {len(results)} outputs, expected {len(outputs)}")
        resolved = [_resolve(value, io) for value, io in zip(results, outputs)]
        func.set_outputs([_named(mb, value, io) for value, io in zip(results, resolved)])
    prog.add_function("main", func)
    return prog, resolved, ops.const_names()


def _placeholders(mb, inputs: Sequence[TensorIO]):
    """The program's inputs: a size that differs between an input's enumerated shapes is a symbol.
    Returns them and, per enumerated shape, {symbol: size} (every enumerated input lists its shapes
    in the same order: Core ML's rule for several enumerated inputs)."""
    from coremltools.converters.mil.mil import get_new_symbol

    counts = {len(io.shapes) for io in inputs if io.shapes}
    if len(counts) > 1:
        raise ConversionError(f"inputs with enumerated shapes must list as many shapes each; found {sorted(counts)}")
    bindings = [{} for _ in range(counts.pop() if counts else 0)]
    placeholders = OrderedDict()
    for io in inputs:
        shape = []
        for axis, size in enumerate(io.shape):
            if size is None:
                symbol = get_new_symbol()
                for binding, listed in zip(bindings, io.shapes):
                    binding[symbol] = int(listed[axis])
                size = symbol
            shape.append(size)
        placeholders[io.name] = mb.placeholder(shape=tuple(shape), dtype=_mil_type(io.dtype))
    return placeholders, bindings


def _resolve(value, io: TensorIO) -> TensorIO:
    from coremltools.converters.mil.mil.types.symbolic import is_symbolic

    shape = tuple(None if is_symbolic(d) else int(d) for d in value.shape)
    if io.shape is not None and (len(shape) != len(io.shape)
                                 or any(b is not None and a != b for a, b in zip(shape, io.shape))):
        raise ConversionError(f"output {io.name}: the module computes shape {shape}, the contract says {io.shape}")
    return TensorIO(io.name, shape, io.dtype)


def _named(mb, value, io: TensorIO):
    from coremltools.converters.mil.mil import types

    if types.builtin_to_string(value.dtype) != io.dtype:
        return mb.cast(x=value, dtype=io.dtype, name=io.name)
    return mb.identity(x=value, name=io.name)


def _mil_type(dtype: str):
    from coremltools.converters.mil.mil import types

    return {"fp16": types.fp16, "fp32": types.fp32}[dtype]


def compression_config(weights: str):
    """coremltools.optimize.coreml config for a `--weights` mode (None for plain fp16)."""
    import coremltools.optimize.coreml as cto

    if weights not in WEIGHT_MODES:
        raise ConversionError(f"unknown weight mode {weights!r}; valid: {choices_text(WEIGHT_MODES)}")
    if weights == "fp16":
        return None
    if weights == "int8":
        op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                         weight_threshold=COMPRESSION_MIN_ELEMENTS)
    else:
        op = cto.OpPalettizerConfig(mode="custom", lut_function=kmeans_lut(int(weights.split("-")[1])),
                                    granularity="per_tensor", weight_threshold=COMPRESSION_MIN_ELEMENTS)
    # Weights are what conv ops (every linear/conv layer) and gather (the token embedding table)
    # read; other constants (attention masks, norm scales, position tables) stay as they are.
    return cto.OptimizationConfig(op_type_configs={op_type: op for op_type in COMPRESSED_OP_TYPES})


def kmeans_lut(nbits: int) -> Callable:
    """A palettization LUT function: coremltools' own k-means, always in its exact 1-D form.

    coremltools clusters large fp16 tensors with its bundled optimal 1-D k-means (over distinct
    values, weighted by counts) but tensors under 10,000 elements with scikit-learn's KMeans,
    which is approximate and orders of magnitude slower (seconds per tiny model). Forcing the 1-D
    algorithm gives the same result for large tensors and exact, fast clustering for all.
    """

    def lut_function(weight: np.ndarray):
        from coremltools.models.neural_network.quantization_utils import _get_kmeans_lookup_table_and_weight

        lut, indices = _get_kmeans_lookup_table_and_weight(nbits, weight, force_kmeans1d=True)
        return lut.astype(weight.dtype), np.asarray(indices, dtype=np.uint8)

    return lut_function


def compress(prog, weights: str) -> None:
    """Apply coremltools' own compression pass for `weights` to the program, in place."""
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY
    from coremltools.converters.mil.mil.passes.graph_pass import PassOption

    config = compression_config(weights)
    if config is None:
        return
    name = "compression::linear_quantize_weights" if weights == "int8" else "compression::palettize_weights"
    graph_pass = PASS_REGISTRY[name]
    graph_pass.set_options([PassOption("config", config)])
    graph_pass.apply(prog)


def to_mlmodel(prog, *, min_target: str, package_dir: Path, description: str = "",
               metadata: dict | None = None, inputs: Sequence[TensorIO] = ()) -> Path:
    """coremltools' conversion of an already-typed program, serialized straight to `package_dir`.

    compute_precision=FLOAT32 tells coremltools not to re-cast: the program's types are final.
    `inputs` with enumerated `shapes` become Core ML enumerated shapes (the first the default).
    """
    import coremltools as ct

    pipeline = ct.PassPipeline(pass_names=list(PASSES), pipeline_name="coreml_sd")
    package_dir = Path(package_dir)
    flexible = [ct.TensorType(name=io.name, shape=ct.EnumeratedShapes(shapes=[list(s) for s in io.shapes],
                                                                       default=list(io.shapes[0])))
                for io in inputs if io.shapes]
    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=core_ml_target(min_target),
                       compute_precision=ct.precision.FLOAT32, skip_model_load=True, pass_pipeline=pipeline,
                       package_dir=str(package_dir), inputs=flexible or None)
    del model
    set_package_metadata(package_dir, description=description, metadata=metadata or {})
    return package_dir


def set_package_metadata(package: Path, *, description: str, metadata: dict) -> None:
    """Write the description and user metadata into a saved package's model spec, in place.

    (Setting them on the MLModel would mean saving the package a second time, weights included.)
    """
    import json

    from coremltools.proto import Model_pb2

    manifest = json.loads((Path(package) / "Manifest.json").read_text())
    root = manifest["itemInfoEntries"][manifest["rootModelIdentifier"]]["path"]
    spec_path = Path(package) / "Data" / root
    spec = Model_pb2.Model()
    spec.ParseFromString(spec_path.read_bytes())
    spec.description.metadata.shortDescription = description
    spec.description.metadata.author = "coreml-sd"
    for key, value in metadata.items():
        spec.description.metadata.userDefined[key] = str(value)
    spec_path.write_bytes(spec.SerializeToString())


def compile_package(package: Path, target: Path) -> Path:
    """The `.mlmodelc` of `package` at `target` (needs macOS: Core ML's compiler ships only there)."""
    import sys

    if sys.platform != "darwin":
        raise ConversionError("--compile needs macOS (Core ML's compiler); on this OS convert without "
                              "--compile: the packages compile on the Mac at first load")
    import coremltools as ct

    return Path(ct.models.utils.compile_model(str(package), str(target)))
