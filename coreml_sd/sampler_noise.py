"""Where a stochastic sampler's noise comes from: one seeded source per image row.

`ImageNoise` is the noise of a batch whose row i belongs to image i (seed + i): called with a
shape it continues each image's own generator stream after the initial latents, as diffusers'
schedulers and A1111's samplers do ("Euler a" and the like); `with_seed_delta` restarts the streams
at seed + delta, A1111's "Eta noise seed delta" (ENSD); `brownian` gives the Brownian-tree noise
A1111 feeds its SDE samplers, one tree per image seed (`coreml_sd.brownian`). Samplers see all of
them as k-diffusion's noise sampler, `noise(sigma, sigma_next)`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from coreml_sd.errors import InputError
from coreml_sd.rng import NoiseSource

MAX_SEED = 2**64  # NoiseSource (torch's generator) takes seeds in [0, 2**64)


class ImageNoise:
    """noise(shape) for a batch: row i drawn from sources[i] (e.g. NoiseSource(seed + i)), as
    diffusers draws from a list of generators, so any image can be reproduced alone."""

    def __init__(self, sources: Sequence[NoiseSource], asarray: Callable[[Any], Any]):
        self.sources = list(sources)
        self.asarray = asarray

    @property
    def seeds(self) -> list[int]:
        return [src.seed for src in self.sources]

    def __call__(self, shape):
        from coreml_sd.arrays import concat

        shape = tuple(int(s) for s in shape)
        if shape[0] != len(self.sources):
            raise InputError(f"noise for a batch of {shape[0]} requested from {len(self.sources)} noise sources")
        return self.asarray(concat([src.randn((1,) + shape[1:]) for src in self.sources]))

    def with_seed_delta(self, delta: int) -> "ImageNoise":
        """Fresh streams seeded seed + delta (A1111's ENSD: its sampler noise after the initial latents)."""
        engine = self.sources[0].engine if self.sources else "auto"
        return ImageNoise([NoiseSource((seed + int(delta)) % MAX_SEED, engine=engine) for seed in self.seeds],
                          self.asarray)

    def brownian(self, shape, sigma_min: float, sigma_max: float):
        """A1111's SDE noise: a Brownian tree over [sigma_min, sigma_max] per image, seeded by its seed."""
        from coreml_sd.brownian import BrownianNoise

        shape = tuple(int(s) for s in shape)
        if shape[0] != len(self.sources):
            raise InputError(f"noise for a batch of {shape[0]} requested from {len(self.sources)} noise sources")
        return BrownianNoise(self.seeds, shape[1:], sigma_min, sigma_max, self.asarray)


def zero_noise(sigma: float, sigma_next: float) -> float:
    """The noise of a sampler run at eta 0: the draws are multiplied by 0, so none are made."""
    return 0.0
