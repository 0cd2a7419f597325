"""Samplers: pure functions that walk a latent down a list of noise levels with a denoiser.

Each sampler is a generator `fn(denoiser, x, sigmas, noise)` in the style of k-diffusion's
`sample_*` functions: `x` is the latent at noise level `sigmas[0]` in sigma ("VE") space
(`x = x0 + sigma * eps`), `denoiser(x, sigma)` returns the model's estimate of x0, `noise(shape)`
returns standard-normal noise like `x` (ancestral samplers only), and the latent is yielded after
every step. Only arithmetic operators, Python floats and `coreml_sd.arrays` touch the arrays, so
the same code runs on numpy arrays (Core ML, no torch) and torch tensors; randomness comes only
from `noise`.

`sample()` is what callers use: it takes a `SamplingPlan` and yields each step's latent in the
model's own scale (`x / sqrt(sigma**2 + 1)`, what diffusers' DDIM and DPM-Solver carry and what
the VAE decodes); the last one is the result. Each sampler equals a diffusers scheduler, named in
`SamplerInfo.diffusers`, to float32 rounding (tests/test_samplers.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from coreml_sd.errors import InputError, choices_text

# noise(shape) -> standard-normal array of that shape, of the same kind/device/dtype as the latents.
NoiseFn = Callable[[tuple], Any]


def euler(denoiser, x, sigmas: Sequence[float], noise: NoiseFn | None = None) -> Iterator:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn)."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = denoiser(x, sigma)
        derivative = (x - denoised) / sigma
        x = x + derivative * (sigma_next - sigma)
        yield x


def euler_a(denoiser, x, sigmas: Sequence[float], noise: NoiseFn | None = None) -> Iterator:
    """Euler Ancestral: an Euler step down to sigma_down, then fresh noise up to sigma_next (k-diffusion, eta=1)."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = denoiser(x, sigma)
        # Split sigma_next**2 = sigma_down**2 + sigma_up**2 so that the step removes exactly the
        # noise DDPM's posterior would and the added noise restores the marginal at sigma_next.
        sigma_down = sigma_next**2 / sigma
        sigma_up = math.sqrt(max(sigma_next**2 - sigma_down**2, 0.0))
        x = x + (x - denoised) / sigma * (sigma_down - sigma)
        if sigma_next > 0:
            x = x + noise(tuple(x.shape)) * sigma_up
        yield x


def ddim(denoiser, x, sigmas: Sequence[float], noise: NoiseFn | None = None, *,
         targets: Sequence[float] | None = None) -> Iterator:
    """DDIM with eta = 0 (Song et al. 2020), written as what it is in sigma space: an Euler step."""
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        target = sigma_next if targets is None else targets[i]
        denoised = denoiser(x, sigma)
        x = denoised + (x - denoised) * (target / sigma)
        if target != sigma_next:
            # diffusers' DDIM landed at `target` but reads the latent (a VP latent, x / sqrt(s**2+1))
            # as if it were at sigma_next on the next step: re-express it there.
            x = x * math.sqrt((sigma_next**2 + 1.0) / (target**2 + 1.0))
        yield x


def dpmpp_2m(denoiser, x, sigmas: Sequence[float], noise: NoiseFn | None = None) -> Iterator:
    """DPM-Solver++(2M), the multistep second-order data-prediction solver (Lu et al. 2022)."""
    old_denoised, h_last = None, None
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = denoiser(x, sigma)
        if sigma_next == 0:
            # The last step to sigma 0 is first order (diffusers' final_sigmas_type="zero"):
            # the exponential integrator then lands exactly on the data estimate.
            x = denoised
        else:
            h = math.log(sigma) - math.log(sigma_next)  # step in log-SNR: lambda = -log(sigma)
            if old_denoised is None:
                d = denoised
            else:
                r = h_last / h
                d = denoised * (1.0 + 1.0 / (2.0 * r)) - old_denoised * (1.0 / (2.0 * r))
            x = x * (sigma_next / sigma) - d * math.expm1(-h)
            h_last = h
        old_denoised = denoised
        yield x


@dataclass(frozen=True)
class SamplerInfo:
    """A sampler and how users and diffusers know it."""

    function: Callable[..., Iterator]
    display_name: str  # AUTOMATIC1111's name, written into image metadata
    ancestral: bool  # draws fresh noise every step, so needs `noise`
    plan_style: str  # whose timesteps it walks: "euler", "ddim" or "dpm" (coreml_sd.schedules)
    diffusers: str  # the diffusers scheduler it reproduces


SAMPLERS: dict[str, SamplerInfo] = {
    "euler_a": SamplerInfo(euler_a, "Euler a", True, "euler", "EulerAncestralDiscreteScheduler"),
    "euler": SamplerInfo(euler, "Euler", False, "euler", "EulerDiscreteScheduler"),
    "ddim": SamplerInfo(ddim, "DDIM", False, "ddim", "DDIMScheduler"),
    "dpmpp_2m": SamplerInfo(dpmpp_2m, "DPM++ 2M", False, "dpm",
                            'DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)'),
}


def sample(name: str, denoiser, x, plan, noise: NoiseFn | None = None) -> Iterator:
    """Run sampler `name` over `plan` from latents `x` (noise * plan.init_noise_sigma); yield each step's latent.

    Yielded latents are in the model's scale (x / sqrt(sigma**2 + 1) at the step's noise level);
    the last one is the finished latent for the VAE.
    """
    if name not in SAMPLERS:
        raise InputError(f"unknown sampler {name!r}; valid samplers: {choices_text(SAMPLERS)}")
    info = SAMPLERS[name]
    if info.ancestral and noise is None:
        raise InputError(f"sampler {name!r} draws noise every step: pass noise=<callable(shape) -> array>")
    extra = {}
    if plan.targets is not None:
        if info.plan_style != "ddim":
            raise InputError(f"this plan was made for DDIM (it has landing targets), not for {name!r}")
        extra["targets"] = plan.targets
    sigmas = plan.sigmas
    for i, x in enumerate(info.function(denoiser, x, sigmas, noise, **extra)):
        sigma_next = sigmas[i + 1]
        yield x if sigma_next == 0 else x * (1.0 / math.sqrt(sigma_next**2 + 1.0))


def noise_from_sources(sources: Sequence, asarray: Callable[[Any], Any]) -> NoiseFn:
    """noise(shape) for a batch: row i drawn from sources[i] (e.g. NoiseSource(seed + i)), as
    diffusers draws from a list of generators, so any image can be reproduced alone."""
    from coreml_sd.arrays import concat

    def noise(shape):
        shape = tuple(int(s) for s in shape)
        if shape[0] != len(sources):
            raise InputError(f"noise for a batch of {shape[0]} requested from {len(sources)} noise sources")
        return asarray(concat([src.randn((1,) + shape[1:]) for src in sources]))

    return noise
