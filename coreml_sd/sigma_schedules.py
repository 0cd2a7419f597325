"""AUTOMATIC1111's schedule types: lists of noise levels (sigmas) built from a model's discrete schedule.

Each function returns float32 sigmas, decreasing, for `n` sampler steps: n + 1 values, the last
0 (KL Optimal ends on the smallest training sigma instead, as A1111's does). They follow
A1111's `modules/sd_schedulers.py` and k-diffusion's `get_sigmas_*` on the model wrapper A1111
samples through (k-diffusion's `DiscreteSchedule`, or A1111's LCM denoiser for LCM), so the
same model and step count give the same list; tests/test_schedules_a1111.py checks each against
those functions. numpy only: plans are made where torch is not installed.

Schedules that need "the inner model" (Uniform, SGM Uniform, Simple, Normal, DDIM) use the
`DiscreteSigmas` protocol here: the table of training sigmas and the sigma <-> timestep maps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

KARRAS_RHO = 7.0  # Karras et al. 2022, eq. 5
# Align Your Steps (Sabour et al. 2024), NVIDIA's published 10-step sigmas, as A1111 uses them.
AYS_SD1 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
AYS_SDXL = (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)
# A1111's defaults for its "Beta" schedule (settings beta_dist_alpha, beta_dist_beta).
BETA_ALPHA = BETA_BETA = 0.6
# A1111's LCM denoiser: the 50 timesteps LCM was distilled on (19, 39, ..., 999).
LCM_ORIGINAL_STEPS = 50


@dataclass(frozen=True, eq=False)
class DiscreteSigmas:
    """k-diffusion's DiscreteSchedule: training sigmas (increasing) and the maps between sigma and timestep."""

    sigmas: np.ndarray  # float32, increasing

    @property
    def log_sigmas(self) -> np.ndarray:
        return np.log(self.sigmas)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma) -> np.ndarray:
        """Fractional timestep: linear interpolation in log-sigma between neighbouring training sigmas."""
        log_sigmas = self.log_sigmas.astype(np.float64)
        log_sigma = np.log(np.asarray(sigma, dtype=np.float64))
        low = np.clip(np.searchsorted(log_sigmas, log_sigma, side="right") - 1, 0, len(log_sigmas) - 2)
        w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0.0, 1.0)
        return (1.0 - w) * low + w * (low + 1)

    def t_to_sigma(self, t) -> np.ndarray:
        """Sigma at fractional timestep t: log-sigma interpolated linearly (float32, as k-diffusion)."""
        t = np.asarray(t, dtype=np.float32)
        low, high = np.floor(t).astype(np.int64), np.ceil(t).astype(np.int64)
        w = t - np.float32(low)
        log_sigmas = self.log_sigmas
        return np.exp((np.float32(1) - w) * log_sigmas[low] + w * log_sigmas[high])

    def get_sigmas(self, n: int) -> np.ndarray:
        """k-diffusion's get_sigmas(n): n levels evenly spaced in timestep from the last to 0, then 0."""
        t = np.linspace(len(self.sigmas) - 1, 0, n, dtype=np.float32)
        return _append_zero(self.t_to_sigma(t))


@dataclass(frozen=True, eq=False)
class LCMSigmas(DiscreteSigmas):
    """A1111's LCMCompVisDenoiser: only LCM's 50 original timesteps, and timesteps quantized to them.

    `sigmas` holds the training sigmas at timesteps skip - 1, 2 * skip - 1, ..., 999.
    """

    skip: int = 20

    def sigma_to_t(self, sigma) -> np.ndarray:
        # get_sigmas puts some sigmas exactly halfway (in log) between two LCM timesteps; A1111
        # breaks such ties by its float32 rounding (torch's log/exp differ from numpy's in the
        # last bit), here by float64's, so at those steps the two may take neighbouring timesteps.
        log_sigma = np.log(np.asarray(sigma, dtype=np.float64))
        nearest = np.abs(log_sigma[..., None] - self.log_sigmas.astype(np.float64)).argmin(axis=-1)
        return (nearest * self.skip + (self.skip - 1)).astype(np.float64)

    def t_to_sigma(self, t) -> np.ndarray:
        index = np.clip((np.asarray(t, dtype=np.float32) - np.float32(self.skip - 1)) / np.float32(self.skip),
                        0, len(self.sigmas) - 1)
        return super().t_to_sigma(index)

    def get_sigmas(self, n: int) -> np.ndarray:
        start, end = self.sigma_to_t(self.sigma_max), self.sigma_to_t(self.sigma_min)
        return _append_zero(self.t_to_sigma(np.linspace(start, end, n, dtype=np.float32)))


