"""Convolutions and pooling (coremltools `ops/defs/iOS15/conv.py`, `pool.py`).

MIL pads are per spatial dimension as (before, after) pairs, first spatial dimension first;
`same` puts an odd extra row/column after, `same_lower` before (`ops/defs/_utils.aggregated_pad`).
Symmetric pads go to the torch call; asymmetric ones become an explicit `F.pad` first.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from coreml_sd.mil.registry import OpView, register_op

PAD_TYPES = ("valid", "custom", "same", "same_lower")
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def same_pads(in_sizes, kernel, strides, dilations, lower: bool) -> list[int]:
    """(before, after) per spatial dim so that out = ceil(in / stride)."""
    pads = []
    for size, k, s, d in zip(in_sizes, kernel, strides, dilations):
        effective = (k - 1) * d + 1
        total = max(0, s * math.ceil(size / s) - size + effective - s)
        small, big = total // 2, total - total // 2
        pads += [big, small] if lower else [small, big]
    return pads


def _resolve_pads(op: OpView, kernel, strides, dilations) -> list[int]:
    n = len(kernel)
    pad_type = op.const_str("pad_type", "valid").lower()
    if pad_type == "valid":
        return [0] * 2 * n
    if pad_type == "custom":
        return list(op.const_ints("pad", (0,) * 2 * n))
    if pad_type in ("same", "same_lower"):
        spatial = op.shape("x")[2:]
        if any(d is None for d in spatial):
            raise op.error("'same' padding needs static spatial input sizes")
        return same_pads(spatial, kernel, strides, dilations, pad_type == "same_lower")
    raise op.error(f"pad_type {pad_type!r} is unknown; valid: {', '.join(PAD_TYPES)}")


def _split_pads(pads: list[int]):
    """(symmetric padding for torch, explicit F.pad tuple or None)."""
    befores, afters = pads[0::2], pads[1::2]
    if befores == afters:
        return tuple(befores), None
    return (0,) * len(befores), _as_explicit(befores, afters)


@register_op("conv")
def conv(op: OpView):
    n = op.rank("x") - 2
    if n not in _CONV:
        raise op.error(f"conv over {n} spatial dims is not supported (1 to 3)")
    kernel = op.shape("weight")[2:]
    strides = op.const_ints("strides", (1,) * n)
    dilations = op.const_ints("dilations", (1,) * n)
    groups = op.const_int("groups", 1)
    padding, explicit = _split_pads(_resolve_pads(op, kernel, strides, dilations))
    fn = _CONV[n]

    def run(x, w, b=None):
        if explicit is not None:
            x = F.pad(x, explicit)
        return fn(x, w, b, strides, padding, dilations, groups)

    args = ("x", "weight", "bias") if op.has("bias") else ("x", "weight")
    return op.kernel(run, *args)


@register_op("conv_transpose")
def conv_transpose(op: OpView):
    n = op.rank("x") - 2
    if n not in _CONV_T:
        raise op.error(f"conv_transpose over {n} spatial dims is not supported (1 to 3)")
    strides = op.const_ints("strides", (1,) * n)
    dilations = op.const_ints("dilations", (1,) * n)
    groups = op.const_int("groups", 1)
    out_sizes = op.out_shape()[2:]
    if any(d is None for d in out_sizes):
        raise op.error("conv_transpose needs a static output shape")
    befores = _transpose_crop(op, n, out_sizes, strides, dilations)
    fn = _CONV_T[n]

    def run(x, w, b=None):
        full = fn(x, w, None, strides, 0, 0, groups, dilations)
        out = _crop_or_extend(full, befores, out_sizes)
        return out if b is None else out + b.reshape((1, -1) + (1,) * n)

    args = ("x", "weight", "bias") if op.has("bias") else ("x", "weight")
    return op.kernel(run, *args)


def _transpose_crop(op: OpView, n: int, out_sizes, strides, dilations) -> list[int]:
    """Rows removed before each spatial dim of the full transposed convolution."""
    pad_type = op.const_str("pad_type", "valid").lower()
    if pad_type == "custom":
        return list(op.const_ints("pad", (0,) * 2 * n))[0::2]
    if pad_type == "valid":
        return [0] * n
    if pad_type == "same":
        kernel = op.shape("weight")[2:]
        in_sizes = op.shape("x")[2:]
        fulls = [(i - 1) * s + (k - 1) * d + 1 for i, s, k, d in zip(in_sizes, strides, kernel, dilations)]
        return [max(0, f - o) // 2 for f, o in zip(fulls, out_sizes)]
    raise op.error(f"conv_transpose pad_type {pad_type!r} is unknown; valid: valid, custom, same")


def _crop_or_extend(full: torch.Tensor, befores, out_sizes) -> torch.Tensor:
    n = len(out_sizes)
    for i, (before, size) in enumerate(zip(befores, out_sizes)):
        dim = full.dim() - n + i
        have = full.shape[dim] - before
        full = full.narrow(dim, before, min(size, have))
        if have < size:  # torch's output_padding: rows beyond the full result only get the bias
            pad = [0, 0] * (full.dim() - dim - 1) + [0, size - have]
            full = F.pad(full, pad)
    return full


_POOL = {
    ("avg", 1): F.avg_pool1d, ("avg", 2): F.avg_pool2d, ("avg", 3): F.avg_pool3d,
    ("max", 1): F.max_pool1d, ("max", 2): F.max_pool2d, ("max", 3): F.max_pool3d,
}


@register_op("avg_pool", "max_pool", "l2_pool")
def pool(op: OpView):
    n = op.rank("x") - 2
    kernel = op.const_ints("kernel_sizes")
    strides = op.const_ints("strides", (1,) * n)
    ceil_mode = op.const_bool("ceil_mode", False)
    pads = _resolve_pads(op, kernel, strides, (1,) * n)
    befores, afters = pads[0::2], pads[1::2]
    # torch pads implicitly only symmetrically and by at most half the window.
    native = befores == afters and all(p <= k // 2 for p, k in zip(befores, kernel))
    if not native and ceil_mode:
        raise op.error("ceil_mode with asymmetric padding or padding over half the window is not supported")
    padding = tuple(befores) if native else (0,) * n
    explicit = None if native else _as_explicit(befores, afters)
    if op.type == "max_pool":
        return op.kernel(_max_pool(_POOL[("max", n)], kernel, strides, padding, explicit, ceil_mode), "x")
    exclude = op.type == "avg_pool" and op.const_bool("exclude_padding_from_average", False)
    avg = _avg_pool(_POOL[("avg", n)], kernel, strides, padding, explicit, ceil_mode, exclude)
    if op.type == "avg_pool":
        return op.kernel(avg, "x")
    window = math.prod(kernel)
    return op.kernel(lambda x: torch.sqrt(avg(x * x) * window), "x")


def _max_pool(fn, kernel, strides, padding, explicit, ceil_mode):
    def run(x):
        if explicit is not None:
            x = F.pad(x, explicit, value=-math.inf)
        return fn(x, kernel, strides, padding, ceil_mode=ceil_mode)

    return run


def _avg_pool(fn, kernel, strides, padding, explicit, ceil_mode, exclude):
    def run(x):
        if explicit is None:
            return fn(x, kernel, strides, padding, ceil_mode=ceil_mode, count_include_pad=not exclude)
        y = fn(F.pad(x, explicit), kernel, strides, 0)
        if exclude:  # divide by the number of real (unpadded) elements under each window instead
            ones = torch.ones((1, 1) + tuple(x.shape[2:]), dtype=x.dtype, device=x.device)
            y = y / fn(F.pad(ones, explicit), kernel, strides, 0)
        return y

    return run


def _as_explicit(befores, afters) -> tuple:
    """MIL (before, after) pairs as F.pad's tuple, which lists the last dimension first."""
    explicit = []
    for before, after in zip(reversed(befores), reversed(afters)):
        explicit += [before, after]
    return tuple(explicit)
