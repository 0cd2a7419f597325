"""Noise schedules: which noise levels (sigmas) a sampler walks and which UNet timestep each one gets.

Noise levels are k-diffusion's "VE" sigmas: a latent at level sigma is `x0 + sigma * eps` in
sigma space, `(x0 + sigma * eps) / sqrt(sigma**2 + 1)` in the model's own ("VP") scale, and
sigma(t) = sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t]).

Which timesteps a plan uses follows the diffusers scheduler users compare against, detail for
detail, because "the same seed gives the same image as diffusers" is a promise:

* Euler-style samplers (EulerDiscreteScheduler): float timesteps, sigmas linearly interpolated
  between the training sigmas, initial sigma `sqrt(sigma_max**2 + 1)` for "leading" spacing but
  `sigma_max` for "linspace"/"trailing"; Karras sigmas span the *chosen* timesteps' sigmas and
  their timesteps are interpolated in log-sigma, not rounded.
* DDIM (DDIMScheduler): integer timesteps; each step lands `num_train_timesteps // steps`
  timesteps lower whatever the spacing, on `alphas_cumprod[0]` (set_alpha_to_one=False) or 1
  past the end. With "linspace"/"trailing" spacing that landing point need not be the next
  step's timestep, so a plan carries `targets` (see `SamplingPlan`).
* DPM-Solver (DPMSolverMultistepScheduler): spaces `steps + 1` points for "linspace"/"leading"
  and drops the last; Karras sigmas span the whole training range and their timesteps are
  rounded to integers, while the solver keeps the unrounded sigmas.

Arithmetic mirrors diffusers' dtypes (float32 tables, float64 interpolation) so the plans agree
to float32 rounding; only numpy is used, so plans are made where torch is not installed.

* LCM (LCMScheduler): `steps` of the 50 timesteps it was distilled on, evenly spaced by index
  (the few-step schedule of LCM-LoRA and LCM checkpoints; `lcm_plan`).

Those are the "default" plans of the eight samplers diffusers has ("karras": diffusers'
use_karras_sigmas; LCM has none). Every other plan is AUTOMATIC1111's (`coreml_sd.plans_a1111`): the schedule
types of `coreml_sd.sigma_schedules` ("automatic" = the sampler's own A1111 default), and
"default" for the samplers diffusers lacks.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import numpy as np

from coreml_sd.config import TIMESTEP_SPACINGS, SchedulerConfig
from coreml_sd.errors import InputError, choices_text
from coreml_sd.samplers import SAMPLERS
from coreml_sd.sigma_schedules import KARRAS_RHO, SCHEDULE_TYPES, karras_sigmas  # noqa: F401 (re-exported)

# "default": diffusers' plan for the samplers it has, A1111's automatic one for the others; then
# AUTOMATIC1111's schedule types (coreml_sd.sigma_schedules), "automatic" being its per-sampler default.
SCHEDULES = ("default",) + tuple(SCHEDULE_TYPES)
# Schedules that keep diffusers' meaning for the samplers diffusers has (SamplerInfo.plan_style).
DIFFUSERS_SCHEDULES = ("default", "karras")
# What each diffusers scheduler assumes for a key the model's scheduler_config.json leaves out
# (a SchedulerConfig field of None): their class defaults differ. SD 1.5's published config has
# no timestep_spacing, so diffusers runs Euler and DPM-Solver "linspace" but DDIM "leading".
UNSET_DEFAULTS = {
    "euler": {"timestep_spacing": "linspace", "steps_offset": 0},
    "ddim": {"timestep_spacing": "leading", "steps_offset": 0, "set_alpha_to_one": True},
    "dpm": {"timestep_spacing": "linspace", "steps_offset": 0},
}


@dataclass(frozen=True)
class SamplingPlan:
    """The noise levels one generation walks, and what the UNet is told at each."""

    # steps + 1 noise levels, decreasing; the last is where sampling ends (0, or the DDIM floor).
    sigmas: tuple[float, ...]
    # The UNet timestep for each of the first `steps` sigmas. Usually t(sigma), but DPM-Solver's
    # Karras timesteps are rounded to integers while its sigmas are not.
    timesteps: tuple[float, ...]
    # Initial latents = standard-normal noise * init_noise_sigma, diffusers' value: the latent is
    # in the sampler's own space (sigma space for Euler-style samplers, model scale, so 1.0, for
    # DDIM and DPM-Solver; `SamplerInfo.model_scale`).
    init_noise_sigma: float
    # DDIM only, when not None: the noise level step i lands on, which differs from sigmas[i + 1]
    # where diffusers' DDIM steps back by num_train_timesteps // steps on a non-uniform spacing.
    # The next step then reads the landed (model-scale) latent as if it were at sigmas[i + 1].
    targets: tuple[float, ...] | None = None
    # The training schedule, for the timestep of a sigma that is not in the plan (for samplers
    # that evaluate between the plan's levels, such as DPM2 or DPM++ SDE).
    config: SchedulerConfig | None = None
    # Whose plan: "diffusers" (the latents diffusers' pipeline holds) or "a1111" (AUTOMATIC1111's;
    # its SDE samplers then draw Brownian-tree noise, `coreml_sd.sampler_noise`).
    convention: str = "diffusers"
    # The form of the latents `sample` takes and yields: True model scale, False sigma space,
    # None the sampler's own (`SamplerInfo.model_scale`).
    model_scale: bool | None = None
    # Sampler options the plan fixes, as (keyword, value) pairs (DPM fast's evaluation budget,
    # LCM's quantized timesteps).
    extras: tuple[tuple[str, object], ...] = ()

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def timestep(self, sigma: float) -> float:
        """The UNet timestep for noise level `sigma`: the plan's own, else interpolated in log-sigma."""
        try:
            return self.timesteps[self.sigmas.index(sigma, 0, self.steps)]
        except ValueError:
            pass
        if self.config is None:
            raise InputError(f"sigma {sigma} is not one of this plan's noise levels and the plan has no config")
        return float(sigmas_to_timesteps(log_training_sigmas(self.config), np.float64(sigma)))


