"""AUTOMATIC1111's API shapes (modules/api/models.py), as pydantic models.

Requests keep A1111's field names and defaults where coreml-sd implements the field; the fields
A1111 has that coreml-sd does not implement are listed in `IGNORED` with the values at which they
do nothing, so a request that sets one gets a warning in its `info` instead of a silent change of
meaning. Fields A1111 does not know at all are kept (`extra="allow"`) and warned about too.
Invalid values fail validation with a 422 that names the field, as in A1111.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

TASK_ID_PATTERN = r"^[A-Za-z0-9_\-().:]{1,100}$"


class GenerationBody(BaseModel):
    """The fields txt2img and img2img share."""

    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = Field(default=-1, ge=-1)
    sampler_name: str | None = None
    sampler_index: str | None = None  # A1111's older name for sampler_name
    scheduler: str | None = None
    batch_size: int = Field(default=1, ge=1)
    n_iter: int = Field(default=1, ge=1)
    steps: int = Field(default=20, ge=1)
    cfg_scale: float = Field(default=7.0, ge=0, allow_inf_nan=False)
    width: int | None = Field(default=None, ge=8)
    height: int | None = Field(default=None, ge=8)
    send_images: bool = True
    save_images: bool = False  # A1111 saves only when asked; this server saves unless started with --no-save
    do_not_save_samples: bool = False
    override_settings: dict[str, Any] = Field(default_factory=dict)
    override_settings_restore_afterwards: bool = True
    force_task_id: str | None = Field(default=None, pattern=TASK_ID_PATTERN)


class Txt2ImgBody(GenerationBody):
    pass


class Img2ImgBody(GenerationBody):
    init_images: list[str] = Field(min_length=1, max_length=64)
    resize_mode: int = Field(default=0, ge=0, le=3)
    denoising_strength: float = Field(default=0.75, ge=0, le=1, allow_inf_nan=False)
    mask: str | None = None
    mask_blur: int = Field(default=4, ge=0, le=256)
    mask_blur_x: int | None = Field(default=None, ge=0, le=256)
    mask_blur_y: int | None = Field(default=None, ge=0, le=256)
    inpainting_fill: int = Field(default=0, ge=0, le=3)
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = Field(default=0, ge=0, le=1024)
    inpainting_mask_invert: int = Field(default=0, ge=0, le=1)
    include_init_images: bool = False


# A1111 fields coreml-sd does not implement -> the values at which they change nothing. A request
# with any other value gets a warning that the field was ignored.
IGNORED: dict[str, tuple] = {
    "enable_hr": (False,), "restore_faces": (False,), "tiling": (False,), "subseed_strength": (0,),
    "styles": ([],), "script_name": ("",), "script_args": ([],), "alwayson_scripts": ({},),
    "eta": (1,), "s_churn": (0,), "s_tmax": (0,), "s_tmin": (0,), "s_noise": (1,), "s_min_uncond": (0,),
    "infotext": ("",), "refiner_checkpoint": ("", "None"), "initial_noise_multiplier": (1,),
    "image_cfg_scale": (1.5,), "latent_mask": ("",), "comments": ({},), "disable_extra_networks": (False,),
}
# A1111 fields that only matter when an ignored one is on, or are bookkeeping: accepted silently.
INERT = frozenset({
    "hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x", "hr_resize_y", "hr_checkpoint_name",
    "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt", "hr_additional_modules",
    "firstphase_width", "firstphase_height", "denoising_strength", "subseed", "seed_resize_from_h",
    "seed_resize_from_w", "do_not_save_grid", "refiner_switch_at", "sampler_noise_scheduler_override",
    "firstpass_image", "outpath_samples", "outpath_grids", "seed_enable_extras", "is_using_inpainting_conditioning",
    "inpaint_full_res_padding", "mask_round", "force_task_id", "user",
})


class TextToImageResponse(BaseModel):
    images: list[str] | None = None  # base64 PNGs with the `parameters` text chunk
    parameters: dict
    info: str  # JSON text, as A1111's Processed.js()


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: dict
    current_image: str | None = None
    textinfo: str | None = None


class PNGInfoBody(BaseModel):
    image: str


class PNGInfoResponse(BaseModel):
    info: str
    items: dict
    parameters: dict
