"""Configuration as frozen dataclasses, each built from upstream JSON in exactly one place.

Unknown keys are an error: a scheduler option we silently ignored would change the images without
anyone noticing. Keys known not to affect sampling here are listed and skipped on purpose.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

from coreml_sd.errors import ModelError, choices_text

BETA_SCHEDULES = ("scaled_linear", "linear")
PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")

# Scheduler-config keys that name a particular diffusers scheduler's own knobs rather than the
# model's noise schedule; the samplers here define those behaviours themselves.
_SCHEDULER_KEYS_IGNORED = frozenset({
    "_class_name", "_diffusers_version", "clip_sample", "clip_sample_range", "skip_prk_steps",
    "sample_max_value", "dynamic_thresholding_ratio", "use_karras_sigmas", "use_exponential_sigmas",
    "use_beta_sigmas", "interpolation_type", "timestep_type", "final_sigmas_type", "solver_order",
    "algorithm_type", "solver_type", "lower_order_final", "euler_at_final", "lambda_min_clipped",
    "variance_type", "sigma_min", "sigma_max", "use_lu_lambdas", "use_flow_sigmas", "flow_shift",
    "shift", "eta", "s_noise", "rescale_betas_zero_snr_", "noise_sampler_seed",
})
# Keys that change the schedule; only their default value is supported.
_SCHEDULER_KEYS_DEFAULT_ONLY = {"trained_betas": None, "thresholding": False, "rescale_betas_zero_snr": False}


@dataclass(frozen=True)
class SchedulerConfig:
    """The model's training noise schedule (diffusers `scheduler_config.json`)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    # None = absent from the model's config: each diffusers scheduler then uses its own default
    # (SD 1.5's published config has no timestep_spacing: Euler/DPM-Solver run "linspace", DDIM
    # "leading"), which coreml_sd.schedules reproduces per sampler.
    timestep_spacing: str | None = None
    steps_offset: int | None = None
    set_alpha_to_one: bool | None = None

    def __post_init__(self):
        for name, value, valid in (
            ("beta_schedule", self.beta_schedule, BETA_SCHEDULES),
            ("prediction_type", self.prediction_type, PREDICTION_TYPES),
            ("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS + (None,)),
        ):
            if value not in valid:
                raise ModelError(f"scheduler config: {name} is {value!r}; supported: {choices_text(valid)}")

    @classmethod
    def from_dict(cls, data: dict) -> "SchedulerConfig":
        known = {f.name for f in fields(cls)}
        kwargs = {}
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif key in _SCHEDULER_KEYS_DEFAULT_ONLY:
                if value not in (_SCHEDULER_KEYS_DEFAULT_ONLY[key], None):
                    raise ModelError(
                        f"scheduler config: {key}={value!r} is not supported "
                        f"(only {_SCHEDULER_KEYS_DEFAULT_ONLY[key]!r})"
                    )
            elif key not in _SCHEDULER_KEYS_IGNORED:
                raise ModelError(
                    f"scheduler config: unknown key {key!r}; known keys: {choices_text(sorted(known))}"
                )
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: Path) -> "SchedulerConfig":
        return cls.from_dict(read_json(path))

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise ModelError(f"expected a JSON file at {path}, found nothing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data
