"""Reductions (coremltools `ops/defs/iOS15/reduction.py`, iOS17 `reduce_arg`).

`reduce_*` take `axes` (default: all) and `keep_dims` (default False); the arg-reductions take
one `axis` (default -1) and return int32 indices of the first extreme value.
"""

from __future__ import annotations

import torch

from coreml_sd.mil.registry import OpView, register_op


def _prod(x, dims, keep):
    for d in sorted(dims, reverse=True):
        x = torch.prod(x, dim=d, keepdim=keep)
    return x


def _mean(x, dims, keep):
    if not x.is_floating_point():
        return torch.mean(x.double(), dim=dims, keepdim=keep).to(x.dtype)
    return torch.mean(x, dim=dims, keepdim=keep)


_REDUCE = {
    "reduce_sum": lambda x, d, k: torch.sum(x, dim=d, keepdim=k),
    "reduce_mean": _mean,
    "reduce_max": lambda x, d, k: torch.amax(x, dim=d, keepdim=k),
    "reduce_min": lambda x, d, k: torch.amin(x, dim=d, keepdim=k),
    "reduce_prod": _prod,
    "reduce_sum_square": lambda x, d, k: torch.sum(x * x, dim=d, keepdim=k),
    "reduce_l1_norm": lambda x, d, k: torch.sum(torch.abs(x), dim=d, keepdim=k),
    "reduce_l2_norm": lambda x, d, k: torch.sqrt(torch.sum(x * x, dim=d, keepdim=k)),
    "reduce_log_sum": lambda x, d, k: torch.log(torch.sum(x, dim=d, keepdim=k)),
    "reduce_log_sum_exp": lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k),
}


@register_op(*_REDUCE)
def reduce(op: OpView):
    rank = op.rank("x")
    axes = op.const_ints("axes", None)
    dims = tuple(range(rank)) if axes is None else tuple(a % rank for a in axes) if rank else ()
    keep = op.const_bool("keep_dims", False)
    fn = _REDUCE[op.type]
    if not dims:  # nothing to reduce (rank-0 input)
        return op.kernel(lambda x: x, "x")
    return op.kernel(lambda x: fn(x, dims, keep), "x")


@register_op("reduce_argmax", "reduce_argmin")
def reduce_arg(op: OpView):
    axis = op.const_int("axis", -1)
    keep = op.const_bool("keep_dims", False)
    fn = torch.argmax if op.type == "reduce_argmax" else torch.argmin
    out = op.out_torch_dtype()
    return op.kernel(lambda x: fn(x, dim=axis, keepdim=keep).to(out), "x")