@functools.cache
def alphas_cumprod(config: SchedulerConfig) -> np.ndarray:
    """Cumulative products of (1 - beta), float32, as diffusers computes them (float64 accumulation)."""
    n = config.num_train_timesteps
    if config.beta_schedule == "scaled_linear":
        betas = _linspace_float32(config.beta_start**0.5, config.beta_end**0.5, n) ** 2
    else:
        betas = _linspace_float32(config.beta_start, config.beta_end, n)
    # torch's CPU cumprod accumulates float32 in float64; doing the same keeps the tables equal.
    out = np.cumprod((np.float32(1.0) - betas).astype(np.float64)).astype(np.float32)
    out.flags.writeable = False
    return out


def _linspace_float32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(..., dtype=float32) to within one ulp: float32 steps from both ends towards the middle.

    (torch's vectorised kernel rounds some elements differently; through 1 - beta and the
    cumulative product that leaves alphas_cumprod within 2 ulps of diffusers'.)
    """
    start32, end32 = np.float32(start), np.float32(end)
    step = (end32 - start32) / np.float32(n - 1)
    i = np.arange(n)
    front = start32 + step * i.astype(np.float32)
    back = end32 - step * (n - 1 - i).astype(np.float32)
    return np.where(i < n // 2, front, back).astype(np.float32)


@functools.cache
def training_sigmas(config: SchedulerConfig) -> np.ndarray:
    """sigma(t) for every training timestep t, float32, increasing."""
    a = alphas_cumprod(config)
    out = np.sqrt((np.float32(1.0) - a) / a)
    out.flags.writeable = False
    return out


@functools.cache
def log_training_sigmas(config: SchedulerConfig) -> np.ndarray:
    out = np.log(training_sigmas(config))
    out.flags.writeable = False
    return out


def sigma_of_alpha(alpha_cumprod: float) -> float:
    return math.sqrt((1.0 - alpha_cumprod) / alpha_cumprod)


def sigmas_to_timesteps(log_sigmas: np.ndarray, sigma) -> np.ndarray:
    """Fractional timesteps of noise levels, by linear interpolation in log-sigma (k-diffusion's sigma_to_t)."""
    sigma = np.asarray(sigma)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    # Index of the last training sigma not above each sigma, kept inside the table so that
    # levels outside it extrapolate to the nearest end (the weight is clipped below).
    low = np.clip(np.searchsorted(log_sigmas, log_sigma, side="right") - 1, 0, len(log_sigmas) - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0.0, 1.0)
    return (1.0 - w) * low + w * (low + 1)


def spaced_timesteps(config: SchedulerConfig, steps: int, style: str) -> np.ndarray:
    """The `steps` training timesteps a diffusers scheduler of `style` picks, highest first.

    Euler-style timesteps are float32 and, for "linspace", fractional; DDIM and DPM-Solver round
    to integers. DPM-Solver spaces steps + 1 points for "linspace"/"leading" and drops t = 0.
    """
    n = config.num_train_timesteps
    count = steps + 1 if style == "dpm" else steps
    if config.timestep_spacing == "linspace":
        t = np.linspace(0, n - 1, count, dtype=np.float32 if style == "euler" else np.float64)
        t = (t if style == "euler" else t.round())[::-1][:steps]
    elif config.timestep_spacing == "leading":
        t = (np.arange(count) * (n // count)).round()[::-1][:steps] + config.steps_offset
    else:  # trailing
        # diffusers writes np.arange(n, 0, -n / steps), which for some step counts (61, 103, ...)
        # yields one timestep too many, ending at -1; n - i * ratio gives exactly `steps`.
        t = np.round(n - np.arange(steps) * (n / steps)) - 1
    return t.astype(np.float32 if style == "euler" else np.int64)


def _ays_table(family: str | None) -> str:
    from coreml_sd.families import get_family

    return get_family(family).align_your_steps if family else "sd1"


def make_plan(config: SchedulerConfig, sampler: str, steps: int, schedule: str = "default", *,
              family: str | None = None, a1111: bool = False) -> SamplingPlan:
    """The sigmas and timesteps `sampler` walks in `steps` steps with `schedule` (see SCHEDULES).

    `a1111`: AUTOMATIC1111's plan whatever the sampler ("default" = "automatic", "karras" = its
    Karras), for recipes made there: the seven diffusers samplers otherwise keep diffusers' plans
    for "default" and "karras" (and DPM++ 2M SDE then diffusers' noise, not A1111's Brownian tree).
    `family` (a registered family's name) picks Align Your Steps' table (`Family.align_your_steps`);
    it changes nothing else.
    """
    if sampler not in SAMPLERS:
        raise InputError(f"unknown sampler {sampler!r}; valid samplers: {choices_text(SAMPLERS)}")
    if schedule not in SCHEDULES:
        raise InputError(f"unknown schedule {schedule!r}; valid schedules: {choices_text(SCHEDULES)}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= config.num_train_timesteps:
        raise InputError(f"steps must be an integer from 1 to {config.num_train_timesteps}; got {steps!r}")
    style = SAMPLERS[sampler].plan_style
    if style == "lcm" and not a1111 and schedule == "default":
        return lcm_plan(config, int(steps))
    if a1111 or style in (None, "lcm") or schedule not in DIFFUSERS_SCHEDULES:
        from coreml_sd.plans_a1111 import a1111_plan

        return a1111_plan(config, sampler, int(steps), "automatic" if schedule == "default" else schedule,
                          sdxl=_ays_table(family) == "sdxl")
    config = with_unset_defaults(config, style)
    if style == "dpm":
        return _dpm_plan(config, int(steps), schedule == "karras")
    if style == "ddim" and schedule == "default":
        return _ddim_plan(config, int(steps))
    plan = _euler_plan(config, int(steps), schedule == "karras")
    if style == "ddim":
        # DDIMScheduler has no Karras option. DDIM (eta=0) is Euler in sigma space, so it walks the
        # Euler-style Karras sigmas, starting from unit noise in model scale as DDIM always does.
        return replace(plan, init_noise_sigma=1.0)
    return plan


def with_spacing(config: SchedulerConfig, spacing: str | None) -> SchedulerConfig:
    """`config` with another timestep spacing (None: the model's own). Few-step distilled models
    (SD-Turbo, Hyper-SD) sample "trailing": their first step starts at the last training timestep."""
    if spacing is None:
        return config
    if spacing not in TIMESTEP_SPACINGS:
        raise InputError(f"unknown timestep spacing {spacing!r}; valid: {choices_text(TIMESTEP_SPACINGS)}")
    return replace(config, timestep_spacing=spacing)


def with_unset_defaults(config: SchedulerConfig, style: str) -> SchedulerConfig:
    """`config` with the keys the model's config left unset (None) filled as `style`'s diffusers scheduler fills them."""
    unset = {k: v for k, v in UNSET_DEFAULTS[style].items() if getattr(config, k, None) is None}
    return replace(config, **unset) if unset else config


def _euler_plan(config: SchedulerConfig, steps: int, karras: bool) -> SamplingPlan:
    """EulerDiscreteScheduler / EulerAncestralDiscreteScheduler's set_timesteps."""
    timesteps = spaced_timesteps(config, steps, "euler")
    table = training_sigmas(config)
    sigmas = np.interp(timesteps, np.arange(len(table)), table)
    if karras:
        # The Karras range is that of the chosen timesteps (e.g. sigma(961)..sigma(1) for 25 steps
        # of "leading" spacing), not the model's full range: diffusers' choice, kept for parity.
        sigmas = karras_sigmas(float(sigmas[-1]), float(sigmas[0]), steps)
        timesteps = sigmas_to_timesteps(log_training_sigmas(config), sigmas)
    sigmas = np.append(sigmas, 0.0).astype(np.float32)
    sigma_max = float(sigmas.max())
    if config.timestep_spacing == "leading":
        init = math.sqrt(sigma_max**2 + 1.0)
    else:
        init = sigma_max
    return _plan(sigmas, timesteps, init, config)


def _ddim_plan(config: SchedulerConfig, steps: int) -> SamplingPlan:
    """DDIMScheduler's set_timesteps and the landing points of its step (eta = 0)."""
    timesteps = spaced_timesteps(config, steps, "ddim")
    a = alphas_cumprod(config)
    final = 1.0 if config.set_alpha_to_one else float(a[0])
    landing = timesteps - config.num_train_timesteps // steps
    targets = [sigma_of_alpha(float(a[t])) if t >= 0 else sigma_of_alpha(final) for t in landing]
    sigmas = [sigma_of_alpha(float(a[t])) for t in timesteps] + [targets[-1]]
    plan = _plan(np.asarray(sigmas), timesteps, 1.0, config)
    if list(plan.sigmas[1:]) != [float(np.float32(s)) for s in targets]:
        plan = replace(plan, targets=tuple(float(np.float32(s)) for s in targets))
    return plan


def _dpm_plan(config: SchedulerConfig, steps: int, karras: bool) -> SamplingPlan:
    """DPMSolverMultistepScheduler's set_timesteps (final_sigmas_type="zero")."""
    table = training_sigmas(config)
    if karras:
        sigmas = karras_sigmas(float(table[0]), float(table[-1]), steps)
        timesteps = sigmas_to_timesteps(log_training_sigmas(config), sigmas).round()
    else:
        timesteps = spaced_timesteps(config, steps, "dpm")
        sigmas = np.interp(timesteps, np.arange(len(table)), table)
    sigmas = np.append(sigmas, 0.0).astype(np.float32)
    return _plan(sigmas, timesteps, 1.0, config)


LCM_ORIGINAL_STEPS = 50  # LCMScheduler's original_inference_steps: the distillation's schedule


def lcm_plan(config: SchedulerConfig, steps: int, original_steps: int = LCM_ORIGINAL_STEPS) -> SamplingPlan:
    """LCMScheduler's set_timesteps: `steps` of the distillation's `original_steps` timesteps
    (k - 1, 2k - 1, ... for k = num_train_timesteps // original_steps), evenly spaced by index from
    the top (4 steps of SD's 1000: 999, 759, 499, 259); integer timesteps, unit initial noise."""
    if steps > original_steps:
        raise InputError(f"LCM samples at most {original_steps} steps (the timesteps it was distilled on); "
                         f"got {steps}")
    k = config.num_train_timesteps // original_steps
    origin = (np.arange(1, original_steps + 1) * k - 1)[::-1]
    timesteps = origin[np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)]
    a = alphas_cumprod(config)
    sigmas = [sigma_of_alpha(float(a[t])) for t in timesteps] + [0.0]
    plan = _plan(np.asarray(sigmas), timesteps, 1.0, config)
    return replace(plan, extras=(("timesteps", plan.timesteps),))


def _plan(sigmas, timesteps, init_noise_sigma: float, config: SchedulerConfig) -> SamplingPlan:
    # Sigmas are float32 in diffusers; Python floats of those values keep the same arithmetic.
    sigmas = np.asarray(sigmas, dtype=np.float64).astype(np.float32)
    return SamplingPlan(
        sigmas=tuple(float(s) for s in sigmas),
        timesteps=tuple(float(t) for t in np.asarray(timesteps).astype(np.float32)),
        init_noise_sigma=float(init_noise_sigma),
        config=config,
    )
