"""Samplers: pure functions that walk a latent down a list of noise levels with a denoiser.

Each sampler is a generator `fn(denoiser, x, sigmas, noise, **options)` in the style of
k-diffusion's `sample_*` functions: `x` is the latent at noise level `sigmas[0]`,
`denoiser(x, sigma)` returns the model's estimate of x0, `noise(sigma, sigma_next)` returns
standard-normal noise like `x` for the step between those levels (k-diffusion's noise sampler;
stochastic samplers only), and the latent is yielded after every step. Only arithmetic operators,
Python floats and `coreml_sd.arrays` touch the arrays, so the same code runs on numpy arrays
(Core ML, no torch) and torch tensors; randomness comes only from `noise`.

The seven samplers diffusers also has work on the latent in the form its scheduler keeps, so that
the UNet sees the very latents diffusers' pipeline would give it: Euler-style samplers in sigma
space (`x0 + sigma * eps`, k-diffusion's), DDIM and DPM-Solver in the model's own scale
(`(x0 + sigma * eps) / sqrt(sigma**2 + 1)`, via `denoiser.scaled`). `SamplerInfo.model_scale`
says which; `sample` converts where a plan keeps the other form. tests/test_samplers.py shows
them equal to their diffusers schedulers (`SamplerInfo.diffusers`) to float32 rounding, and
tests/test_samplers_kdiffusion.py every sampler equal to k-diffusion's / A1111's.

The rest of AUTOMATIC1111's list lives beside this module (`samplers_kdiffusion`, `dpm_solver`,
`samplers_timesteps`); `SAMPLERS` below is the registry of all of them.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from numpy.polynomial import Polynomial

from coreml_sd import arrays, dpm_solver, samplers_kdiffusion as kd, samplers_timesteps as ts
from coreml_sd.errors import InputError, choices_text
from coreml_sd.sampler_noise import ImageNoise, zero_noise
from coreml_sd.samplers_kdiffusion import ancestral_step

# noise(shape) -> standard-normal array of that shape, of the same kind/device/dtype as the latents.
NoiseFn = Callable[[tuple], Any]
# noise(sigma, sigma_next) -> standard-normal array like the latents (k-diffusion's noise sampler).
IntervalNoise = Callable[[float, float], Any]


def euler(denoiser, x, sigmas: Sequence[float], noise: IntervalNoise | None = None) -> Iterator:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn)."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = denoiser(x, sigma)
        derivative = (x - denoised) / sigma
        x = x + derivative * (sigma_next - sigma)
        x = arrays.landed(x, (yield x))


def euler_a(denoiser, x, sigmas: Sequence[float], noise: IntervalNoise | None = None, *,
            eta: float = 1.0) -> Iterator:
    """Euler Ancestral: an Euler step down to sigma_down, then fresh noise up to sigma_next (k-diffusion)."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = denoiser(x, sigma)
        # sigma_next**2 = sigma_down**2 + sigma_up**2: at eta 1 the step removes exactly the noise
        # DDPM's posterior would and the added noise restores the marginal at sigma_next.
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = x + (x - denoised) / sigma * (sigma_down - sigma)
        if sigma_next > 0:
            x = x + noise(sigma, sigma_next) * sigma_up
        x = arrays.landed(x, (yield x))


def ddim(denoiser, x, sigmas: Sequence[float], noise: IntervalNoise | None = None, *,
         targets: Sequence[float] | None = None, eta: float = 0.0) -> Iterator:
    """DDIM (Song et al. 2020) on model-scale latents; at eta 0 it is an Euler step in sigma space."""
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        # With `targets` the step lands where diffusers' DDIM lands (t - num_train_timesteps //
        # steps), and the next step reads that latent at sigma_next, as diffusers does.
        target = sigma_next if targets is None else targets[i]
        denoised = denoiser.scaled(x, sigma)
        alpha, alpha_to = 1.0 / (sigma**2 + 1.0), 1.0 / (target**2 + 1.0)  # alphas_cumprod
        eps = (x - denoised * math.sqrt(alpha)) / math.sqrt(1.0 - alpha)
        if not eta:
            x = denoised * math.sqrt(alpha_to) + eps * math.sqrt(1.0 - alpha_to)
        else:
            # The DDIM paper's sigma_t: eta = 1 is DDPM's posterior variance.
            std = eta * math.sqrt((1.0 - alpha_to) / (1.0 - alpha) * (1.0 - alpha / alpha_to))
            x = (denoised * math.sqrt(alpha_to) + eps * math.sqrt(max(1.0 - alpha_to - std**2, 0.0))
                 + noise(sigma, target) * std)
        x = arrays.landed(x, (yield x))


