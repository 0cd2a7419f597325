"""Seeded noise that equals torch's CPU generator, computed with numpy.

`NoiseSource(seed).randn(shape)` returns what `torch.randn(shape, generator=torch.Generator("cpu")
.manual_seed(seed))` returns (to the float32 rounding of Box-Muller's log and cos, where torch's own
AVX2 and scalar kernels differ from each other too: up to ~3e-6),
and successive calls continue the same stream as successive torch calls do. So initial latents
equal diffusers' for the same seed, ancestral noise comes from an explicit per-image source, and a
Mac generating through Core ML gets the same images without torch installed.

torch's CPU `normal_` for a float32 tensor of 16 or more elements: draw one 32-bit Mersenne
Twister word per element, keep 24 bits as a uniform in [0, 1), then Box-Muller over blocks of 16
(the first 8 of each block give the radii, the last 8 the angles). When the size is not a
multiple of 16, the last 16 values are redrawn and recomputed.

Where torch is already imported (the torch and mil backends), the stream is drawn by torch's own
generator instead, so latents equal diffusers' bit for bit; the numpy path (Core ML on a Mac
without torch) differs from it by a few float32 ulps in some elements. Both are the same
Mersenne Twister stream, so the images agree to rounding.
"""

from __future__ import annotations

import math
import sys

import numpy as np

_MASK24 = (1 << 24) - 1
_MIN_VECTOR_SIZE = 16


def _normal_blocks(u: np.ndarray) -> np.ndarray:
    """Box-Muller over rows of 16 uniforms, in float32 as torch computes it."""
    u = u.reshape(-1, 16)
    radius = np.sqrt(np.float32(-2.0) * np.log(np.float32(1.0) - u[:, :8]))
    theta = np.float32(2.0 * math.pi) * u[:, 8:]
    return np.concatenate([radius * np.cos(theta), radius * np.sin(theta)], axis=1).reshape(-1)


class NoiseSource:
    """A stream of standard-normal float32 noise, identical to torch's CPU generator with this seed."""

    def __init__(self, seed: int, *, engine: str = "auto"):
        if not 0 <= int(seed) < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), got {seed}")
        if engine not in ("auto", "numpy", "torch"):
            raise ValueError(f"engine must be auto, numpy or torch; got {engine!r}")
        self.seed = int(seed)
        # auto: torch's generator when torch is loaded anyway (never import it just for noise).
        self.engine = ("torch" if "torch" in sys.modules else "numpy") if engine == "auto" else engine
        if self.engine == "torch":
            import torch

            self._torch = torch.Generator("cpu").manual_seed(self.seed)
            return
        self._bits = np.random.MT19937(0)
        # torch seeds its mt19937 with the low 32 bits (init_genrand), as numpy's legacy seeding does.
        self._bits._legacy_seeding(self.seed & 0xFFFFFFFF)

    def _uniform(self, n: int) -> np.ndarray:
        words = self._bits.random_raw(n).astype(np.uint32)
        return (words & _MASK24).astype(np.float32) * np.float32(2.0**-24)

    def randn(self, shape) -> np.ndarray:
        shape = tuple(int(s) for s in shape)
        n = math.prod(shape)
        if n < _MIN_VECTOR_SIZE:
            raise ValueError(f"noise of fewer than {_MIN_VECTOR_SIZE} elements is not supported (shape {shape})")
        if self.engine == "torch":
            import torch

            return torch.randn(shape, generator=self._torch, dtype=torch.float32).numpy()
        out = np.empty(n, dtype=np.float32)
        whole = n - n % 16
        uniforms = self._uniform(n)
        out[:whole] = _normal_blocks(uniforms[:whole])
        if whole != n:
            out[whole:] = uniforms[whole:]
            out[n - 16 :] = _normal_blocks(self._uniform(16))
        return out.reshape(shape)
