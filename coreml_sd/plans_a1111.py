"""AUTOMATIC1111's sampling plans: which sigmas and UNet timesteps each of its samplers walks.

A1111 (v1.10, `modules/sd_samplers_*.py`) samples in four ways, and `a1111_plan` reproduces each:

* k-diffusion samplers: the schedule type's sigmas over k-diffusion's wrapper of the model
  (`DiscreteSigmas`: the training sigmas, fractional timesteps interpolated in log-sigma), the
  initial latent noise * sigmas[0] in sigma space; "automatic" is the sampler's own default
  (Karras for DPM++ 2M, Exponential for the 2M/3M SDE samplers, the model's uniform sigmas for
  Euler...), and DPM2, DPM2 a and DPM++ 3M SDE compute one step more and drop the next-to-last sigma.
* LCM: the same over A1111's LCM wrapper (only LCM's 50 original timesteps; timesteps quantized).
* DPM fast / DPM adaptive: the model's whole sigma range whatever the schedule type; DPM fast
  spends `steps` model evaluations on a grid uniform in log-sigma.
* DDIM, PLMS, UniPC ("timesteps" samplers): A1111's own timesteps 1, 1 + 1000 // steps, ... on
  model-scale latents starting from unit noise, whatever the schedule type. DDIM and PLMS then
  run one step fewer than the timesteps (ending on timestep 1's noise level, as A1111 does); UniPC
  runs its time-uniform continuous schedule from timestep 999 to 0 in that many steps.

The plans are `SamplingPlan`s with convention "a1111" (A1111's Brownian noise for SDE samplers).
One known difference: for v-prediction models A1111's timesteps samplers turn v into eps with
the alphas of the timestep truncated to an integer (UniPC's timesteps are fractional); our
denoiser uses the noise level's own alpha.
"""

from __future__ import annotations

import numpy as np

from coreml_sd.config import SchedulerConfig
from coreml_sd.dpm_solver import fast_grid
from coreml_sd.errors import InputError
from coreml_sd.samplers import SAMPLERS
from coreml_sd.schedules import SamplingPlan, alphas_cumprod, training_sigmas
from coreml_sd.sigma_schedules import SCHEDULE_TYPES, DiscreteSigmas, lcm_sigmas


def a1111_plan(config: SchedulerConfig, sampler: str, steps: int, schedule: str, *, sdxl: bool = False) -> SamplingPlan:
    """A1111's plan for `sampler` with schedule type `schedule` ("automatic": the sampler's default)."""
    info = SAMPLERS[sampler]
    if info.a1111_kind == "timesteps":
        return _unipc_plan(config, steps) if sampler == "unipc" else _timesteps_plan(config, steps)
    if info.a1111_kind == "dpm_solver":
        return _dpm_solver_plan(config, steps, fast=sampler == "dpm_fast")
    model = lcm_sigmas(training_sigmas(config)) if info.a1111_kind == "lcm" else DiscreteSigmas(training_sigmas(config))
    name = (info.a1111_schedule or "uniform") if schedule == "automatic" else schedule
    n = steps + 1 if info.discard_penultimate else steps
    sigmas = SCHEDULE_TYPES[name].function(n, model, sdxl)
    if info.discard_penultimate:
        sigmas = np.concatenate([sigmas[:-2], sigmas[-1:]])
    extras = (("timesteps", _timesteps_tuple(model, sigmas)),) if info.a1111_kind == "lcm" else ()
    return _plan(sigmas, model.sigma_to_t(sigmas[:-1]), float(sigmas[0]), config, model_scale=False, extras=extras)


def _timesteps_tuple(model, sigmas) -> tuple[float, ...]:
    return tuple(float(t) for t in model.sigma_to_t(sigmas[:-1]))


def a1111_timesteps(config: SchedulerConfig, steps: int) -> np.ndarray:
    """A1111's timesteps for DDIM/PLMS/UniPC, increasing: 1, 1 + n // steps, ... (clipped to n - 1)."""
    n = config.num_train_timesteps
    return np.clip(np.arange(0, n, n // steps) + 1, 0, n - 1)


def _timesteps_plan(config: SchedulerConfig, steps: int) -> SamplingPlan:
    timesteps = a1111_timesteps(config, steps)[::-1]
    if len(timesteps) < 2:
        raise InputError(f"A1111's DDIM and PLMS need at least 2 steps; got {steps}")
    a = alphas_cumprod(config).astype(np.float64)[timesteps]
    sigmas = np.sqrt((1.0 - a) / a)
    return _plan(sigmas, timesteps[:-1], 1.0, config, model_scale=True)


def _unipc_plan(config: SchedulerConfig, steps: int) -> SamplingPlan:
    """UniPC's time-uniform steps over the discrete schedule seen as continuous (log-alpha interpolated)."""
    count = len(a1111_timesteps(config, steps))
    if count < 2:
        raise InputError(f"A1111's UniPC needs at least 2 steps; got {steps}")
    n = config.num_train_timesteps
    # Continuous time t in [1/n, 1]; the UNet gets (t - 1/n) * 1000, the schedule index (t - 1/n) * n.
    t = np.linspace(1.0, 1.0 / n, count + 1, dtype=np.float32).astype(np.float64)
    index = (t - 1.0 / n) * n
    log_alpha = np.interp(index, np.arange(n), 0.5 * np.log(alphas_cumprod(config).astype(np.float64)))
    sigmas = np.sqrt(np.expm1(-2.0 * log_alpha))
    return _plan(sigmas, ((t - 1.0 / n) * 1000.0)[:-1], 1.0, config, model_scale=True)


def _dpm_solver_plan(config: SchedulerConfig, steps: int, *, fast: bool) -> SamplingPlan:
    model = DiscreteSigmas(training_sigmas(config))
    if fast:
        sigmas = fast_grid(model.sigma_min, model.sigma_max, steps)
        extras = (("nfe", steps),)
    else:  # adaptive: only the range; the solver chooses its steps
        sigmas, extras = np.asarray([model.sigma_max, model.sigma_min]), ()
    return _plan(sigmas, model.sigma_to_t(sigmas[:-1]), model.sigma_max, config, model_scale=False, extras=extras)


def _plan(sigmas, timesteps, init_noise_sigma: float, config: SchedulerConfig, *, model_scale: bool,
          extras: tuple = ()) -> SamplingPlan:
    sigmas = np.asarray(sigmas, dtype=np.float64).astype(np.float32)  # A1111's sigma tensors are float32
    return SamplingPlan(
        sigmas=tuple(float(s) for s in sigmas),
        timesteps=tuple(float(t) for t in np.asarray(timesteps, dtype=np.float64).astype(np.float32)),
        init_noise_sigma=float(np.float32(init_noise_sigma)),
        config=config,
        convention="a1111",
        model_scale=model_scale,
        extras=extras,
    )