def dpmpp_2m(denoiser, x, sigmas: Sequence[float], noise: IntervalNoise | None = None) -> Iterator:
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
        x = arrays.landed(x, (yield x))


def lcm(denoiser, x, sigmas: Sequence[float], noise: IntervalNoise | None = None, *,
        timesteps: Sequence[float], timestep_scaling: float = 10.0, sigma_data: float = 0.5) -> Iterator:
    """Latent Consistency Model sampling (Luo et al. 2023) as diffusers' LCMScheduler: on model-scale
    latents, each step takes the consistency function's x0 (the data estimate blended with the input
    by LCM's boundary condition at the step's integer timestep) and noises it to the next level;
    the last step returns it unnoised."""
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        denoised = denoiser.scaled(x, sigma)
        scaled_t = float(timesteps[i]) * timestep_scaling
        c_skip = sigma_data**2 / (scaled_t**2 + sigma_data**2)
        c_out = scaled_t / (scaled_t**2 + sigma_data**2) ** 0.5
        x = denoised * c_out + x * c_skip
        if sigma_next > 0:
            alpha_next = 1.0 / (sigma_next**2 + 1.0)  # alphas_cumprod at the next timestep
            x = x * math.sqrt(alpha_next) + noise(sigma, sigma_next) * math.sqrt(1.0 - alpha_next)
        yield x


def heun(denoiser, x, sigmas: Sequence[float], noise: IntervalNoise | None = None) -> Iterator:
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
        x = arrays.landed(x, (yield x))


def lms(denoiser, x, sigmas: Sequence[float], noise: IntervalNoise | None = None, *, order: int = 4) -> Iterator:
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
        x = arrays.landed(x, (yield x))


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


def dpmpp_2m_sde(denoiser, x, sigmas: Sequence[float], noise: IntervalNoise | None = None, *,
                 eta: float = 1.0, solver: str = "midpoint") -> Iterator:
    """DPM-Solver++(2M) SDE (Lu et al. 2022), midpoint or Heun form, on model-scale latents."""
    if solver not in ("midpoint", "heun"):
        raise ValueError(f"solver must be 'midpoint' or 'heun'; got {solver!r}")
    old_denoised, h_last = None, None
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = denoiser.scaled(x, sigma)
        if sigma_next == 0:
            x = denoised  # first order to sigma 0: no noise left to add
        else:
            # k-diffusion's sigma-space step times alpha_next (model scale); s = sigma * alpha.
            alpha_next = 1.0 / math.sqrt(sigma_next**2 + 1.0)
            s_next, s = sigma_next * alpha_next, sigma / math.sqrt(sigma**2 + 1.0)
            h = math.log(sigma) - math.log(sigma_next)
            eta_h = eta * h
            coef = alpha_next * -math.expm1(-h - eta_h)
            x = x * (s_next / s * math.exp(-eta_h)) + denoised * coef
            if old_denoised is not None:
                r = h_last / h
                if solver == "midpoint":
                    x = x + (denoised - old_denoised) * (0.5 * coef / r)
                else:
                    x = x + (denoised - old_denoised) * (alpha_next * (-math.expm1(-h - eta_h) / (-h - eta_h) + 1.0) / r)
            if eta:
                x = x + noise(sigma, sigma_next) * (s_next * math.sqrt(-math.expm1(-2.0 * eta_h)))
            h_last = h
        old_denoised = denoised
        x = arrays.landed(x, (yield x))


