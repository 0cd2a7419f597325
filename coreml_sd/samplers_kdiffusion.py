"""More of AUTOMATIC1111's k-diffusion samplers: DPM2, DPM2 a, DPM++ 2S a, DPM++ SDE, DPM++ 3M SDE, LCM, Restart.

Same contract as `coreml_sd.samplers`: a generator `fn(denoiser, x, sigmas, noise, ...)` over
sigma-space latents (x = x0 + sigma * eps, `denoiser(x, sigma)` -> x0) that yields the latent after
each step, with arithmetic operators and Python floats only, so numpy arrays and torch tensors both
work. `noise(sigma, sigma_next)` is k-diffusion's noise sampler: standard-normal noise like x for
the step from sigma to sigma_next; each sampler calls it exactly where k-diffusion does, so a run
fed the same draws gives the same latents (tests/test_samplers_kdiffusion.py). The algorithms are
those of k-diffusion's `sampling.py` (Katherine Crowson) and A1111's `sd_samplers_extra.py` /
`sd_samplers_lcm.py`, written here from their published descriptions.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Sequence

from coreml_sd import arrays
from coreml_sd.sigma_schedules import karras_sigmas

# noise(sigma, sigma_next) -> standard-normal array like the latents
IntervalNoise = Callable[[float, float], object]


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up): step deterministically to sigma_down, then add sigma_up of fresh noise.

    sigma_down**2 + sigma_up**2 = sigma_next**2; eta = 1 is DDPM's posterior (k-diffusion's
    get_ancestral_step), eta = 0 is deterministic.
    """
    if not eta:
        return sigma_next, 0.0
    variance = sigma_next**2 * max(sigma**2 - sigma_next**2, 0.0) / sigma**2
    sigma_up = min(sigma_next, eta * math.sqrt(variance))
    return math.sqrt(max(sigma_next**2 - sigma_up**2, 0.0)), sigma_up


def _geometric_mid(a: float, b: float) -> float:
    """exp(lerp(log a, log b, 1/2)): the midpoint in log-sigma DPM-Solver-2 evaluates at."""
    log_a = math.log(a)
    return math.exp(log_a + 0.5 * (math.log(b) - log_a))


def dpm2(denoiser, x, sigmas: Sequence[float], noise: IntervalNoise | None = None) -> Iterator:
    """DPM-Solver-2 steps in Karras et al.'s sigma ODE (k-diffusion sample_dpm_2, no churn): a midpoint method in log-sigma."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        derivative = (x - denoiser(x, sigma)) / sigma
        if sigma_next == 0:
            x = x + derivative * (sigma_next - sigma)  # no model at sigma 0: Euler to the end
        else:
            sigma_mid = _geometric_mid(sigma, sigma_next)
            x_mid = x + derivative * (sigma_mid - sigma)
            derivative_mid = (x_mid - denoiser(x_mid, sigma_mid)) / sigma_mid
            x = x + derivative_mid * (sigma_next - sigma)
        x = arrays.landed(x, (yield x))


def dpm2_a(denoiser, x, sigmas: Sequence[float], noise: IntervalNoise | None = None, *,
           eta: float = 1.0) -> Iterator:
    """Ancestral DPM-Solver-2: a DPM2 step down to sigma_down, then noise up to sigma_next."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = denoiser(x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        derivative = (x - denoised) / sigma
        if sigma_down == 0:
            x = x + derivative * (sigma_down - sigma)
        else:
            sigma_mid = _geometric_mid(sigma, sigma_down)
            x_mid = x + derivative * (sigma_mid - sigma)
            derivative_mid = (x_mid - denoiser(x_mid, sigma_mid)) / sigma_mid
            x = x + derivative_mid * (sigma_down - sigma)
            x = x + noise(sigma, sigma_next) * sigma_up
        x = arrays.landed(x, (yield x))


def dpmpp_2s_a(denoiser, x, sigmas: Sequence[float], noise: IntervalNoise | None = None, *,
               eta: float = 1.0) -> Iterator:
    """Ancestral DPM-Solver++(2S): a second-order singlestep data-prediction step (Lu et al. 2022), then noise."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = denoiser(x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        if sigma_down == 0:
            x = x + (x - denoised) / sigma * (sigma_down - sigma)
        else:
            # In lambda = -log(sigma): an exponential-integrator half step to the midpoint s,
            # then the full step with the data estimate made there.
            h = math.log(sigma) - math.log(sigma_down)
            sigma_mid = math.exp(-(-math.log(sigma) + 0.5 * h))
            x_mid = x * (sigma_mid / sigma) - denoised * math.expm1(-0.5 * h)
            denoised_mid = denoiser(x_mid, sigma_mid)
            x = x * (sigma_down / sigma) - denoised_mid * math.expm1(-h)
        if sigma_next > 0:
            x = x + noise(sigma, sigma_next) * sigma_up
        x = arrays.landed(x, (yield x))


def dpmpp_sde(denoiser, x, sigmas: Sequence[float], noise: IntervalNoise | None = None, *,
              eta: float = 1.0, r: float = 0.5) -> Iterator:
    """DPM-Solver++ (stochastic, k-diffusion sample_dpmpp_sde): two ancestral exponential-integrator
    substeps per step, through the point r of the way in log-sigma."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = denoiser(x, sigma)
        if sigma_next == 0:
            x = x + (x - denoised) / sigma * (sigma_next - sigma)
            x = arrays.landed(x, (yield x))
            continue
        t, t_next = -math.log(sigma), -math.log(sigma_next)
        sigma_s = math.exp(-(t + (t_next - t) * r))
        # 1. To the intermediate point s, with its share of the noise.
        sigma_down, sigma_up = ancestral_step(sigma, sigma_s, eta)
        x_s = x * (sigma_down / sigma) - denoised * math.expm1(t + math.log(sigma_down))
        x_s = x_s + noise(sigma, sigma_s) * sigma_up
        denoised_s = denoiser(x_s, sigma_s)
        # 2. The whole step with a data estimate extrapolated through s.
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        fac = 1.0 / (2.0 * r)
        denoised_d = denoised * (1.0 - fac) + denoised_s * fac
        x = x * (sigma_down / sigma) - denoised_d * math.expm1(t + math.log(sigma_down))
        x = x + noise(sigma, sigma_next) * sigma_up
        x = arrays.landed(x, (yield x))


