"""Running a loaded ML program op by op with torch kernels.

Compiling (once per executor) walks the program's `main` function and turns every op into a step:
a kernel from the registry plus integer slots for its inputs and outputs. Values live in one flat
list indexed by slot, so a call is a tight loop of kernel calls with no name lookups.

* Constants (weights, and anything computable from them alone: decompression ops, folded shape
  math) are materialized once per executor in the dtype and on the device it runs with, and
  never again per call.
* Each intermediate value is dropped right after its last reader, so peak memory is the weights
  plus the live activations, as in eager torch.
* `exact` mode rounds the output of every op whose type is fp16 to fp16 (see `precision.py`).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import torch

from coreml_sd.errors import InputError, ModelError
from coreml_sd.mil.fusion import FUSION_KINDS, Fusion, find_fusions
from coreml_sd.mil.package import MilProgram, TensorSpec
from coreml_sd.mil.precision import Precision, make_precision
from coreml_sd.mil.registry import OpView, lookup, mil_dtype_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Step:
    fn: Callable[..., Any]
    args: tuple[int, ...]
    outs: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]  # storage dtype of each output
    rounds: tuple[bool, ...]  # round this output to fp16 (exact mode)
    name: str
    op_type: str


@dataclass
class _Graph:
    """The compiled form before constants are materialized."""

    steps: list[Step]  # in program order
    n_slots: int
    constants: dict[int, tuple[Any, str]]  # slot -> (numpy value, MIL dtype)
    inputs: dict[str, int]
    outputs: dict[str, int]
    names: dict[str, int]  # var name -> slot, for every value that has one


class Executor:
    """Executes one ML program function on `device` in precision mode `exact` or `fast`."""

    def __init__(self, program: MilProgram, *, device: str = "cpu", precision_mode: str = "fast",
                 fast_dtype: str | None = None, fuse: bool | None = None):
        """`fuse` (default: on in fast mode) runs decomposed attention and GroupNorm as single
        torch kernels (see `fusion.py`); exact mode cannot fuse."""
        self.device = torch.device(device)
        self.precision: Precision = make_precision(precision_mode, self.device, fast_dtype)
        if fuse and self.precision.rounds_fp16:
            raise InputError("fusing ops is for precision mode 'fast'; exact mode rounds after every op")
        self.path = program.path
        self.inputs: tuple[TensorSpec, ...] = program.inputs
        self.outputs: tuple[TensorSpec, ...] = program.outputs
        fusions = find_fusions(program.function) if (fuse is None and not self.precision.rounds_fp16) or fuse else {}
        graph = compile_function(program.function, self.precision, self.device, fusions)
        groups = {id(f): f for f in fusions.values()}.values()
        self.fused = {kind: sum(1 for f in groups if f.name == kind) for kind in FUSION_KINDS}
        prepare_steps, run_steps = _split_constant_steps(graph)
        table = _materialize(graph, prepare_steps, self.precision, self.device)
        # Keep only what the per-call steps read: decompression inputs (indices, tables) go.
        needed = {a for s in run_steps for a in s.args} | set(graph.outputs.values())
        self._table = [value if i in needed else None for i, value in enumerate(table)]
        self._input_slots = graph.inputs
        self._output_slots = graph.outputs
        self._steps = _with_frees(run_steps, set(graph.outputs.values()))

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
        if _kind(tensor.dtype) != _mil_kind(spec.dtype):
            raise InputError(
                f"{self.path.name}: input {spec.name!r} expects {_mil_kind(spec.dtype)} values ({spec.dtype}), "
                f"found {str(tensor.dtype).replace('torch.', '')}"
            )
        tensor = tensor.to(self.device)
        if spec.dtype == "fp16" and self.precision.rounds_fp16:
            tensor = tensor.to(torch.float16)
        return tensor.to(self.precision.torch_dtype(spec.dtype))

    def describe(self) -> str:
        return f"mil {self.device.type} {self.precision.describe()}"

    @property
    def num_steps(self) -> int:
        return len(self._steps)


def _execute_step(step: Step, env: list) -> None:
    result = step.fn(*[env[i] for i in step.args])
    if len(step.outs) == 1:
        result = (result,)
    for slot, value, dtype, rounds in zip(step.outs, result, step.dtypes, step.rounds):
        if value.dtype != dtype:
            value = value.to(dtype)
        if rounds:
            value = value.to(torch.float16).to(dtype)
        env[slot] = value


def _materialize(graph: _Graph, prepare_steps: list[Step], precision: Precision, device: torch.device) -> list:
    """The slot table with every constant, and everything computable from constants, filled in."""
    table: list = [None] * graph.n_slots
    with warnings.catch_warnings():
        # Weights read from the package are read-only numpy buffers; constants are never written.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for slot, (value, mil_dtype) in graph.constants.items():
            table[slot] = _constant_tensor(value, precision.torch_dtype(mil_dtype), device)
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
    prepare_steps, _ = _split_constant_steps(graph)
    table = _materialize(graph, prepare_steps, precision, dev)
    missing = [n for n in names if n not in graph.names or table[graph.names[n]] is None]
    if missing:
        raise InputError(f"not constants of the program: {', '.join(map(repr, missing))}")
    return {n: table[graph.names[n]] for n in names}


def compile_function(function, precision: Precision, device: torch.device,
                     fusions: dict[int, Fusion] | None = None) -> _Graph:
    """Steps for every op of `function` (a coremltools Function), with slots for all values.

    `fusions` (from `fusion.find_fusions`) maps ops to the fused group replacing them; the group
    runs where its last op would have.
    """
    fusions = fusions or {}
    slots: dict[int, int] = {}  # id(Var) -> slot
    constants: dict[int, tuple[Any, str]] = {}
    inputs = {}
    for name, var in function.inputs.items():
        inputs[name] = slots.setdefault(id(var), len(slots))

    def slot_of(var, op_name: str) -> int:
        if id(var) in slots:
            return slots[id(var)]
        if var.val is None:
            raise ModelError(f"op {op_name!r} reads {var.name!r}, which no earlier op of the program computes")
        slot = slots[id(var)] = len(slots)
        constants[slot] = (var.val, mil_dtype_name(var))
        return slot

    steps, names = [], dict(inputs)
    pending = {id(f): len(f.ops) for f in fusions.values()}
    for op in function.operations:
        if op.op_type == "const" or all(v.val is not None for v in op.outputs):
            continue  # constant values: materialized from `.val` where an op reads them
        fusion = fusions.get(id(op))
        if fusion is not None:
            pending[id(fusion)] -= 1
            if pending[id(fusion)]:
                continue
            steps.append(_compile_fusion(fusion, op, precision, slot_of, slots))
        else:
            steps.append(_compile_op(op, precision, device, slot_of, slots))
        names.update((var.name, slots[id(var)]) for var in op.outputs)
    outputs = {var.name: slot_of(var, "output") for var in function.outputs}
    return _Graph(steps, len(slots), constants, inputs, outputs, names)


def _compile_op(op, precision: Precision, device, slot_of, slots: dict) -> Step:
    entry = lookup(op.op_type, op.name)
    kernel = entry.build(OpView(op, precision, device))
    return _step(kernel, op, precision, slot_of, slots, keeps_values=entry.keeps_values, op_type=op.op_type)


def _compile_fusion(fusion: Fusion, last_op, precision: Precision, slot_of, slots: dict) -> Step:
    return _step(fusion.kernel, last_op, precision, slot_of, slots, keeps_values=False, op_type=fusion.name)


def _step(kernel, op, precision: Precision, slot_of, slots: dict, *, keeps_values: bool, op_type: str) -> Step:
    args = tuple(slot_of(var, op.name) for var in kernel.args)
    outs, dtypes, rounds = [], [], []
    for var in op.outputs:
        outs.append(slots.setdefault(id(var), len(slots)))
        mil_dtype = mil_dtype_name(var)
        dtypes.append(precision.torch_dtype(mil_dtype))
        rounds.append(precision.rounds_fp16 and mil_dtype == "fp16" and not keeps_values)
    return Step(kernel.fn, args, tuple(outs), tuple(dtypes), tuple(rounds), op.name, op_type)


def _split_constant_steps(graph: _Graph) -> tuple[list[Step], list[Step]]:
    """Steps whose inputs are all constant (weight decompression, folded math) run at setup."""
    constant_slots = set(graph.constants)
    prepare, run = [], []
    for step in graph.steps:
        if all(a in constant_slots for a in step.args):
            prepare.append(step)
            constant_slots.update(step.outs)
        else:
            run.append(step)
    return prepare, run


@dataclass(frozen=True)
class _RunStep:
    fn: Callable[..., Any]
    args: tuple[int, ...]
    outs: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]
    rounds: tuple[bool, ...]
    free: tuple[int, ...]  # slots whose last reader is this step
    name: str
    op_type: str


def _with_frees(steps: list[Step], keep: set[int]) -> list[_RunStep]:
    last_use: dict[int, int] = {}
    produced = set()
    for index, step in enumerate(steps):
        for slot in step.args:
            last_use[slot] = index
        produced.update(step.outs)
    frees: list[list[int]] = [[] for _ in steps]
    for slot, index in last_use.items():
        if slot in produced and slot not in keep:
            frees[index].append(slot)
    for index, step in enumerate(steps):  # outputs nobody reads (e.g. unused split parts)
        frees[index].extend(s for s in step.outs if s not in last_use and s not in keep)
    return [
        _RunStep(s.fn, s.args, s.outs, s.dtypes, s.rounds, tuple(f), s.name, s.op_type)
        for s, f in zip(steps, frees)
    ]


def _constant_tensor(value, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    array = np.asarray(value)
    if array.dtype == np.uint16:
        array = array.astype(np.int32)
    tensor = torch.from_numpy(np.ascontiguousarray(array)) if array.ndim else torch.tensor(array.item())
    return tensor.to(device=device, dtype=dtype)


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