@dataclass(frozen=True)
class SamplerInfo:
    """A sampler, how users, diffusers and AUTOMATIC1111 know it, and A1111's options for it."""

    function: Callable[..., Iterator]
    display_name: str  # AUTOMATIC1111's name, written into image metadata
    ancestral: bool  # draws fresh noise every step (at its default eta), so needs `noise`
    model_scale: bool  # works on model-scale latents (DDIM, DPM-Solver, PLMS, UniPC), else on sigma-space ones
    plan_style: str | None  # whose timesteps "default" walks: "euler", "ddim", "dpm" (diffusers'), None: A1111's
    diffusers: str  # the diffusers scheduler it reproduces ("" when "default" means A1111's plan)
    aliases: tuple[str, ...] = ()  # A1111's other names for it (k_euler_a ...)
    # What A1111 does with it (modules/sd_samplers_*.py):
    a1111_kind: str = "kdiffusion"  # "kdiffusion", "timesteps" (DDIM/PLMS/UniPC), "lcm", "dpm_solver"
    a1111_schedule: str | None = None  # its "Automatic" schedule type; None: the model's uniform sigmas
    discard_penultimate: bool = False  # A1111 drops the next-to-last sigma (one more step computed)
    brownian: bool = False  # A1111 feeds it Brownian-tree noise seeded by the image's seed
    eta: float | None = None  # A1111's default eta; None: the sampler has no eta
    # Where A1111's algorithm differs from diffusers' (LCM: where the boundary condition's skip term
    # applies), the function A1111's plans run instead, and the latents' form it takes.
    a1111_function: Callable[..., Iterator] | None = None
    a1111_model_scale: bool = False

    @property
    def second_order(self) -> bool:
        """Two model calls per step in A1111's accounting (its "second_order" option): prompt-editing
        steps then count model calls, so "[a:b:10]" switches after 5 of its steps."""
        return self.display_name in SECOND_ORDER


SECOND_ORDER = ("Heun", "DPM2", "DPM2 a", "DPM++ 2S a", "DPM++ SDE", "Restart")


def _info(function, display_name, ancestral, model_scale, plan_style=None, diffusers="", **a1111) -> SamplerInfo:
    return SamplerInfo(function, display_name, ancestral, model_scale, plan_style, diffusers, **a1111)


SAMPLERS: dict[str, SamplerInfo] = {
    "euler_a": _info(euler_a, "Euler a", True, False, "euler", "EulerAncestralDiscreteScheduler",
                     aliases=("k_euler_a", "k_euler_ancestral"), eta=1.0),
    "euler": _info(euler, "Euler", False, False, "euler", "EulerDiscreteScheduler", aliases=("k_euler",)),
    "ddim": _info(ddim, "DDIM", False, True, "ddim", "DDIMScheduler", a1111_kind="timesteps", eta=0.0),
    "dpmpp_2m": _info(dpmpp_2m, "DPM++ 2M", False, True, "dpm",
                      'DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)',
                      aliases=("k_dpmpp_2m",), a1111_schedule="karras"),
    "heun": _info(heun, "Heun", False, False, "euler", "HeunDiscreteScheduler", aliases=("k_heun",)),
    "lms": _info(lms, "LMS", False, False, "euler", "LMSDiscreteScheduler", aliases=("k_lms",)),
    "dpmpp_2m_sde": _info(dpmpp_2m_sde, "DPM++ 2M SDE", True, True, "dpm",
                          'DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=2)',
                          aliases=("k_dpmpp_2m_sde",), a1111_schedule="exponential", brownian=True, eta=1.0),
    # AUTOMATIC1111's others: "default" is A1111's own plan for them ("automatic").
    "dpm2": _info(kd.dpm2, "DPM2", False, False, aliases=("k_dpm_2",), a1111_schedule="karras",
                  discard_penultimate=True),
    "dpm2_a": _info(kd.dpm2_a, "DPM2 a", True, False, aliases=("k_dpm_2_a",), a1111_schedule="karras",
                    discard_penultimate=True, eta=1.0),
    "dpmpp_2s_a": _info(kd.dpmpp_2s_a, "DPM++ 2S a", True, False, aliases=("k_dpmpp_2s_a",),
                        a1111_schedule="karras", eta=1.0),
    "dpmpp_sde": _info(kd.dpmpp_sde, "DPM++ SDE", True, False, aliases=("k_dpmpp_sde",),
                       a1111_schedule="karras", brownian=True, eta=1.0),
    "dpmpp_2m_sde_heun": _info(functools.partial(dpmpp_2m_sde, solver="heun"), "DPM++ 2M SDE Heun", True, True,
                               aliases=("k_dpmpp_2m_sde_heun",), a1111_schedule="exponential", brownian=True,
                               eta=1.0),
    "dpmpp_3m_sde": _info(kd.dpmpp_3m_sde, "DPM++ 3M SDE", True, False, aliases=("k_dpmpp_3m_sde",),
                          a1111_schedule="exponential", discard_penultimate=True, brownian=True, eta=1.0),
    "dpm_fast": _info(dpm_solver.dpm_fast, "DPM fast", True, False, aliases=("k_dpm_fast",),
                      a1111_kind="dpm_solver", eta=1.0),
    "dpm_adaptive": _info(dpm_solver.dpm_adaptive, "DPM adaptive", True, False, aliases=("k_dpm_ad",),
                          a1111_kind="dpm_solver", eta=1.0),
    "restart": _info(kd.restart, "Restart", True, False, a1111_schedule="karras"),
    "plms": _info(ts.plms, "PLMS", False, True, a1111_kind="timesteps"),
    "unipc": _info(ts.unipc, "UniPC", False, True, a1111_kind="timesteps"),
    # diffusers' LCMScheduler for its plan ("default"), A1111's LCM sampler for A1111's plans.
    "lcm": _info(lcm, "LCM", True, True, "lcm", "LCMScheduler", aliases=("k_lcm",), a1111_kind="lcm",
                 a1111_function=kd.lcm, a1111_model_scale=False),
}


