"""DPM fast and DPM adaptive: DPM-Solver's own step-size choices (Lu et al. 2022), as k-diffusion implements them.

Both solve the probability-flow ODE in lambda = -log(sigma) with the noise-prediction DPM-Solver
of order 1-3 (eps = (x - D(x, sigma)) / sigma, sigma-space latents), over the model's whole noise
range; A1111 passes them the model's smallest and largest training sigma, whatever the schedule
type, and its ancestral eta (1 by default, so both add noise like Euler a).

* DPM fast: a fixed budget of model evaluations `nfe` (the step count), spent in steps of order 3
  on a grid uniform in lambda, the last one or two of lower order.
* DPM adaptive: DPM-Solver-23 with a PID step-size controller on the difference between the
  second- and third-order solutions (rtol 0.05, atol 0.0078). Its error is measured over the whole
  batch, as k-diffusion does, so an image's steps depend on the other images of its batch.

Same generator contract as `coreml_sd.samplers` (noise(sigma, sigma_next) as k-diffusion's noise
sampler; one yield per accepted step).
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Sequence

import numpy as np

from coreml_sd import arrays
from coreml_sd.samplers_kdiffusion import ancestral_step

IntervalNoise = Callable[[float, float], object]


class _Solver:
    """DPM-Solver steps from t to t_next (t = -log sigma), with the model's eps cached per step."""

    def __init__(self, denoiser):
        self.denoiser = denoiser

    def eps(self, cache: dict, key: str, x, t: float):
        if key not in cache:
            sigma = math.exp(-t)
            cache[key] = (x - self.denoiser(x, sigma)) / sigma
        return cache[key]

    def step_1(self, x, t: float, t_next: float, cache: dict):
        h = t_next - t
        return x - self.eps(cache, "eps", x, t) * (math.exp(-t_next) * math.expm1(h))

    def step_2(self, x, t: float, t_next: float, cache: dict, r1: float = 0.5):
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1 = t + r1 * h
        u1 = x - eps * (math.exp(-s1) * math.expm1(r1 * h))
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        sigma_next = math.exp(-t_next)
        return x - eps * (sigma_next * math.expm1(h)) - (eps_r1 - eps) * (sigma_next / (2 * r1) * math.expm1(h))

    def step_3(self, x, t: float, t_next: float, cache: dict, r1: float = 1 / 3, r2: float = 2 / 3):
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1, s2 = t + r1 * h, t + r2 * h
        u1 = x - eps * (math.exp(-s1) * math.expm1(r1 * h))
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        phi_r2 = math.expm1(r2 * h) / (r2 * h) - 1
        u2 = (x - eps * (math.exp(-s2) * math.expm1(r2 * h))
              - (eps_r1 - eps) * (math.exp(-s2) * (r2 / r1) * phi_r2))
        eps_r2 = self.eps(cache, "eps_r2", u2, s2)
        sigma_next = math.exp(-t_next)
        phi_h = math.expm1(h) / h - 1
        return x - eps * (sigma_next * math.expm1(h)) - (eps_r2 - eps) * (sigma_next / r2 * phi_h)

    def step(self, order: int, x, t: float, t_next: float, cache: dict):
        return (self.step_1, self.step_2, self.step_3)[order - 1](x, t, t_next, cache)


def _ancestral_target(t: float, t_next: float, t_end: float, eta: float) -> tuple[float, float]:
    """Where the deterministic part of a step lands (in t) and how much noise restores sigma(t_next)."""
    if not eta:
        return t_next, 0.0
    sigma_down, _ = ancestral_step(math.exp(-t), math.exp(-t_next), eta)
    t_down = min(t_end, -math.log(sigma_down))
    return t_down, math.sqrt(max(math.exp(-t_next) ** 2 - math.exp(-t_down) ** 2, 0.0))


def fast_orders(nfe: int) -> list[int]:
    """DPM-Solver-fast's orders for a budget of nfe model evaluations (order 3 steps, then 2, 1)."""
    steps = nfe // 3 + 1
    if nfe % 3 == 0:
        return [3] * (steps - 2) + [2, 1]
    return [3] * (steps - 1) + [nfe % 3]


