"""Gathers (coremltools `ops/defs/iOS15|16|17/scatter_gather.py`).

Indices may be negative (counted from the end) and of any integer type. `batch_dims` (iOS16+)
treats the first dims of x and indices as a shared batch, as tf.gather / tf.gather_nd do.
"""

from __future__ import annotations

import math

import torch

from coreml_sd.mil.registry import OpView, register_op


def _wrap(index: torch.Tensor, size) -> torch.Tensor:
    index = index.long()
    return torch.where(index < 0, index + size, index)


def gather_tensor(x: torch.Tensor, index: torch.Tensor, axis: int, batch_dims: int) -> torch.Tensor:
    axis = axis % x.dim()
    index = _wrap(index, x.shape[axis])
    out_shape = tuple(x.shape[:axis]) + tuple(index.shape[batch_dims:]) + tuple(x.shape[axis + 1:])
    if batch_dims == 0:
        return x.index_select(axis, index.reshape(-1)).reshape(out_shape)
    # x -> (B, P, A, S), index -> (B, M): out[b, p, m, s] = x[b, p, index[b, m], s]
    b = math.prod(x.shape[:batch_dims])
    p = math.prod(x.shape[batch_dims:axis])
    s = math.prod(x.shape[axis + 1:])
    m = math.prod(index.shape[batch_dims:])
    x4 = x.reshape(b, p, x.shape[axis], s)
    i4 = index.reshape(b, 1, m, 1).expand(b, p, m, s)
    return torch.gather(x4, 2, i4).reshape(out_shape)


@register_op("gather")
def gather(op: OpView):
    axis, batch_dims = op.const_int("axis", 0), op.const_int("batch_dims", 0)
    return op.kernel(lambda x, i: gather_tensor(x, i, axis, batch_dims), "x", "indices")


@register_op("gather_along_axis")
def gather_along_axis(op: OpView):
    axis = op.const_int("axis", 0)
    return op.kernel(lambda x, i: torch.gather(x, axis, _wrap(i, x.shape[axis])), "x", "indices")


def gather_nd_tensor(x: torch.Tensor, index: torch.Tensor, batch_dims: int) -> torch.Tensor:
    depth = index.shape[-1]
    inner = tuple(x.shape[batch_dims:batch_dims + depth])
    rest = tuple(x.shape[batch_dims + depth:])
    sizes = torch.tensor(inner, device=x.device)
    index = _wrap(index, sizes)
    strides = torch.tensor([math.prod(inner[i + 1:]) for i in range(depth)], device=x.device)
    flat = (index * strides).sum(-1)  # row-major position within the indexed dims
    b = math.prod(x.shape[:batch_dims])
    xf = x.reshape(b, math.prod(inner), math.prod(rest))
    picked = xf[torch.arange(b, device=x.device).unsqueeze(1), flat.reshape(b, -1)]
    return picked.reshape(tuple(index.shape[:-1]) + rest)


@register_op("gather_nd")
def gather_nd(op: OpView):
    batch_dims = op.const_int("batch_dims", 0)
    return op.kernel(lambda x, i: gather_nd_tensor(x, i, batch_dims), "x", "indices")
