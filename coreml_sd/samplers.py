"""Samplers: pure functions that walk a latent down a list of noise levels with a denoiser.

Each sampler is a generator `fn(denoiser, x, sigmas, noise)` in the style of k-diffusion's
`sample_*` functions: `x` is the latent at noise level `sigmas[0]`, `denoiser(x, sigma)` returns
the model's estimate of x0, `noise(shape)` returns standard-normal noise like `x` (ancestral
samplers only), and the latent is yielded after every step. Only arithmetic operators, Python
floats and `coreml_sd.arrays` touch the arrays, so the same code runs on numpy arrays (Core ML,
no torch) and torch tensors; randomness comes only from `noise`.

Each sampler works on the latent in the form the diffusers scheduler it reproduces keeps, so that
the UNet sees the very latents diffusers' pipeline would give it: Euler-style samplers in sigma
space (`x0 + sigma * eps`, k-diffusion's), DDIM and DPM-Solver in the model's own scale
(`(x0 + sigma * eps) / sqrt(sigma**2 + 1)`, via `denoiser.scaled`). `SamplerInfo.model_scale`
says which. Both end on the finished latent for the VAE. tests/test_samplers.py shows each equal
to its diffusers scheduler (`SamplerInfo.diffusers`) to float32 rounding.
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
    """DDIM with eta = 0 (Song et al. 2020) on model-scale latents; in sigma space it is an Euler step."""
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        # With `targets` the step lands where diffusers' DDIM lands (t - num_train_timesteps //
        # steps), and the next step reads that latent at sigma_next, as diffusers does.
        target = sigma_next if targets is None else targets[i]
        denoised = denoiser.scaled(x, sigma)
        alpha, alpha_to = 1.0 / (sigma**2 + 1.0), 1.0 / (target**2 + 1.0)  # alphas_cumprod
        eps = (x - denoised * math.sqrt(alpha)) / math.sqrt(1.0 - alpha)
        x = denoised * math.sqrt(alpha_to) + eps * math.sqrt(1.0 - alpha_to)
        yield x


def dpmpp_2m(denoiser, x, sigmas: Sequence[float], noise: NoiseFn | None = None) -> Iterator:
    """DPM-Solver++(2M), the multistep second-order data-prediction solver (Lu et al. 2022), on model-scale latents."""
    old_denoised, h_last = None, None
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = denoiser.scaled(x, sigma)
        if sigma_next == 0:
            # The last step, to sigma 0, is first order (diffusers' final_sigmas_type="zero"):
            # the exponential integrator then lands exactly on the data estimate.
            x = denoised
        else:
            # In model scale x = alpha * x0 + s * eps with alpha = 1 / sqrt(sigma**2 + 1),
            # s = sigma * alpha; the step size h is in log-SNR, lambda = -log(sigma).
            alpha_next = 1.0 / math.sqrt(sigma_next**2 + 1.0)
            ratio = (sigma_next * alpha_next) / (sigma / math.sqrt(sigma**2 + 1.0))
            h = math.log(sigma) - math.log(sigma_next)
            coef = alpha_next * math.expm1(-h)
            x = x * ratio - denoised * coef
            if old_denoised is not None:
                # Second order: extrapolate the data estimate from the previous step's (midpoint form).
                r = h_last / h
                x = x - (denoised - old_denoised) * (0.5 * coef / r)
            h_last = h
        old_denoised = denoised
        yield x


@dataclass(frozen=True)
class SamplerInfo:
    """A sampler and how users and diffusers know it."""

    function: Callable[..., Iterator]
    display_name: str  # AUTOMATIC1111's name, written into image metadata
    ancestral: bool  # draws fresh noise every step, so needs `noise`
    model_scale: bool  # works on model-scale latents (DDIM, DPM-Solver), else on sigma-space ones
    plan_style: str  # whose timesteps it walks: "euler", "ddim" or "dpm" (coreml_sd.schedules)
    diffusers: str  # the diffusers scheduler it reproduces


SAMPLERS: dict[str, SamplerInfo] = {
    "euler_a": SamplerInfo(euler_a, "Euler a", True, False, "euler", "EulerAncestralDiscreteScheduler"),
    "euler": SamplerInfo(euler, "Euler", False, False, "euler", "EulerDiscreteScheduler"),
    "ddim": SamplerInfo(ddim, "DDIM", False, True, "ddim", "DDIMScheduler"),
    "dpmpp_2m": SamplerInfo(dpmpp_2m, "DPM++ 2M", False, True, "dpm",
                            'DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)'),
}


def sample(name: str, denoiser, x, plan, noise: NoiseFn | None = None) -> Iterator:
    """Run sampler `name` over `plan` from `x` = noise * plan.init_noise_sigma; yield the latent after each step.

    The latents are those diffusers' pipeline holds after each step (sigma space or model scale,
    see `SamplerInfo.model_scale`); the last one is the finished latent for the VAE.
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
    yield from info.function(denoiser, x, plan.sigmas, noise, **extra)


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
