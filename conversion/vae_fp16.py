"""A VAE decoder that stays finite in fp16: the same function, its activations scaled down where they are big.

SDXL's VAE overflows in fp16: inside the decoder's up blocks its activations reach values whose
squares (GroupNorm's variance) or even the values themselves exceed fp16's 65504, so an fp16
decode gives inf, then NaN, then a black image — the known failure of Apple's converter (which
therefore converts SDXL's decoder in fp32 for the GPU) and of diffusers in fp16 (which decodes in
fp32: `force_upcast`). The community fix, madebyollin's "sdxl-vae-fp16-fix", fine-tunes the VAE so
that its activations are smaller; its images differ slightly from the original's.

This module does it exactly instead. Every activation that can be big in the decoder either sits
on the residual stream (the input of every GroupNorm of a level, added to by each resnet and the
attention) or is a resnet's first convolution's output (the input of its second GroupNorm). Every
GroupNorm is scale invariant once its epsilon scales with the square: GN(s x; s^2 eps) = GN(x; eps).
So the residual stream of a level can be carried at scale s (s = 2^-k: exact in fp16) by scaling
what writes to it (conv_in, each resnet's conv2 and shortcut bias, the attention's output
projection, the upsampler that starts the level, from the previous level's scale), and a resnet's
inner activation at scale t by scaling its conv1 — the function computed is unchanged in real
arithmetic, and the images agree with the original decoder's to fp16 rounding. The scales come
from the peaks of the fp32 decoder on latents of test images (`calibration_latents`); a site whose
peak is small keeps scale 1, so decoders that never overflow (SD 1.x's) are left as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# GroupNorm squares x - mean (|x - mean| <= 2 max|x|): with max|x| above RISK the squares come
# within 16x of fp16's largest value (65504) on the calibration images, too close for images not
# seen. Scaled sites are brought down to TARGET (64x headroom on the squares' way to overflow).
RISK = 64.0
TARGET = 16.0
FP16_TINY = 2.0**-24  # the smallest fp16 subnormal: a GroupNorm epsilon must not round to 0


@dataclass(frozen=True)
class Fp16Scales:
    """Power-of-two scales: per level of the decoder (its residual stream) and per resnet's inner activation."""

    streams: tuple[float, ...]
    inner: dict[str, float] = field(default_factory=dict)  # resnet module path -> scale of its conv1 output
    peaks: dict[str, float] = field(default_factory=dict)  # measured fp32 peaks (diagnostics)

    @property
    def identity(self) -> bool:
        return all(s == 1.0 for s in self.streams) and all(t == 1.0 for t in self.inner.values())

    def to_dict(self) -> dict:
        return {"streams": list(self.streams), "inner": {k: v for k, v in self.inner.items() if v != 1.0},
                "peak": round(max(self.peaks.values()), 2) if self.peaks else None,
                "scaled_peak": round(self.scaled_peak(), 3) if self.peaks else None}

    def scaled_peak(self) -> float:
        """The largest activation after scaling, on the calibration latents."""
        out = 0.0
        for site, peak in self.peaks.items():
            kind, _, rest = site.partition(":")
            scale = self.inner.get(rest, 1.0) if kind == "inner" else self.streams[int(kind[len("stream"):])]
            out = max(out, peak * scale)
        return out


def _levels(decoder) -> list[list[tuple[str, Any]]]:
    """The decoder's modules that write to the residual stream, grouped by level (name, module)."""
    first = [("conv_in", decoder.conv_in)]
    first += [(f"mid_block.resnets.{i}", r) for i, r in enumerate(decoder.mid_block.resnets)]
    if hasattr(decoder.mid_block, "attentions"):
        first.insert(2, ("mid_block.attentions.0", decoder.mid_block.attentions[0]))
    levels = [first]
    for i, block in enumerate(decoder.up_blocks):
        levels[-1] += [(f"up_blocks.{i}.resnets.{j}", r) for j, r in enumerate(block.resnets)]
        if hasattr(block, "upsamplers"):
            levels.append([(f"up_blocks.{i}.upsamplers.0", block.upsamplers[0])])
    return levels


def measure_peaks(rewrite, latents: np.ndarray) -> dict[str, float]:
    """max |activation| of every stream writer ("stream<level>:<name>") and resnet inner activation
    ("inner:<name>") of a rewritten VAE decoder (conversion.ane.vae.VAEDecoder) in fp32."""
    import torch

    peaks: dict[str, float] = {}
    handles = []

    def record(key):
        def hook(module, args, output):
            peaks[key] = max(peaks.get(key, 0.0), float(output.detach().abs().max()))
        return hook

    decoder = rewrite.decoder
    for level, writers in enumerate(_levels(decoder)):
        for name, module in writers:
            handles.append(module.register_forward_hook(record(f"stream{level}:{name}")))
            if "resnets" in name.split("."):
                handles.append(module.conv1.register_forward_hook(record(f"inner:{name}")))
    rewrite.compute_dtype_override = torch.float32
    try:
        with torch.inference_mode():
            for z in latents:
                rewrite(torch.from_numpy(np.asarray(z[None], np.float32)))
    finally:
        rewrite.compute_dtype_override = None
        for h in handles:
            h.remove()
    return peaks


