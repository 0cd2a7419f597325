"""Resizing of the last two dims (coremltools `ops/defs/iOS15|16/image_resizing.py`).

Bilinear sampling follows the grid formulas of MIL's `resize_bilinear` docstring for each
sampling mode, evaluated directly (source coordinate per output index, then a linear blend of the
two neighbours), so every mode is exact rather than approximated by a torch flag.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from coreml_sd.mil.registry import OpView, register_op

SAMPLING_MODES = ("DEFAULT", "STRICT_ALIGN_CORNERS", "ALIGN_CORNERS", "OFFSET_CORNERS", "UNALIGN_CORNERS")


def _as_4d(fn):
    """Apply `fn` to (N, C, H, W) views of a tensor of rank >= 3 (resizing its last two dims)."""

    def run(x):
        if x.dim() == 4:
            return fn(x)
        lead = x.shape[:-2]
        y = fn(x.reshape(-1, 1, x.shape[-2], x.shape[-1]))
        return y.reshape(tuple(lead) + tuple(y.shape[-2:]))

    return run


@register_op("upsample_nearest_neighbor")
def upsample_nearest_neighbor(op: OpView):
    sh, sw = op.const_float("scale_factor_height", 1.0), op.const_float("scale_factor_width", 1.0)
    out_h, out_w = op.out_shape()[-2:]
    if float(sh).is_integer() and float(sw).is_integer():
        # Integer factors repeat each pixel: exact whatever the input size (flexible sizes too).
        factors = (int(sh), int(sw))
        return op.kernel(_as_4d(lambda x: F.interpolate(x, scale_factor=factors, mode="nearest")), "x")
    if out_h is None or out_w is None:
        raise op.error("needs static output sizes for a fractional scale factor")

    def run(x):
        rows = _nearest_index(x.shape[-2], out_h, 1.0 / sh, x.device)
        cols = _nearest_index(x.shape[-1], out_w, 1.0 / sw, x.device)
        return x.index_select(-2, rows).index_select(-1, cols)

    return op.kernel(run, "x")


def _nearest_index(size_in: int, size_out: int, step: float, device) -> torch.Tensor:
    return torch.clamp((torch.arange(size_out, device=device, dtype=torch.float64) * step).floor().long(), max=size_in - 1)


@register_op("resize_nearest_neighbor")
def resize_nearest_neighbor(op: OpView):
    out_h, out_w = op.const_int("target_size_height"), op.const_int("target_size_width")

    def run(x):
        rows = _nearest_index(x.shape[-2], out_h, x.shape[-2] / out_h, x.device)
        cols = _nearest_index(x.shape[-1], out_w, x.shape[-1] / out_w, x.device)
        return x.index_select(-2, rows).index_select(-1, cols)

    return op.kernel(run, "x")


def grid_points(size_in: int, size_out: int, mode: str) -> torch.Tensor:
    """Source coordinates (float64) of each output position along one axis, per MIL's formulas."""
    i = torch.arange(size_out, dtype=torch.float64)
    if mode in ("STRICT_ALIGN_CORNERS", "ALIGN_CORNERS"):
        if size_out == 1:
            grid = torch.full((1,), (size_in - 1) / 2 if mode == "ALIGN_CORNERS" else 0.0, dtype=torch.float64)
        else:
            grid = i * (size_in - 1) / (size_out - 1)
    elif mode == "DEFAULT":
        grid = i * (size_in / size_out) if size_out == 1 else i * (size_in - size_in / size_out) / (size_out - 1)
    elif mode == "OFFSET_CORNERS":
        delta = max(1, size_in - 1) / size_out
        grid = 0.5 * delta + i * delta
    elif mode == "UNALIGN_CORNERS":
        spacing = size_in / size_out
        grid = i * spacing + 0.5 * spacing - 0.5
    elif mode == "LEGACY":  # upsample_bilinear with neither aligned corners nor half-pixel centres
        grid = i * (size_in / size_out)
    else:
        raise ValueError(mode)
    return grid.clamp(0, size_in - 1)


def _lerp_axis(x: torch.Tensor, dim: int, grid: torch.Tensor) -> torch.Tensor:
    lo = grid.floor().long()
    hi = torch.clamp(lo + 1, max=x.shape[dim] - 1)
    frac = (grid - lo).to(x.dtype)
    shape = [1] * x.dim()
    shape[dim] = -1
    a = x.index_select(dim, lo.to(x.device))
    b = x.index_select(dim, hi.to(x.device))
    return a + (b - a) * frac.to(x.device).reshape(shape)


def _bilinear(out_h: int, out_w: int, mode: str):
    def run(x):
        y = _lerp_axis(x, x.dim() - 2, grid_points(x.shape[-2], out_h, mode))
        return _lerp_axis(y, y.dim() - 1, grid_points(x.shape[-1], out_w, mode))

    return run


@register_op("resize_bilinear")
def resize_bilinear(op: OpView):
    mode = op.const_str("sampling_mode", "DEFAULT")
    if mode not in SAMPLING_MODES:
        raise op.error(f"sampling_mode {mode!r} is unknown; valid: {', '.join(SAMPLING_MODES)}")
    out_h, out_w = op.const_int("target_size_height", 1), op.const_int("target_size_width", 1)
    return op.kernel(_bilinear(out_h, out_w, mode), "x")


@register_op("upsample_bilinear")
def upsample_bilinear(op: OpView):
    align = op.const_bool("align_corners", True)
    half_pixel = op.const_bool("half_pixel_centers", not align)
    mode = "STRICT_ALIGN_CORNERS" if align else ("UNALIGN_CORNERS" if half_pixel else "LEGACY")
    out_h, out_w = op.out_shape()[-2:]
    if out_h is None or out_w is None:
        raise op.error("needs static output sizes")
    return op.kernel(_bilinear(out_h, out_w, mode), "x")