def sample(name: str, denoiser, x, plan, noise: NoiseFn | None = None, *, eta: float | None = None,
           ensd: int = 0, noise_sampler: IntervalNoise | None = None) -> Iterator:
    """Run sampler `name` over `plan` from `x` = noise * plan.init_noise_sigma: an iterator over the latent after each step.

    The latents are in the form the plan keeps (sigma space or model scale,
    `SamplingPlan.model_scale`; for diffusers' plans the form its scheduler keeps, so the latents
    are diffusers'); the last one is the finished latent for the VAE. Arguments are checked here,
    before the first step runs.

    `noise`: per-step noise for stochastic samplers, `noise(shape)` (an `ImageNoise` from
    `noise_from_sources` gives each image its seed's stream, the Brownian tree A1111 feeds its SDE
    samplers on A1111 plans, and ENSD). `eta`: A1111's eta for samplers that have one (None: its
    default, 1 for ancestral and SDE samplers, 0 for DDIM). `ensd`: A1111's "Eta noise seed delta":
    the step noise comes from seed + ensd instead of continuing the seed's stream (0: unchanged).
    `noise_sampler`: k-diffusion-style noise(sigma, sigma_next), used as given (tests inject noise so).
    """
    if name not in SAMPLERS:
        raise InputError(f"unknown sampler {name!r}; valid samplers: {choices_text(SAMPLERS)}")
    info = SAMPLERS[name]
    function, form = info.function, info.model_scale
    if plan.convention == "a1111" and info.a1111_function is not None:
        function, form = info.a1111_function, info.a1111_model_scale
    options = _eta_option(name, info, eta)
    if plan.targets is not None:
        if info.plan_style != "ddim":
            raise InputError(f"this plan was made for DDIM (it has landing targets), not for {name!r}")
        options["targets"] = plan.targets
    accepted = inspect.signature(function).parameters
    for key, value in plan.extras:
        if key not in accepted:
            raise InputError(f"this plan was made for another sampler (it sets {key!r}), not for {name!r}")
        options[key] = value
    if noise_sampler is None:
        noise_sampler = step_noise(name, plan, noise, tuple(x.shape), eta=eta, ensd=ensd)
    model_scale = form if plan.model_scale is None else plan.model_scale
    if model_scale == form:
        return function(denoiser, x, plan.sigmas, noise_sampler, **options)
    return _in_plan_form(function, denoiser, x, plan.sigmas, noise_sampler, options, to_model=form)


