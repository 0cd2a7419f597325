"""One inpainting request's image side: `prepare_inpaint` before sampling, `finish_inpaint` after.

The order of operations is AUTOMATIC1111's `StableDiffusionProcessingImg2Img.init`: the mask is
blurred at the image's own size, then either the whole picture is resized to the generation size,
or ("Only masked") the padded box around the blurred mask is cut out and resized with "fill"; the
"fill" masked content is painted into the model's input. The tensors the model sees are diffusers'
(`mask_to_array`, `masked_image`, `mask_to_latent`); the paste-back keeps every pixel outside the
mask (see coreml_sd.masks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from coreml_sd.errors import InputError
from coreml_sd.image_input import image_to_array, load_image, parse_resize_mode, resize_image
from coreml_sd.masks import (blur_mask, crop_region, crop_to_region, fill_masked, load_mask, mask_to_array,
                             mask_to_latent, masked_image, overlay_alpha, parse_masked_content, paste_back)

LATENT_FACTOR = 8  # pixels per latent cell (the VAE's downsampling)


@dataclass(frozen=True)
class InpaintSettings:
    """A1111's inpaint options, with its defaults."""

    mask_blur: int = 4
    only_masked: bool = False        # "Inpaint area: Only masked" (--inpaint-full-res)
    padding: int = 32                # "Only masked padding, pixels"
    masked_content: str = "original"  # original | fill | latent-noise | latent-nothing
    resize_mode: str = "stretch"     # how the whole picture reaches the generation size
    invert: bool = False             # "Mask mode: Inpaint not masked"

    def a1111_params(self) -> dict[str, str]:
        """The infotext keys A1111 writes for these settings."""
        params = {"Mask blur": str(self.mask_blur)} if self.mask_blur else {}
        if self.invert:
            params["Mask mode"] = "Inpaint not masked"
        if self.only_masked:
            params.update({"Inpaint area": "Only masked", "Masked area padding": str(self.padding)})
        if self.masked_content != "original":
            params["Masked content"] = self.masked_content.replace("-", " ")
        return params


@dataclass(frozen=True)
class InpaintInputs:
    """What the pipeline needs for one inpainting request, at generation size H x W."""

    image: np.ndarray         # (1, 3, H, W) in [-1, 1]: encode with the VAE (init latents)
    mask: np.ndarray          # (1, 1, H, W) of 0/1: diffusers' mask_condition
    masked_image: np.ndarray  # (1, 3, H, W): encode for a 9-channel UNet's masked-image latents
    latent_mask: np.ndarray   # (1, 1, H/8, W/8) of 0/1: the 9-channel mask input and the 4-channel blend
    masked_content: str
    original: Any             # PIL RGB the result is pasted onto (the output's size)
    alpha: Any                # PIL L paste-back alpha over `original`
    box: tuple[int, int, int, int] | None  # "Only masked" box in `original`, else None


def prepare_inpaint(image: Any, mask: Any, width: int, height: int,
                    settings: InpaintSettings = InpaintSettings(), *, latent_factor: int = LATENT_FACTOR) -> InpaintInputs:
    """Init image and mask (paths or PIL) -> InpaintInputs for a width x height generation
    (`latent_factor`: the VAE's pixels per latent cell)."""
    if width % latent_factor or height % latent_factor:
        raise InputError(f"inpainting size must be multiples of {latent_factor}, got {width}x{height}")
    content = parse_masked_content(settings.masked_content)
    init = load_image(image)
    user_mask = load_mask(mask, init.size, invert=settings.invert)
    blurred = blur_mask(user_mask, settings.mask_blur)
    feather = settings.mask_blur > 0  # without blur the paste-back alpha is the mask itself
    if settings.only_masked:
        box = crop_region(blurred, settings.padding, width, height)
        model_image, model_mask = crop_to_region(init, box, width, height), crop_to_region(blurred, box, width, height)
        original, alpha = init, overlay_alpha(user_mask, blurred if feather else None)
    else:
        mode = parse_resize_mode(settings.resize_mode)
        box = None
        model_image, model_mask = resize_image(init, width, height, mode), resize_image(blurred, width, height, mode)
        original = model_image
        alpha = overlay_alpha(resize_image(user_mask, width, height, mode), model_mask if feather else None)
    if content == "fill":
        model_image = fill_masked(model_image, model_mask)
    pixels, mask_array = image_to_array(model_image), mask_to_array(model_mask)
    return InpaintInputs(image=pixels, mask=mask_array, masked_image=masked_image(pixels, mask_array),
                         latent_mask=mask_to_latent(mask_array, (height // latent_factor, width // latent_factor)),
                         masked_content=content, original=original, alpha=alpha, box=box)


def finish_inpaint(generated: Any, inputs: InpaintInputs) -> Any:
    """The decoded image (PIL, generation size) pasted back: the final picture."""
    return paste_back(inputs.original, generated, inputs.alpha, inputs.box)


def img2img_input(image: Any, width: int, height: int, resize_mode: str = "stretch") -> np.ndarray:
    """An init image (path or PIL) -> (1, 3, H, W) in [-1, 1] for the VAE encoder."""
    return image_to_array(resize_image(load_image(image), width, height, resize_mode))
