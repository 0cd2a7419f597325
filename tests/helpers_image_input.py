"""Diffusers' real image pipelines built without models, for their image and mask processors."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

_NO_MODELS = dict(vae=None, text_encoder=None, tokenizer=None, unet=None, scheduler=None,
                  safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@lru_cache(maxsize=None)
def diffusers_img2img():
    from diffusers import StableDiffusionImg2ImgPipeline

    return StableDiffusionImg2ImgPipeline(**_NO_MODELS)


@lru_cache(maxsize=None)
def diffusers_inpaint():
    from diffusers import StableDiffusionInpaintPipeline

    return StableDiffusionInpaintPipeline(**_NO_MODELS)


@lru_cache(maxsize=None)
def diffusers_controlnet():
    from diffusers import StableDiffusionControlNetPipeline

    return StableDiffusionControlNetPipeline(controlnet=None, **_NO_MODELS)


def noise_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    x = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(x[..., 0] if channels == 1 else x, mode)


def smooth_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth random RGB picture (blurred noise), closer to a photo than white noise."""
    from PIL import ImageFilter

    return noise_image(width, height, seed=seed).filter(ImageFilter.GaussianBlur(3))