def _eta_option(name: str, info: SamplerInfo, eta: float | None) -> dict:
    if eta is None:
        return {} if info.eta is None else {"eta": info.eta}
    if info.eta is None:
        raise InputError(f"sampler {name!r} has no eta; samplers with one: "
                         f"{choices_text(k for k, v in SAMPLERS.items() if v.eta is not None)}")
    if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta >= 0):
        raise InputError(f"eta must be a number >= 0; got {eta!r}")
    return {"eta": float(eta)}


def step_noise(name: str, plan, noise: NoiseFn | None, shape: tuple, *, eta: float | None = None,
               ensd: int = 0) -> IntervalNoise:
    """The noise(sigma, sigma_next) `sample` gives sampler `name` on `plan` (zero noise when it draws
    none). Made once and passed to `sample` as `noise_sampler`, it spans several runs over parts
    of one plan (a refiner's hand-off): one Brownian tree over the whole plan, one ENSD stream."""
    info = SAMPLERS[name]
    options = _eta_option(name, info, eta)
    draws = info.ancestral if info.eta is None else options["eta"] > 0
    return _step_noise(name, info, plan, noise, int(ensd), tuple(shape)) if draws else zero_noise


def _step_noise(name: str, info: SamplerInfo, plan, noise, ensd: int, shape: tuple) -> IntervalNoise:
    """The noise(sigma, sigma_next) a stochastic sampler draws from, made from the caller's `noise`."""
    if noise is None:
        raise InputError(f"sampler {name!r} draws noise every step: pass noise=<callable(shape) -> array>")
    if info.brownian and plan.convention == "a1111" and isinstance(noise, ImageNoise):
        positive = [s for s in plan.sigmas if s > 0]
        return noise.brownian(shape, min(positive), max(positive))  # A1111 seeds it with the image seed, no ENSD
    if ensd:
        if not isinstance(noise, ImageNoise):
            raise InputError("ENSD (eta noise seed delta) needs the per-image noise of noise_from_sources(...)")
        noise = noise.with_seed_delta(ensd)
    return lambda sigma, sigma_next: noise(shape)


def _in_plan_form(function, denoiser, x, sigmas, noise_sampler, options, *, to_model: bool) -> Iterator:
    """Run a sampler whose latents are in the other form than the plan's: convert on the way in and out."""
    factors = [math.sqrt(float(s) ** 2 + 1.0) for s in sigmas]  # sigma-space latent = model-scale * factor
    x = x / factors[0] if to_model else x * factors[0]
    inner = function(denoiser, x, sigmas, noise_sampler, **options)
    latent = next(inner, None)
    for factor in factors[1:]:
        if latent is None:
            return
        sent = yield latent * factor if to_model else latent / factor
        back = None if sent is None else (sent / factor if to_model else sent * factor)
        latent = _send(inner, back)


def _send(generator, value):
    try:
        return generator.send(value)
    except StopIteration:
        return None


def sampling_extras(name: str, *, eta: float | None = None, ensd: int = 0) -> dict[str, str]:
    """What A1111 writes into an image's parameters for these options ("Eta", "ENSD"), when not its defaults."""
    info = SAMPLERS[name]
    extras = {}
    if eta is not None and info.eta is not None and float(eta) != info.eta:
        extras["Eta DDIM" if info.a1111_kind == "timesteps" else "Eta"] = f"{float(eta):g}"
    if ensd and (info.ancestral or (info.eta is not None and eta)) and not info.brownian:
        extras["ENSD"] = str(int(ensd))
    return extras


def noise_from_sources(sources: Sequence, asarray: Callable[[Any], Any]) -> ImageNoise:
    """noise(shape) for a batch: row i drawn from sources[i] (e.g. NoiseSource(seed + i)), as
    diffusers draws from a list of generators, so any image can be reproduced alone."""
    return ImageNoise(sources, asarray)
