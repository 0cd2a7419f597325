"""Running a loaded ML program op by op with torch kernels.

An executor compiles the program's function once (`compiler.py`: every op becomes a step, a
kernel plus integer slots), then each call is a tight loop over the steps.

* Constants (weights, and anything computable from them alone: decompression ops, folded shape
  math) are materialized once per executor in the dtype and on the device it runs with, and
  never again per call.
* Each intermediate value is dropped right after its last reader, so peak memory is the weights
  plus the live activations, as in eager torch.
* `exact` mode rounds the output of every op whose type is fp16 to fp16, by storing it as fp16
  (see `precision.py`).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Mapping

import numpy as np
import torch

from coreml_sd.errors import InputError
from coreml_sd.mil.compiler import Graph, Step, compile_function, split_constant_steps, with_frees
from coreml_sd.mil.exact_fusion import find_exact_fusions
from coreml_sd.mil.fusion import FUSION_KINDS, find_fusions
from coreml_sd.mil.package import MilProgram, TensorSpec
from coreml_sd.mil.precision import Precision, make_precision

log = logging.getLogger(__name__)


class Executor:
    """Executes one ML program function on `device` in precision mode `exact` or `fast`."""

    def __init__(self, program: MilProgram, *, device: str = "cpu", precision_mode: str = "fast",
                 fast_dtype: str | None = None, fuse: bool | None = None):
        """`fuse` (default on): fast mode runs decomposed attention and GroupNorm as single torch
        kernels (`fusion.py`); exact mode runs attention chains in query blocks that keep every
        op's fp16 rounding (`exact_fusion.py`)."""
        self.device = torch.device(device)
        self.precision: Precision = make_precision(precision_mode, self.device, fast_dtype)
        self.path = program.path
        self.inputs: tuple[TensorSpec, ...] = program.inputs
        self.outputs: tuple[TensorSpec, ...] = program.outputs
        self.enumerated = dict(program.enumerated)  # input -> the shapes it takes (Core ML enumerated shapes)
        finder = find_exact_fusions if self.precision.exact else find_fusions
        fusions = finder(program.function) if fuse is None or fuse else {}
        graph = compile_function(program.function, self.precision, self.device, fusions)
        groups = {id(f): f for f in fusions.values()}.values()
        self.fused = {kind: sum(1 for f in groups if f.name == kind) for kind in FUSION_KINDS}
        prepare_steps, run_steps = split_constant_steps(graph)
        table = _materialize(graph, prepare_steps, self.device)
        # Keep only what the per-call steps read: decompression inputs (indices, tables) go.
        needed = {a for s in run_steps for a in s.args} | set(graph.outputs.values())
        self._table = [value if i in needed else None for i, value in enumerate(table)]
        self._input_slots = graph.inputs
        self._input_dtypes = graph.input_dtypes
        self._output_slots = graph.outputs
        self._steps = with_frees(run_steps, set(graph.outputs.values()))

    # -- calls ------------------------------------------------------------------------------
    def __call__(self, inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Run the program; `inputs` maps input names to numpy arrays or torch tensors.

        Returns the outputs by name as torch tensors on this executor's device (floating outputs
        as float32).
        """
        env = list(self._table)
        for name, value in self._check_inputs(inputs).items():
            env[self._input_slots[name]] = value
        with torch.inference_mode():
            for step in self._steps:
                _execute_step(step, env)
                for slot in step.free:
                    env[slot] = None
        return {name: _as_output(env[slot]) for name, slot in self._output_slots.items()}

    def _check_inputs(self, inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        expected = {spec.name: spec for spec in self.inputs}
        unknown = sorted(set(inputs) - set(expected))
        missing = sorted(set(expected) - set(inputs))
        if unknown or missing:
            raise InputError(
                f"{self.path.name}: "
                + (f"unknown input(s) {', '.join(map(repr, unknown))}; " if unknown else "")
                + (f"missing input(s) {', '.join(map(repr, missing))}; " if missing else "")
                + f"valid inputs: {'; '.join(s.describe() for s in self.inputs)}"
            )
        return {name: self._input_tensor(expected[name], value) for name, value in inputs.items()}

    def _input_tensor(self, spec: TensorSpec, value) -> torch.Tensor:
        tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
        shape = tuple(tensor.shape)
        if len(shape) != len(spec.shape) or any(e is not None and e != f for e, f in zip(spec.shape, shape)):
            raise InputError(
                f"{self.path.name}: input {spec.name!r} expects shape {_fmt_shape(spec.shape)}, "
                f"found {_fmt_shape(shape)}"
            )
        listed = self.enumerated.get(spec.name)
        if listed and shape not in listed:
            raise InputError(f"{self.path.name}: input {spec.name!r} takes the shapes "
                             f"{', '.join(_fmt_shape(s) for s in listed)} (enumerated); found {_fmt_shape(shape)}")
        if _kind(tensor.dtype) != _mil_kind(spec.dtype):
            raise InputError(
                f"{self.path.name}: input {spec.name!r} expects {_mil_kind(spec.dtype)} values ({spec.dtype}), "
                f"found {str(tensor.dtype).replace('torch.', '')}"
            )
        tensor = tensor.to(self.device)
        return tensor.to(self._input_dtypes[spec.name])

    def describe(self) -> str:
        return f"mil {self.device.type} {self.precision.describe()}"

    @property
    def num_steps(self) -> int:
        return len(self._steps)


def _execute_step(step: Step, env: list) -> None:
    result = step.fn(*[env[i] for i in step.args])
    if len(step.outs) == 1:
        result = (result,)
    for slot, value, dtype in zip(step.outs, result, step.dtypes):
        env[slot] = value if value.dtype == dtype else value.to(dtype)


TRIM_BYTES = 32 * 2**20  # converted weight bytes between returning mapped file pages to the OS


def _materialize(graph: Graph, prepare_steps: list[Step], device: torch.device) -> list:
    """The slot table with every constant, and everything computable from constants, filled in.

    Weights in the package's own dtype stay views of the mapped weight file (`weights.py`); the
    file pages of converted ones are handed back as it goes, so both copies are never resident."""
    from coreml_sd.mil.weights import trim_mapped

    table: list = [None] * graph.n_slots
    converted = 0
    with warnings.catch_warnings():
        # Weights read from the package are read-only numpy buffers; constants are never written.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for slot, (value, _, dtype) in graph.constants.items():
            table[slot] = _constant_tensor(value, dtype, device)
            if isinstance(value, np.ndarray) and not _shares_memory(table[slot], value):
                converted += value.nbytes
                if converted >= TRIM_BYTES:
                    trim_mapped()
                    converted = 0
    if converted:
        trim_mapped()
    with torch.inference_mode():
        for step in prepare_steps:
            _execute_step(step, table)
    return table


def materialize_constants(program: MilProgram, names, *, device: str = "cpu", precision_mode: str = "exact",
                          fast_dtype: str | None = None) -> dict[str, torch.Tensor]:
    """The values of the program's constant vars `names` (e.g. decompressed weights), as an
    executor with these settings holds them."""
    dev = torch.device(device)
    precision = make_precision(precision_mode, dev, fast_dtype)
    graph = compile_function(program.function, precision, dev)
    prepare_steps, _ = split_constant_steps(graph)
    table = _materialize(graph, prepare_steps, dev)
    missing = [n for n in names if n not in graph.names or table[graph.names[n]] is None]
    if missing:
        raise InputError(f"not constants of the program: {', '.join(map(repr, missing))}")
    return {n: table[graph.names[n]] for n in names}


def _constant_tensor(value, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    array = np.asarray(value)
    if array.dtype == np.uint16:
        array = array.astype(np.int32)
    tensor = torch.from_numpy(np.ascontiguousarray(array)) if array.ndim else torch.tensor(array.item())
    return tensor.to(device=device, dtype=dtype)


def _shares_memory(tensor: torch.Tensor, array: np.ndarray) -> bool:
    return tensor.device.type == "cpu" and array.size > 0 and tensor.data_ptr() == array.ctypes.data


def _as_output(value: torch.Tensor) -> torch.Tensor:
    return value.float() if value.is_floating_point() and value.dtype != torch.float32 else value


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    return "float" if dtype.is_floating_point else "integer"


def _mil_kind(mil_dtype: str) -> str:
    if mil_dtype == "bool":
        return "bool"
    return "float" if mil_dtype.startswith("fp") else "integer"


def _fmt_shape(shape) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"

