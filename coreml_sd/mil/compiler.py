"""Compiling a MIL function into steps: kernels with integer slots, dtypes and lifetimes.

Values live in one flat list indexed by slot, so a call is a tight loop of kernel calls with no
name lookups. A step runs one op (or one fused group of ops, see `fusion.py`); it knows the dtype
each output is stored in, whether `exact` mode rounds it to fp16, which inputs need a cast, and
which slots die after it.

In `fast` mode with a reduced-precision compute dtype, fp16 values small enough to be free
(`SMALL` elements: timestep embeddings, scales, biases, statistics) are kept in fp32. bf16's
8-bit mantissa would otherwise ruin e.g. sin(t * f) for t near 1000, which torch eager computes
in fp32 too; big activations and weights stay in the compute dtype. Where a small fp32 value
meets a big op, it is cast to the compute dtype at that boundary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from coreml_sd.errors import ModelError
from coreml_sd.mil.fusion import Fusion
from coreml_sd.mil.precision import Precision
from coreml_sd.mil.registry import OpView, lookup, mil_dtype_name

SMALL = 16384  # elements


@dataclass(frozen=True)
class Step:
    fn: Callable[..., Any]
    args: tuple[int, ...]
    outs: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]  # storage dtype of each output (fp16 storage rounds, exact mode)
    name: str
    op_type: str
    free: tuple[int, ...] = ()  # slots whose last reader is this step


@dataclass
class Graph:
    """The compiled function, before constants are materialized."""

    steps: list[Step]  # in program order
    n_slots: int
    constants: dict[int, tuple[Any, str, torch.dtype]]  # slot -> (numpy value, MIL dtype, storage dtype)
    inputs: dict[str, int]
    input_dtypes: dict[str, torch.dtype]
    outputs: dict[str, int]
    names: dict[str, int]  # var name -> slot, for every value that has one


@dataclass
class _Pending:
    """A step before the dtype plan is complete (constants' dtypes depend on all readers)."""

    kernel: Any
    op: Any
    op_type: str
    keeps_values: bool
    args: tuple[int, ...]
    arg_vars: tuple
    outs: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]
    compute: torch.dtype | None  # dtype its fp16-typed inputs should have; None: no fp16 outputs


def numel(var) -> int | None:
    shape = getattr(var, "shape", ())
    if not all(isinstance(d, int) for d in shape):
        return None
    return math.prod(shape)


def storage_dtype(precision: Precision, var) -> torch.dtype:
    """The dtype a value of `var`'s type is kept in (see the module docstring)."""
    mil_dtype = mil_dtype_name(var)
    if mil_dtype == "fp16" and precision.mode == "fast" and precision.half != torch.float32:
        size = numel(var)
        if size is not None and size <= SMALL:
            return torch.float32
    return precision.torch_dtype(mil_dtype)


def compile_function(function, precision: Precision, device: torch.device,
                     fusions: dict[int, Fusion] | None = None) -> Graph:
    """Steps for every op of `function` (a coremltools Function), with slots for all values.

    `fusions` (from `fusion.find_fusions`) maps ops to the fused group replacing them; the group
    runs where its last op would have.
    """
    fusions = fusions or {}
    slots: dict[int, int] = {}  # id(Var) -> slot
    const_vars: dict[int, Any] = {}  # slot -> Var
    inputs, input_dtypes = {}, {}
    for name, var in function.inputs.items():
        inputs[name] = slots.setdefault(id(var), len(slots))
        input_dtypes[name] = storage_dtype(precision, var)

    def slot_of(var, op_name: str) -> int:
        if id(var) in slots:
            return slots[id(var)]
        if var.val is None:
            raise ModelError(f"op {op_name!r} reads {var.name!r}, which no earlier op of the program computes")
        slot = slots[id(var)] = len(slots)
        const_vars[slot] = var
        return slot

    pending, names = [], dict(inputs)
    remaining = {id(f): len(f.ops) for f in fusions.values()}
    for op in function.operations:
        if op.op_type == "const" or all(v.val is not None for v in op.outputs):
            continue  # constant values: materialized from `.val` where an op reads them
        fusion = fusions.get(id(op))
        if fusion is not None:
            remaining[id(fusion)] -= 1
            if remaining[id(fusion)]:
                continue
            pending.append(_pending(fusion.kernel, op, fusion.name, False, precision, slot_of, slots))
        else:
            entry = lookup(op.op_type, op.name)
            dtypes = [storage_dtype(precision, v) for v in op.outputs]
            kernel = entry.build(OpView(op, precision, device, dtypes))
            pending.append(_pending(kernel, op, op.op_type, entry.keeps_values, precision, slot_of, slots))
        names.update((var.name, slots[id(var)]) for var in op.outputs)
    outputs = {var.name: slot_of(var, "output") for var in function.outputs}
    constants = _constant_plan(const_vars, pending, precision)
    value_dtypes = {slot: entry[2] for slot, entry in constants.items()}
    value_dtypes.update((inputs[n], d) for n, d in input_dtypes.items())
    steps = [_finish(p, value_dtypes, precision) for p in pending]
    return Graph(steps, len(slots), constants, inputs, input_dtypes, outputs, names)


