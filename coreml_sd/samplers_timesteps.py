"""PLMS and UniPC: AUTOMATIC1111's "timesteps" samplers, on model-scale latents.

Model scale: x = alpha * x0 + s * eps with alpha = 1 / sqrt(sigma**2 + 1), s = sigma * alpha, as
the UNet sees latents; `denoiser.scaled(x, sigma)` gives x0. A1111 runs these (and DDIM) on its
own timesteps rather than on a schedule type's sigmas (see `coreml_sd.plans_a1111`); here they
take any decreasing sigmas. Same generator contract as `coreml_sd.samplers`.

* PLMS: pseudo linear multistep (Liu et al. 2022, "PNDM"), the LDM/A1111 form: a pseudo improved
  Euler first step, then Adams-Bashforth on eps of order 2, 3, 4, each applied as a DDIM step.
* UniPC: the unified predictor-corrector multistep solver (Zhao et al. 2023) with data
  prediction, B(h) variant bh1 (A1111's default) or bh2, order up to 3, lower orders at the end.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Sequence

import numpy as np

from coreml_sd import arrays

IntervalNoise = Callable[[float, float], object]
# Adams-Bashforth weights on eps, newest first, for 2, 3 and 4 stored values.
_ADAMS_BASHFORTH = {2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def _alpha(sigma: float) -> float:
    return 1.0 / math.sqrt(sigma * sigma + 1.0)


def _eps(denoiser, x, sigma: float):
    """The model's noise estimate at a model-scale latent, from its x0 estimate."""
    alpha = _alpha(sigma)
    return (x - denoiser.scaled(x, sigma) * alpha) / (sigma * alpha)


def _ddim_step(x, eps, sigma: float, sigma_next: float):
    """Deterministic DDIM from sigma to sigma_next with this eps."""
    alpha, alpha_next = _alpha(sigma), _alpha(sigma_next)
    x0 = (x - eps * (sigma * alpha)) / alpha
    return x0 * alpha_next + eps * (sigma_next * alpha_next)


def plms(denoiser, x, sigmas: Sequence[float], noise: IntervalNoise | None = None) -> Iterator:
    """Pseudo linear multistep on model-scale latents (A1111's PLMS)."""
    history = []  # eps at the previous steps, newest last
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        eps = _eps(denoiser, x, sigma)
        if not history:
            # Pseudo improved Euler: average eps here and at the Euler (DDIM) step's end.
            eps_next = _eps(denoiser, _ddim_step(x, eps, sigma, sigma_next), sigma_next)
            eps_prime = (eps + eps_next) * 0.5
        else:
            weights = _ADAMS_BASHFORTH[len(history) + 1]
            eps_prime = eps * weights[0]
            for weight, old in zip(weights[1:], reversed(history)):
                eps_prime = eps_prime + old * weight
        x = _ddim_step(x, eps_prime, sigma, sigma_next)
        history = (history + [eps])[-3:]
        x = arrays.landed(x, (yield x))


def unipc(denoiser, x, sigmas: Sequence[float], noise: IntervalNoise | None = None, *, order: int = 3,
          variant: str = "bh1", lower_order_final: bool = True) -> Iterator:
    """UniPC multistep (predict x0) on model-scale latents: predictor to each sigma, corrected with
    the model's estimate there (which the next step reuses), no corrector after the last step."""
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"UniPC variant must be bh1 or bh2; got {variant!r}")
    steps = len(sigmas) - 1
    order = max(1, min(order, steps))  # A1111's UniPC asserts steps >= order; fewer steps get lower orders
    models = [denoiser.scaled(x, sigmas[0])]
    levels = [float(sigmas[0])]
    for i in range(1, steps + 1):
        step_order = i if i < order else (min(order, steps + 1 - i) if lower_order_final else order)
        use_corrector = i < steps
        x, model_x = _unipc_update(denoiser, x, models, levels, float(sigmas[i]), step_order,
                                   variant, use_corrector)
        x = arrays.landed(x, (yield x))
        if i < steps:
            models = (models + [model_x if model_x is not None else denoiser.scaled(x, sigmas[i])])[-order:]
            levels = (levels + [float(sigmas[i])])[-order:]


def _unipc_update(denoiser, x, models: list, levels: list[float], sigma_t: float, order: int,
                  variant: str, use_corrector: bool):
    """One UniPC-bh step from levels[-1] to sigma_t; returns (x_t, model estimate at x_t or None)."""
    sigma_0, model_0 = levels[-1], models[-1]
    if sigma_t == 0:
        return model_0, None  # the first-order limit at sigma 0: the data estimate itself
    lambda_0, h = -math.log(sigma_0), math.log(sigma_0) - math.log(sigma_t)
    alpha_t = _alpha(sigma_t)
    # 1. Divided differences of the earlier data estimates, at ratios r_k of the step in lambda.
    rks, d1s = [], []
    for k in range(1, order):
        rk = (-math.log(levels[-(k + 1)]) - lambda_0) / h
        rks.append(rk)
        d1s.append((models[-(k + 1)] - model_0) / rk)
    rks.append(1.0)
    # 2. The coefficients: B(h), and rho from R rho = b with R the Vandermonde matrix of the r_k.
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else math.expm1(hh)
    b, h_phi_k, factorial = [], h_phi_1 / hh - 1.0, 1
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    vandermonde = np.array([[r ** (k - 1) for r in rks] for k in range(1, order + 1)])
    # 3. Predictor (the exponential integrator plus the divided differences), then corrector.
    x_t_ = x * (sigma_t * alpha_t / (sigma_0 * _alpha(sigma_0))) - model_0 * (alpha_t * h_phi_1)
    x_t = x_t_
    if d1s:
        rhos_p = [0.5] if order == 2 else np.linalg.solve(vandermonde[:-1, :-1], b[:-1]).tolist()
        x_t = x_t_ - _combine(rhos_p, d1s) * (alpha_t * b_h)
    if not use_corrector:
        return x_t, None
    model_t = denoiser.scaled(x_t, sigma_t)
    rhos_c = [0.5] if order == 1 else np.linalg.solve(vandermonde, b).tolist()
    correction = (model_t - model_0) * rhos_c[-1]
    if d1s:
        correction = correction + _combine(rhos_c[:-1], d1s)
    return x_t_ - correction * (alpha_t * b_h), model_t


def _combine(weights: Sequence[float], arrays_) -> object:
    out = arrays_[0] * float(weights[0])
    for weight, a in zip(weights[1:], arrays_[1:]):
        out = out + a * float(weight)
    return out
