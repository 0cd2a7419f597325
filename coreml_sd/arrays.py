"""The few array operations the sampling loop needs, for numpy arrays and torch tensors alike.

Samplers and the denoiser use only arithmetic operators plus the helpers here, so the same code
runs on numpy (Core ML on a Mac, no torch installed) and on torch tensors (torch and mil backends).
torch is never imported here: a tensor is recognised by its type's module.
"""

from __future__ import annotations

import numpy as np


def is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def concat(xs, axis: int = 0):
    if is_torch(xs[0]):
        import torch

        return torch.cat(list(xs), dim=axis)
    return np.concatenate(xs, axis=axis)


def split(x, sections: int, axis: int = 0):
    if is_torch(x):
        return list(x.chunk(sections, dim=axis))
    return np.split(x, sections, axis=axis)


def to_numpy(x) -> np.ndarray:
    if is_torch(x):
        import torch

        x = x.detach()
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        return x.cpu().numpy()
    return np.asarray(x)


def like(value: np.ndarray, ref):
    """`value` (numpy, float32) as an array of the same kind, device and dtype as `ref`."""
    if is_torch(ref):
        import torch

        return torch.from_numpy(np.ascontiguousarray(value)).to(device=ref.device, dtype=ref.dtype)
    return np.asarray(value, dtype=ref.dtype)


def full_like(ref, fill: float, shape):
    if is_torch(ref):
        import torch

        return torch.full(shape, float(fill), device=ref.device, dtype=torch.float32)
    return np.full(shape, fill, dtype=np.float32)


def landed(x, sent):
    """The latent a sampler continues from after `sent = yield x`: the caller's replacement if it sent
    one (inpainting blends the unmasked area between steps, as diffusers' pipeline does), else x."""
    return x if sent is None else sent


def resize_bilinear(x, size: tuple[int, int]):
    """(B, C, h, w) -> (B, C, *size), bilinear with half-pixel centres and no antialiasing
    (torch's interpolate(mode="bilinear", align_corners=False)), for numpy arrays and torch tensors."""
    if is_torch(x):
        import torch.nn.functional as F

        return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    x = np.asarray(x)
    out_h, out_w = size

    def axis(n_in: int, n_out: int):
        pos = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0.0)
        lo = np.minimum(np.floor(pos).astype(np.int64), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (pos - lo).astype(x.dtype)

    y0, y1, wy = axis(x.shape[2], out_h)
    x0, x1, wx = axis(x.shape[3], out_w)
    rows = x[:, :, y0] * (1 - wy)[:, None] + x[:, :, y1] * wy[:, None]
    return rows[:, :, :, x0] * (1 - wx) + rows[:, :, :, x1] * wx