def dpmpp_3m_sde(denoiser, x, sigmas: Sequence[float], noise: IntervalNoise | None = None, *,
                 eta: float = 1.0) -> Iterator:
    """DPM-Solver++(3M) SDE: third-order multistep with the SDE's noise (k-diffusion sample_dpmpp_3m_sde)."""
    denoised_1 = denoised_2 = None
    h_1 = h_2 = None
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = denoiser(x, sigma)
        h = None
        if sigma_next == 0:
            x = denoised  # the exponential integrator's limit at sigma 0
        else:
            h = math.log(sigma) - math.log(sigma_next)
            h_eta = h * (eta + 1.0)
            x = x * math.exp(-h_eta) + denoised * -math.expm1(-h_eta)
            phi_2 = math.expm1(-h_eta) / h_eta + 1.0
            if h_2 is not None:
                # Divided differences of the last three data estimates, in units of this step.
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + d1 * phi_2 - d2 * phi_3
            elif h_1 is not None:
                x = x + (denoised - denoised_1) / (h_1 / h) * phi_2
            if eta:
                x = x + noise(sigma, sigma_next) * (sigma_next * math.sqrt(-math.expm1(-2.0 * h * eta)))
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
        x = arrays.landed(x, (yield x))


def lcm(denoiser, x, sigmas: Sequence[float], noise: IntervalNoise | None = None, *,
        timesteps: Sequence[float], sigma_data: float = 0.5) -> Iterator:
    """Latent Consistency Model sampling (Luo et al. 2023; A1111's sample_lcm with its LCM denoiser).

    Each step jumps to the consistency model's x0, which is the denoiser's estimate blended with
    the input by LCM's boundary condition at the (quantized) timestep, then re-noises to sigma_next.
    """
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        denoised = denoiser(x, sigma)
        scaled_t = float(timesteps[i]) * 10.0
        c_skip = sigma_data**2 / (scaled_t**2 + sigma_data**2)
        c_out = scaled_t / math.sqrt(scaled_t**2 + sigma_data**2)
        x = denoised * c_out + x * c_skip
        if sigma_next > 0:
            x = x + noise(sigma, sigma_next) * sigma_next
        x = arrays.landed(x, (yield x))


def restart(denoiser, x, sigmas: Sequence[float], noise: IntervalNoise | None = None, *,
            s_noise: float = 1.0) -> Iterator:
    """Restart sampling (Xu et al. 2023), A1111's automatic recipe: Heun steps, and for 20+ steps
    a Karras walk that jumps back up from sigma 0.1 to 2 with fresh noise once (twice from 36 steps)."""
    last_sigma = None
    for old_sigma, new_sigma in restart_steps(sigmas):
        if last_sigma is None:
            last_sigma = old_sigma
        elif last_sigma < old_sigma:
            x = x + noise(last_sigma, old_sigma) * (s_noise * math.sqrt(old_sigma**2 - last_sigma**2))
        x = _heun_step(denoiser, x, old_sigma, new_sigma)
        last_sigma = new_sigma
        x = arrays.landed(x, (yield x))


def _heun_step(denoiser, x, sigma: float, sigma_next: float):
    derivative = (x - denoiser(x, sigma)) / sigma
    dt = sigma_next - sigma
    if sigma_next == 0:
        return x + derivative * dt
    x_euler = x + derivative * dt
    derivative_next = (x_euler - denoiser(x_euler, sigma_next)) / sigma_next
    return x + (derivative + derivative_next) * (0.5 * dt)


def restart_steps(sigmas: Sequence[float]) -> list[tuple[float, float]]:
    """The (from, to) sigma pairs Restart walks, restart segments included (A1111's restart_sampler)."""
    sigmas = [float(s) for s in sigmas]
    steps = len(sigmas) - 1
    restarts = {}
    if steps >= 20:
        restart_steps_, restart_times = (steps // 4, 2) if steps >= 36 else (9, 1)
        # The main walk is Karras' over the given range, shortened by the restart segments' steps.
        main = _float32_list(karras_sigmas(sigmas[-2], sigmas[0], steps - restart_steps_ * restart_times))
        sigmas = main + [0.0]
        restarts = {_nearest(sigmas, 0.1): (restart_steps_ + 1, restart_times, 2.0)}
    pairs = []
    for i in range(len(sigmas) - 1):
        pairs.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in restarts:
            count, times, restart_max = restarts[i + 1]
            max_index = _nearest(sigmas, restart_max)
            if max_index < i + 1:
                walk = _float32_list(karras_sigmas(sigmas[i + 1], sigmas[max_index], count))
                pairs += list(zip(walk[:-1], walk[1:])) * times
    return pairs


def _nearest(sigmas: Sequence[float], value: float) -> int:
    return min(range(len(sigmas)), key=lambda i: abs(sigmas[i] - value))


def _float32_list(values) -> list[float]:
    import numpy as np

    return [float(v) for v in np.asarray(values, dtype=np.float32)]
