"""An A1111 request body -> a validated `GenerationRequest` the worker runs.

Names are resolved the way A1111 users type them: samplers by A1111's display name ("Euler a",
"DPM++ 2M"), coreml-sd's name ("euler_a") or A1111's old aliases ("k_euler_a"), with the legacy
"DPM++ 2M Karras" form splitting into sampler and schedule; schedulers by name, "automatic"
meaning the model's own. Both lists are read from coreml_sd.samplers / coreml_sd.schedules at
request time, so samplers added there are served without a change here.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from coreml_sd.errors import InputError
from coreml_sd.serve.config import ServeConfig
from coreml_sd.serve.errors import field_error
from coreml_sd.serve.schemas import IGNORED, INERT, GenerationBody, Img2ImgBody

DEFAULT_SAMPLER = "Euler a"
AUTOMATIC = ("", "automatic", "default")
# A1111's inpainting_fill codes -> the names its UI shows ("Masked content").
MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")


@dataclass(frozen=True)
class GenerationRequest:
    """One request, validated, in coreml-sd's terms."""

    task_id: str
    kind: str  # "txt2img" | "img2img"
    prompt: str
    negative_prompt: str
    seed: int
    num_images: int
    batch_size: int
    sampler: str  # a coreml_sd.samplers.SAMPLERS key
    schedule: str  # a coreml_sd.schedules.SCHEDULES name
    steps: int
    guidance_scale: float
    width: int | None
    height: int | None
    model: str | None = None  # override_settings.sd_model_checkpoint
    save: bool = True
    send_images: bool = True
    init_images: tuple = ()  # PIL images; image i of the request uses init_images[i % len]
    image_options: dict[str, Any] = field(default_factory=dict)  # Pipeline.generate keyword arguments
    warnings: tuple[str, ...] = ()
    parameters: dict[str, Any] = field(default_factory=dict)  # the request as the response echoes it

    def generate_kwargs(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "negative_prompt": self.negative_prompt, "batch_size": self.batch_size,
                "sampler": self.sampler, "schedule": self.schedule, "steps": self.steps,
                "guidance_scale": self.guidance_scale, "width": self.width, "height": self.height}


def _norm(name: str) -> str:
    return re.sub(r"[\s_]+", " ", str(name).strip().lower())


def sampler_names() -> dict[str, list[str]]:
    """SAMPLERS key -> every name that selects it."""
    from coreml_sd.samplers import SAMPLERS

    return {key: [info.display_name, key, f"k_{key}"] for key, info in SAMPLERS.items()}


def schedule_names() -> list[str]:
    from coreml_sd.schedules import SCHEDULES

    return list(SCHEDULES)


def resolve_sampler(name: str | None, scheduler: str | None) -> tuple[str, str]:
    """(sampler key, schedule) for A1111's sampler_name and scheduler fields."""
    wanted = _norm(name or DEFAULT_SAMPLER)
    names = sampler_names()
    schedules = schedule_names()
    legacy_schedule = None
    key = next((k for k, ns in names.items() if wanted in map(_norm, ns)), None)
    if key is None:  # "DPM++ 2M Karras": A1111 before 1.9 put the schedule in the sampler's name
        for schedule in schedules:
            suffix = " " + _norm(schedule)
            if schedule != "default" and wanted.endswith(suffix):
                base = wanted[: -len(suffix)]
                key = next((k for k, ns in names.items() if base in map(_norm, ns)), None)
                legacy_schedule = schedule if key else None
                if key:
                    break
    if key is None:
        valid = ", ".join(ns[0] for ns in names.values())
        raise field_error("sampler_name", f"unknown sampler {name!r}; valid samplers: {valid}")
    return key, resolve_schedule(scheduler, legacy_schedule, schedules)


def resolve_schedule(scheduler: str | None, legacy: str | None, schedules: list[str]) -> str:
    if scheduler is None or _norm(scheduler) in AUTOMATIC:
        return legacy or "default"
    for schedule in schedules:
        if _norm(scheduler) == _norm(schedule):
            return schedule
    valid = ", ".join(["automatic"] + [s for s in schedules if s != "default"])
    raise field_error("scheduler", f"unknown scheduler {scheduler!r}; valid schedulers: {valid}")


