"""Normalizations (coremltools `ops/defs/iOS15/normalization.py`).

`layer_norm` normalizes over any set of `axes`; gamma/beta have the shape of x on those axes, in
axis order. Trailing contiguous axes (the transformer case) go to `F.layer_norm`; other axes
(e.g. channels of a (B, C, 1, S) layout) use the formula, with statistics in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from coreml_sd.mil.registry import OpView, register_op


@register_op("layer_norm")
def layer_norm(op: OpView):
    rank = op.rank("x")
    axes = sorted(a % rank for a in op.const_ints("axes", tuple(range(rank))))
    eps = op.const_float("epsilon", 1e-5)
    names = ["x"] + [n for n in ("gamma", "beta") if op.has(n)]
    has_gamma, has_beta = op.has("gamma"), op.has("beta")
    if axes == list(range(rank - len(axes), rank)):
        shape = op.shape("x")[rank - len(axes):]
        if any(d is None for d in shape):
            shape = None  # taken from the tensor at run time

        def run(x, *params):
            gamma = params[0] if has_gamma else None
            beta = params[-1] if has_beta else None
            return F.layer_norm(x, shape or x.shape[rank - len(axes):], gamma, beta, eps)

        return op.kernel(run, *names)

    def run_axes(x, *params):
        x32 = x.float()
        var, mean = torch.var_mean(x32, dim=axes, keepdim=True, correction=0)
        y = (x32 - mean) * torch.rsqrt(var + eps)
        bshape = [x.shape[i] if i in axes else 1 for i in range(rank)]
        if has_gamma:
            y = y * params[0].float().reshape(bshape)
        if has_beta:
            y = y + params[-1].float().reshape(bshape)
        return y.to(x.dtype)

    return op.kernel(run_axes, *names)


@register_op("instance_norm")
def instance_norm(op: OpView):
    eps = op.const_float("epsilon", 1e-5)
    has_gamma, has_beta = op.has("gamma"), op.has("beta")
    names = ["x"] + [n for n in ("gamma", "beta") if op.has(n)]

    def run(x, *params):
        gamma = params[0] if has_gamma else None
        beta = params[-1] if has_beta else None
        return F.instance_norm(x, weight=gamma, bias=beta, eps=eps)

    return op.kernel(run, *names)


@register_op("batch_norm")
def batch_norm(op: OpView):
    eps = op.const_float("epsilon", 1e-5)
    has_gamma, has_beta = op.has("gamma"), op.has("beta")
    names = ["x", "mean", "variance"] + [n for n in ("gamma", "beta") if op.has(n)]

    def run(x, mean, var, *params):
        gamma = params[0] if has_gamma else None
        beta = params[-1] if has_beta else None
        return F.batch_norm(x, mean, var, gamma, beta, training=False, eps=eps)

    return op.kernel(run, *names)


@register_op("l2_norm")
def l2_norm(op: OpView):
    eps = op.const_float("epsilon", 1e-6)
    rank = op.rank("x")
    if rank < 3:
        raise op.error(f"l2_norm needs rank >= 3, found rank {rank}")

    def run(x):
        # The last three dims are normalized together; leading dims are batch.
        sq = torch.sum(x * x, dim=(-3, -2, -1), keepdim=True)
        return x / torch.sqrt(sq + eps)

    return op.kernel(run, "x")


@register_op("local_response_norm")
def local_response_norm(op: OpView):
    size = op.const_int("size")
    alpha, beta, k = op.const_float("alpha", 1e-4), op.const_float("beta", 0.75), op.const_float("k", 1.0)
    return op.kernel(lambda x: F.local_response_norm(x, size, alpha, beta, k), "x")
