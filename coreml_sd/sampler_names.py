"""Sampler and schedule names as users type them: our keys, AUTOMATIC1111's names, its old combined names.

`resolve_sampler("DPM++ 2M Karras")` -> ("dpmpp_2m", "karras"): a key of `SAMPLERS`, A1111's
display name or alias (case-insensitive: "Euler a", "euler A", "k_euler_a"), optionally followed
by a schedule type, as A1111 named samplers before v1.9 ("DPM++ SDE Karras", "DPM++ 2M SDE
Exponential") and still accepts (its `get_sampler_and_scheduler`). `resolve_schedule("SGM
Uniform")` -> "sgm_uniform" likewise. Unknown names raise InputError listing the valid ones.
"""

from __future__ import annotations

import re

from coreml_sd.errors import InputError, choices_text
from coreml_sd.samplers import SAMPLERS
from coreml_sd.schedules import SCHEDULES
from coreml_sd.sigma_schedules import SCHEDULE_TYPES

# A1111's pre-1.9 aliases that carried the schedule: k_<sampler>_ka (Karras), _exp (Exponential).
_ALIAS_SCHEDULE_SUFFIXES = {"_ka": "karras", "_exp": "exponential"}


def _norm(text: str) -> str:
    return " ".join(str(text).lower().split())


def _squash(text: str) -> str:
    """Schedule names compare without case, spaces, '_' or '-' ("SGM Uniform" = "sgm_uniform" = "SGMUniform")."""
    return re.sub(r"[\s_\-]+", "", str(text).lower())


def _sampler_names() -> dict[str, str]:
    names = {}
    for key, info in SAMPLERS.items():
        for name in (key, info.display_name, *info.aliases):
            names[_norm(name)] = key
    return names


def _schedule_names() -> dict[str, str]:
    names = {"default": "default"}
    for key, schedule in SCHEDULE_TYPES.items():
        for name in (key, schedule.label, *schedule.aliases):
            names[_squash(name)] = key
    return names


def resolve_schedule(text: str) -> str:
    """Our schedule key for `text`: a key, an A1111 label or alias, any case ("Karras", "SGM Uniform", "sgm_uniform")."""
    key = _schedule_names().get(_squash(text))
    if key is None:
        labels = [s.label for s in SCHEDULE_TYPES.values()]
        raise InputError(f"unknown schedule {text!r}; valid schedules: {choices_text(SCHEDULES)} "
                         f"(or A1111's labels: {choices_text(labels)})")
    return key


def resolve_sampler(text: str) -> tuple[str, str | None]:
    """(sampler key, schedule key or None) for a sampler name, with or without a schedule suffix."""
    names = _sampler_names()
    norm = _norm(text)
    if norm in names:
        return names[norm], None
    for suffix, schedule in _ALIAS_SCHEDULE_SUFFIXES.items():
        if norm.endswith(suffix) and norm[: -len(suffix)] in names and norm.startswith("k_"):
            return names[norm[: -len(suffix)]], schedule
    for key, schedule in SCHEDULE_TYPES.items():
        for option in (schedule.label, key, *schedule.aliases):
            for sep in (" ", "_"):
                tail = sep + _norm(option)
                if norm.endswith(tail) and norm[: -len(tail)] in names:
                    return names[norm[: -len(tail)]], key
    raise InputError(f"unknown sampler {text!r}; valid samplers: {choices_text(SAMPLERS)} (or A1111's names: "
                     f"{choices_text(info.display_name for info in SAMPLERS.values())}, optionally followed by "
                     f"a schedule type, e.g. 'DPM++ 2M Karras')")


def resolve_sampler_and_schedule(sampler: str, schedule: str | None = None) -> tuple[str, str]:
    """The (sampler, schedule) keys a request means. A schedule named in the sampler ("DPM++ 2M Karras")
    wins, as in A1111; else `schedule` (any accepted spelling), else "default"."""
    key, named = resolve_sampler(sampler)
    if named is not None:
        return key, named
    return key, "default" if schedule is None else resolve_schedule(schedule)