def lcm_sigmas(training: np.ndarray, original_steps: int = LCM_ORIGINAL_STEPS) -> LCMSigmas:
    """The LCM table from the model's training sigmas (increasing, one per training timestep)."""
    skip = len(training) // original_steps
    picked = [training[len(training) - 1 - k * skip] for k in range(original_steps)][::-1]
    return LCMSigmas(np.asarray(picked, dtype=np.float32), skip=skip)


def _append_zero(sigmas) -> np.ndarray:
    return np.append(np.asarray(sigmas, dtype=np.float32), np.float32(0.0))


# --- the schedule types: fn(n, model, sdxl) -> n + 1 float32 sigmas ----------------------------------


def uniform(n: int, model: DiscreteSigmas, sdxl: bool = False) -> np.ndarray:
    """Evenly spaced timesteps over the whole training range (k-diffusion's own get_sigmas)."""
    return model.get_sigmas(n)


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = KARRAS_RHO) -> np.ndarray:
    """Karras et al. 2022 (EDM) noise levels: evenly spaced in sigma**(1/rho), from sigma_max down to sigma_min."""
    ramp = np.linspace(0.0, 1.0, steps)
    max_inv_rho, min_inv_rho = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def karras(n: int, model: DiscreteSigmas, sdxl: bool = False) -> np.ndarray:
    return _append_zero(karras_sigmas(model.sigma_min, model.sigma_max, n))


def exponential(n: int, model: DiscreteSigmas, sdxl: bool = False) -> np.ndarray:
    """Evenly spaced in log-sigma."""
    return _append_zero(np.exp(np.linspace(math.log(model.sigma_max), math.log(model.sigma_min), n)))


def polyexponential(n: int, model: DiscreteSigmas, sdxl: bool = False, rho: float = 1.0) -> np.ndarray:
    """A polynomial (degree rho) in log-sigma; rho = 1 is Exponential."""
    ramp = np.linspace(1.0, 0.0, n) ** rho
    low, high = math.log(model.sigma_min), math.log(model.sigma_max)
    return _append_zero(np.exp(ramp * (high - low) + low))


def sgm_uniform(n: int, model: DiscreteSigmas, sdxl: bool = False) -> np.ndarray:
    """n + 1 evenly spaced timesteps from the highest to the lowest, the last dropped (Stability's SGM)."""
    start, end = float(model.sigma_to_t(model.sigma_max)), float(model.sigma_to_t(model.sigma_min))
    return _append_zero(model.t_to_sigma(np.linspace(start, end, n + 1, dtype=np.float32)[:-1]))


def normal(n: int, model: DiscreteSigmas, sdxl: bool = False) -> np.ndarray:
    """n evenly spaced timesteps from the highest to the lowest, both included."""
    start, end = float(model.sigma_to_t(model.sigma_max)), float(model.sigma_to_t(model.sigma_min))
    return _append_zero(model.t_to_sigma(np.linspace(start, end, n, dtype=np.float32)))


def kl_optimal(n: int, model: DiscreteSigmas, sdxl: bool = False) -> np.ndarray:
    """Evenly spaced in arctan(sigma) (Sabour et al. 2024, "KL optimal"); ends on sigma_min, not 0."""
    alpha_min, alpha_max = math.atan(model.sigma_min), math.atan(model.sigma_max)
    step = np.arange(n + 1) / n
    return np.tan(step * alpha_min + (1.0 - step) * alpha_max).astype(np.float32)