def field_warnings(body: GenerationBody) -> list[str]:
    """A warning per A1111 field that is set but not implemented, and per unknown field."""
    warnings = []
    for key, value in (body.model_extra or {}).items():
        if key in IGNORED:
            if value is not None and value not in IGNORED[key]:
                warnings.append(f"{key}={value!r} is not supported by coreml-sd and was ignored")
        elif key not in INERT:
            warnings.append(f"unknown field {key!r} was ignored")
    for key in body.override_settings:
        if key != "sd_model_checkpoint":
            warnings.append(f"override_settings.{key} is not supported by coreml-sd and was ignored")
    return warnings


def _check_counts(body: GenerationBody, config: ServeConfig) -> int:
    num_images = body.n_iter * body.batch_size
    if num_images > config.max_images:
        raise field_error("n_iter", f"n_iter * batch_size = {num_images} images; this server makes at most "
                                    f"{config.max_images} per request")
    if body.steps > config.max_steps:
        raise field_error("steps", f"steps must be at most {config.max_steps}; got {body.steps}")
    return num_images


def _check_size(body: GenerationBody, config: ServeConfig) -> None:
    from coreml_sd.pipeline import check_side

    for name in ("width", "height"):
        value = getattr(body, name)
        if value is not None:
            try:
                check_side(value, name)
            except InputError as exc:
                raise field_error(name, str(exc)) from None
    if body.width and body.height and body.width * body.height > config.max_image_pixels:
        raise field_error("width", f"{body.width}x{body.height} is over this server's limit of "
                                   f"{config.max_image_pixels} pixels (--max-image-pixels)")


def _seed(body: GenerationBody, num_images: int) -> int:
    from coreml_sd.pipeline import MAX_SEED, random_seed

    seed = random_seed() if body.seed == -1 else body.seed
    if seed > MAX_SEED - (num_images - 1):
        raise field_error("seed", f"seed must be between -1 and {MAX_SEED - num_images + 1}; got {body.seed}")
    return seed


def base_request(body: GenerationBody, config: ServeConfig, kind: str) -> GenerationRequest:
    """The fields txt2img and img2img share, checked; img2img adds its images after."""
    num_images = _check_counts(body, config)
    _check_size(body, config)
    sampler, schedule = resolve_sampler(body.sampler_name or body.sampler_index, body.scheduler)
    model = body.override_settings.get("sd_model_checkpoint")
    if model is not None and not isinstance(model, str):
        raise field_error(("override_settings", "sd_model_checkpoint"), "expected a model title (a string)")
    params = body.model_dump(exclude={"init_images", "mask"})
    return GenerationRequest(
        task_id=body.force_task_id or f"task({uuid.uuid4().hex[:15]})", kind=kind, prompt=body.prompt,
        negative_prompt=body.negative_prompt, seed=_seed(body, num_images), num_images=num_images,
        batch_size=body.batch_size, sampler=sampler, schedule=schedule, steps=body.steps,
        guidance_scale=float(body.cfg_scale), width=body.width, height=body.height, model=model,
        save=config.output is not None and not body.do_not_save_samples, send_images=body.send_images,
        warnings=tuple(field_warnings(body)), parameters=params)


def img2img_options(body: Img2ImgBody, config: ServeConfig) -> tuple[tuple, dict[str, Any], list[str]]:
    """(init images, Pipeline.generate keyword arguments, warnings) from A1111's img2img fields."""
    from PIL import ImageOps

    from coreml_sd.serve.codec import decode_image

    images = tuple(decode_image(data, f"init_images.{i}", config.max_image_pixels)
                   for i, data in enumerate(body.init_images))
    options: dict[str, Any] = {"strength": float(body.denoising_strength)}
    if body.resize_mode != 0:
        options["resize_mode"] = body.resize_mode
    warnings = []
    if body.mask:
        mask = decode_image(body.mask, "mask", config.max_image_pixels).convert("L")
        blur_x = body.mask_blur if body.mask_blur_x is None else body.mask_blur_x
        blur_y = body.mask_blur if body.mask_blur_y is None else body.mask_blur_y
        if blur_x != blur_y:
            warnings.append(f"mask_blur_x={blur_x} and mask_blur_y={blur_y} differ; coreml-sd blurs both "
                            f"directions by {max(blur_x, blur_y)}")
        options.update(mask=ImageOps.invert(mask) if body.inpainting_mask_invert else mask,
                       mask_blur=max(blur_x, blur_y), inpaint_full_res=body.inpaint_full_res,
                       inpaint_padding=body.inpaint_full_res_padding,
                       masked_content=MASKED_CONTENT[body.inpainting_fill])
    return images, options, warnings