def _scale_for(peak: float) -> float:
    return 1.0 if peak <= RISK else 2.0 ** -math.ceil(math.log2(peak / TARGET))


def choose_scales(peaks: dict[str, float], levels: int) -> Fp16Scales:
    streams = []
    for level in range(levels):
        level_peaks = [p for k, p in peaks.items() if k.startswith(f"stream{level}:")]
        streams.append(_scale_for(max(level_peaks, default=0.0)))
    inner = {k.split(":", 1)[1]: _scale_for(p) for k, p in peaks.items() if k.startswith("inner:")}
    return Fp16Scales(tuple(streams), inner, dict(peaks))


def _scale_param(module, name: str, factor: float) -> None:
    """Replace a parameter by a scaled copy (the rewrite shares tensors with the upstream module)."""
    import torch

    old = getattr(module, name)
    if old is None or factor == 1.0:
        return
    setattr(module, name, torch.nn.Parameter(old.detach() * factor, requires_grad=False))


def _scale_eps(norm, factor: float) -> None:
    norm.eps = max(norm.eps * factor * factor, FP16_TINY) if factor != 1.0 else norm.eps


def apply_scales(rewrite, scales: Fp16Scales) -> None:
    """Carry the decoder's residual streams and resnet inner activations at `scales` (same function)."""
    decoder = rewrite.decoder
    levels = _levels(decoder)
    if len(levels) != len(scales.streams):
        raise ValueError(f"{len(scales.streams)} stream scales for a decoder of {len(levels)} levels")
    for level, writers in enumerate(levels):
        s = scales.streams[level]
        for name, module in writers:
            if name == "conv_in":
                _scale_param(module, "weight", s)
                _scale_param(module, "bias", s)
            elif name.endswith("upsamplers.0"):  # reads the previous level's stream, starts this one's
                _scale_param(module.conv, "weight", s / scales.streams[level - 1])
                _scale_param(module.conv, "bias", s)
            elif "attentions" in name:
                _scale_eps(module.group_norm, s)
                _scale_param(module.to_out[0], "weight", s)
                _scale_param(module.to_out[0], "bias", s)
            else:
                t = scales.inner.get(name, 1.0)
                _scale_eps(module.norm1, s)
                _scale_param(module.conv1, "weight", t)
                _scale_param(module.conv1, "bias", t)
                _scale_eps(module.norm2, t)
                _scale_param(module.conv2, "weight", s)
                _scale_param(module.conv2, "bias", s)
                if module.conv_shortcut is not None:  # its input is already at scale s
                    _scale_param(module.conv_shortcut, "bias", s)
    _scale_eps(decoder.conv_norm_out, scales.streams[-1])


def fp16_safe(rewrite, latents: np.ndarray) -> Fp16Scales:
    """Measure the decoder on `latents` and rescale it in place where fp16 would overflow."""
    peaks = measure_peaks(rewrite, latents)
    scales = choose_scales(peaks, len(_levels(rewrite.decoder)))
    if not scales.identity:
        apply_scales(rewrite, scales)
    return scales


# -- test images for calibration and for the gate ----------------------------------------------
def test_images(height: int, width: int) -> np.ndarray:
    """(N, 3, H, W) images in [-1, 1] that drive a VAE to its large activations: saturated colour bars,
    hard black/white edges, a smooth gradient, and fine high-contrast noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    bars = np.stack([((x * 7 // max(width, 1)).astype(int) >> b) & 1 for b in range(3)]).astype(np.float32)
    checker = (((x // max(width // 8, 1)) + (y // max(height // 8, 1))) % 2).astype(np.float32)
    gradient = np.stack([x / max(width - 1, 1), y / max(height - 1, 1), 1 - x / max(width - 1, 1)])
    noise = (np.random.default_rng(0).random((3, height, width)) > 0.5).astype(np.float32)
    images = np.stack([bars, np.stack([checker] * 3), gradient, noise]).astype(np.float32)
    return images * 2.0 - 1.0


def calibration_latents(vae, height: int, width: int, seed: int = 0) -> np.ndarray:
    """The latent means (N, C, h, w) of `test_images`, from the model's own VAE encoder in fp32, the
    images' latents pushed 1.5x further from zero (sampling ends a little off the encoder's means),
    and seeded N(0, 1) latents (the gate decodes noise too: conversion.verify.test_latents)."""
    import torch

    from conversion.verify import seeded_latents

    with torch.inference_mode():
        images = torch.from_numpy(test_images(height, width)).to(next(vae.parameters()).dtype)
        means = torch.cat([vae.encode(img[None]).latent_dist.mean for img in images]).float().numpy()
    noise = seeded_latents(means.shape[1:], seed)
    return np.concatenate([means, means * 1.5, noise]).astype(np.float32)