def align_your_steps(n: int, model: DiscreteSigmas, sdxl: bool = False) -> np.ndarray:
    """NVIDIA's optimised 10-step sigmas (SD 1.x or SDXL), log-linearly resampled to n steps."""
    table = np.asarray(AYS_SDXL if sdxl else AYS_SD1, dtype=np.float64)
    if n == len(table):  # A1111 compares n with the 11 entries, so 11 steps use the table as is
        return _append_zero(table)
    xs = np.linspace(0.0, 1.0, len(table))
    ys = np.interp(np.linspace(0.0, 1.0, n), xs, np.log(table[::-1]))
    return _append_zero(np.exp(ys)[::-1])


def simple(n: int, model: DiscreteSigmas, sdxl: bool = False) -> np.ndarray:
    """Every (len / n)-th training sigma from the top, rounded down to a table entry."""
    stride = len(model.sigmas) / n
    return _append_zero([model.sigmas[-(1 + int(k * stride))] for k in range(n)])


def ddim_uniform(n: int, model: DiscreteSigmas, sdxl: bool = False) -> np.ndarray:
    """DDIM's uniform discretisation: training sigmas 1, 1 + len // n, ... from the top."""
    stride = max(len(model.sigmas) // n, 1)
    picked = model.sigmas[1::stride]
    return _append_zero(picked[::-1])


def beta(n: int, model: DiscreteSigmas, sdxl: bool = False, a: float = BETA_ALPHA,
         b: float = BETA_BETA) -> np.ndarray:
    """Quantiles of a Beta(a, b) distribution mapped linearly onto [sigma_min, sigma_max] (Lee et al. 2024)."""
    levels = [beta_ppf(q, a, b) for q in 1.0 - np.linspace(0.0, 1.0, n)]
    span = model.sigma_max - model.sigma_min
    return _append_zero([model.sigma_min + level * span for level in levels])


# --- the Beta distribution's quantile function, without scipy ----------------------------------------


def beta_ppf(q: float, a: float, b: float) -> float:
    """x with I_x(a, b) = q: bisection on the regularized incomplete beta function, then Newton steps."""
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(30):  # brackets the root to 1e-9 whatever the shape of the density
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if betainc(a, b, mid) < q else (lo, mid)
    x = 0.5 * (lo + hi)
    log_norm = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    for _ in range(8):  # Newton on the smooth interior converges to float64 precision
        if not 0.0 < x < 1.0:
            break
        density = math.exp(log_norm + (a - 1.0) * math.log(x) + (b - 1.0) * math.log1p(-x))
        step = (betainc(a, b, x) - q) / density
        x_new = min(max(x - step, lo), hi)
        if x_new == x:
            break
        x = x_new
    return x


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (Lentz's method)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    # The fraction converges fast only below the mean; use the symmetry I_x(a, b) = 1 - I_1-x(b, a).
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b


def _beta_fraction(a: float, b: float, x: float, tiny: float = 1e-300) -> float:
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    out = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            out *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return out


@dataclass(frozen=True)
class ScheduleType:
    """One of A1111's schedule types: our key, its label, other names A1111 accepts, the function."""

    key: str
    label: str
    function: Callable[..., np.ndarray] | None  # None: "automatic", the sampler's own choice
    aliases: tuple[str, ...] = ()


SCHEDULE_TYPES: dict[str, ScheduleType] = {s.key: s for s in (
    ScheduleType("automatic", "Automatic", None),
    ScheduleType("uniform", "Uniform", uniform),
    ScheduleType("karras", "Karras", karras),
    ScheduleType("exponential", "Exponential", exponential),
    ScheduleType("polyexponential", "Polyexponential", polyexponential),
    ScheduleType("sgm_uniform", "SGM Uniform", sgm_uniform, ("SGMUniform",)),
    ScheduleType("kl_optimal", "KL Optimal", kl_optimal),
    ScheduleType("align_your_steps", "Align Your Steps", align_your_steps),
    ScheduleType("simple", "Simple", simple),
    ScheduleType("normal", "Normal", normal),
    ScheduleType("ddim", "DDIM", ddim_uniform),
    ScheduleType("beta", "Beta", beta),
)}
