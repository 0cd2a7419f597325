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

from numpy.polynomial import Polynomial

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


def heun(denoiser, x, sigmas: Sequence[float], noise: NoiseFn | None = None) -> Iterator:
    """Heun's second-order method on the probability-flow ODE (Karras et al. 2022, Algorithm 1 without churn)."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = denoiser(x, sigma)
        derivative = (x - denoised) / sigma
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = x + derivative * dt  # no model at sigma 0: the last step is Euler's
        else:
            x_euler = x + derivative * dt
            derivative_next = (x_euler - denoiser(x_euler, sigma_next)) / sigma_next
            x = x + (derivative + derivative_next) / 2 * dt
        yield x


def lms(denoiser, x, sigmas: Sequence[float], noise: NoiseFn | None = None, *, order: int = 4) -> Iterator:
    """Linear multistep (Adams-Bashforth over sigma) of up to 4th order, k-diffusion's LMS sampler."""
    derivatives = []
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        denoised = denoiser(x, sigma)
        derivatives.insert(0, (x - denoised) / sigma)  # newest first
        del derivatives[order:]
        coefficients = lms_coefficients(sigmas, i, len(derivatives))
        update = derivatives[0] * coefficients[0]
        for coefficient, derivative in zip(coefficients[1:], derivatives[1:]):
            update = update + derivative * coefficient
        x = x + update
        yield x


def lms_coefficients(sigmas: Sequence[float], i: int, order: int) -> list[float]:
    """Integrals over [sigmas[i], sigmas[i + 1]] of the Lagrange basis through sigmas[i], ..., sigmas[i - order + 1]."""
    nodes = [float(sigmas[i - k]) for k in range(order)]
    out = []
    for j, node in enumerate(nodes):
        basis = Polynomial([1.0])
        for k, other in enumerate(nodes):
            if k != j:
                basis = basis * Polynomial([-other, 1.0]) / (node - other)
        antiderivative = basis.integ()
        out.append(float(antiderivative(sigmas[i + 1]) - antiderivative(sigmas[i])))
    return out


def dpmpp_2m_sde(denoiser, x, sigmas: Sequence[float], noise: NoiseFn | None = None) -> Iterator:
    """DPM-Solver++(2M) SDE (Lu et al. 2022), midpoint form, eta = 1, on model-scale latents."""
    old_denoised, h_last = None, None
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = denoiser.scaled(x, sigma)
        if sigma_next == 0:
            x = denoised  # first order to sigma 0: no noise left to add
        else:
            alpha_next = 1.0 / math.sqrt(sigma_next**2 + 1.0)
            s_next, s = sigma_next * alpha_next, sigma / math.sqrt(sigma**2 + 1.0)
            h = math.log(sigma) - math.log(sigma_next)
            coef = alpha_next * -math.expm1(-2.0 * h)
            x = x * (s_next / s * math.exp(-h)) + denoised * coef
            if old_denoised is not None:
                x = x + (denoised - old_denoised) * (0.5 * coef / (h_last / h))
            x = x + noise(tuple(x.shape)) * (s_next * math.sqrt(-math.expm1(-2.0 * h)))
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
    "heun": SamplerInfo(heun, "Heun", False, False, "euler", "HeunDiscreteScheduler"),
    "lms": SamplerInfo(lms, "LMS", False, False, "euler", "LMSDiscreteScheduler"),
    "dpmpp_2m_sde": SamplerInfo(dpmpp_2m_sde, "DPM++ 2M SDE", True, True, "dpm",
                                'DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=2)'),
}


def sample(name: str, denoiser, x, plan, noise: NoiseFn | None = None) -> Iterator:
    """Run sampler `name` over `plan` from `x` = noise * plan.init_noise_sigma: an iterator over the latent after each step.

    The latents are those diffusers' pipeline holds after each step (sigma space or model scale,
    see `SamplerInfo.model_scale`); the last one is the finished latent for the VAE. Arguments
    are checked here, before the first step runs.
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
    return info.function(denoiser, x, plan.sigmas, noise, **extra)


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