def fast_grid(sigma_min: float, sigma_max: float, nfe: int) -> np.ndarray:
    """DPM-Solver-fast's step boundaries: len(fast_orders(nfe)) + 1 sigmas evenly spaced in log-sigma."""
    ts = np.linspace(-math.log(sigma_max), -math.log(sigma_min), len(fast_orders(nfe)) + 1)
    return np.exp(-ts)


def dpm_fast(denoiser, x, sigmas: Sequence[float], noise: IntervalNoise | None = None, *,
             nfe: int, eta: float = 0.0) -> Iterator:
    """DPM-Solver-fast over the grid `sigmas` (uniform in log-sigma, `fast_orders(nfe)` steps)."""
    solver = _Solver(denoiser)
    ts = [-math.log(s) for s in sigmas]
    orders = fast_orders(nfe)
    if len(orders) != len(ts) - 1:
        raise ValueError(f"DPM fast with {nfe} evaluations takes {len(orders)} steps; got {len(ts) - 1} intervals")
    for order, t, t_next in zip(orders, ts[:-1], ts[1:]):
        t_down, sigma_up = _ancestral_target(t, t_next, ts[-1], eta)
        x = solver.step(order, x, t, t_down, {})
        x = x + noise(math.exp(-t), math.exp(-t_next)) * sigma_up
        x = arrays.landed(x, (yield x))


class PIDStepSizeController:
    """A PID controller for ODE step sizes (k-diffusion's): grows or shrinks h by the error's history."""

    def __init__(self, h: float, pcoeff: float, icoeff: float, dcoeff: float, order: float = 1.0,
                 accept_safety: float = 0.81, eps: float = 1e-8):
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.eps = eps
        self.errs: list[float] = []

    def propose_step(self, error: float) -> bool:
        inv_error = 1.0 / (float(error) + self.eps)
        if not self.errs:
            self.errs = [inv_error] * 3
        self.errs[0] = inv_error
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1.0 + math.atan(factor - 1.0)  # a soft limiter: never more than ~2.6x per step
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2], self.errs[1] = self.errs[1], self.errs[0]
        self.h *= factor
        return accept


def dpm_adaptive(denoiser, x, sigmas: Sequence[float], noise: IntervalNoise | None = None, *,
                 eta: float = 0.0, order: int = 3, rtol: float = 0.05, atol: float = 0.0078,
                 h_init: float = 0.05, pcoeff: float = 0.0, icoeff: float = 1.0, dcoeff: float = 0.0,
                 accept_safety: float = 0.81) -> Iterator:
    """Adaptive DPM-Solver-12/23 from sigmas[0] down to the last positive sigma; yields each accepted step."""
    if order not in (2, 3):
        raise ValueError(f"DPM adaptive's order must be 2 or 3; got {order}")
    solver = _Solver(denoiser)
    t_end = -math.log(min(s for s in sigmas if s > 0))
    s = -math.log(sigmas[0])
    x_prev = x
    pid = PIDStepSizeController(h_init, pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    cache: dict = {}  # eps at s survives a rejected step (k-diffusion evaluates it again: same value)
    while s < t_end - 1e-5:
        t = min(t_end, s + pid.h)
        t_down, sigma_up = _ancestral_target(s, t, t_end, eta)
        if order == 2:
            x_low = solver.step_1(x, s, t_down, cache)
            x_high = solver.step_2(x, s, t_down, cache)
        else:
            x_low = solver.step_2(x, s, t_down, cache, r1=1 / 3)
            x_high = solver.step_3(x, s, t_down, cache)
        if pid.propose_step(_scaled_error(x_low, x_high, x_prev, rtol, atol)):
            x_prev = x_low
            x = x_high + noise(math.exp(-s), math.exp(-t)) * sigma_up
            s = t
            cache = {}
            x = arrays.landed(x, (yield x))
        else:
            cache = {"eps": cache["eps"]}


def _scaled_error(x_low, x_high, x_prev, rtol: float, atol: float) -> float:
    """RMS of (x_low - x_high) / max(atol, rtol * max(|x_low|, |x_prev|)) over every element of the batch."""
    low, high, prev = (arrays.to_numpy(a).astype(np.float32) for a in (x_low, x_high, x_prev))
    delta = np.maximum(np.float32(atol), np.float32(rtol) * np.maximum(np.abs(low), np.abs(prev)))
    ratio = ((low - high) / delta).astype(np.float64)
    return float(np.sqrt(np.sum(ratio * ratio)) / math.sqrt(ratio.size))