def _pending(kernel, op, op_type: str, keeps_values: bool, precision: Precision, slot_of, slots) -> _Pending:
    args = tuple(slot_of(var, op.name) for var in kernel.args)
    outs = tuple(slots.setdefault(id(var), len(slots)) for var in op.outputs)
    dtypes = tuple(storage_dtype(precision, var) for var in op.outputs)
    half_outputs = [d for var, d in zip(op.outputs, dtypes) if mil_dtype_name(var) == "fp16"]
    compute = None
    if half_outputs and precision.exact:
        compute = precision.exact_compute(op_type, keeps_values)
    elif half_outputs:
        compute = torch.float32 if all(d == torch.float32 for d in half_outputs) else precision.half
    return _Pending(kernel, op, op_type, keeps_values, args, tuple(kernel.args), outs, dtypes, compute)


def _constant_plan(const_vars: dict, pending: list[_Pending], precision: Precision) -> dict:
    """slot -> (value, MIL dtype, storage dtype). Fast mode: an fp16 constant is stored in fp32 when
    every reader computes in fp32 (the time-embedding weights, say), else in the half dtype: cast
    once here rather than on every call. Exact mode keeps fp16 weights fp16 (shared with the
    package file, see `weights.py`) and casts them where an op computes in fp32: memory over the
    cost of a cast per call (the parity gate calls once)."""
    if precision.exact:
        return {slot: (var.val, mil_dtype_name(var), storage_dtype(precision, var)) for slot, var in const_vars.items()}
    fp32_only: dict[int, bool] = {}
    for p in pending:
        if p.compute is None:
            continue
        for slot in p.args:
            if slot in const_vars:
                fp32_only[slot] = fp32_only.get(slot, True) and p.compute == torch.float32
    plan = {}
    for slot, var in const_vars.items():
        dtype = storage_dtype(precision, var)
        if mil_dtype_name(var) == "fp16" and slot in fp32_only:
            dtype = torch.float32 if fp32_only[slot] else precision.half
        plan[slot] = (var.val, mil_dtype_name(var), dtype)
    return plan


def _finish(p: _Pending, value_dtypes: dict[int, torch.dtype], precision: Precision) -> Step:
    # fp16-typed inputs are brought to the step's compute dtype where they are stored otherwise
    # (matrix ops need one dtype; a small fp32 value meeting a big op is cast down).
    casts = []
    if p.compute is not None:
        for index, (slot, var) in enumerate(zip(p.args, p.arg_vars)):
            have = value_dtypes.get(slot)
            if mil_dtype_name(var) == "fp16" and have is not None and have != p.compute:
                casts.append((index, p.compute))
    for slot, dtype in zip(p.outs, p.dtypes):
        value_dtypes[slot] = dtype
    fn = _with_casts(p.kernel.fn, tuple(casts)) if casts else p.kernel.fn
    return Step(fn, p.args, p.outs, p.dtypes, p.op.name, p.op_type)


def _with_casts(fn, casts: tuple):
    def run(*args):
        args = list(args)
        for index, dtype in casts:
            args[index] = args[index].to(dtype)
        return fn(*args)

    return run


def split_constant_steps(graph: Graph) -> tuple[list[Step], list[Step]]:
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


def with_frees(steps: list[Step], keep: set[int]) -> list[Step]:
    """The steps with `free` set: each produced value is dropped after its last reader."""
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
        Step(s.fn, s.args, s.outs, s.dtypes, s.name, s.op_type, tuple(f))
        for s, f in zip(steps, frees)
    ]
