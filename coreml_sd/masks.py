"""Inpainting masks: loading, blur, the arrays the UNet sees, "Only masked" crops and the paste-back.

Conventions (AUTOMATIC1111's): white = repaint. A mask with transparency that is not fully opaque
is read from its alpha channel (opaque = repaint, thresholded at 128 as A1111's
`create_binary_mask`); otherwise from its gray levels.

What the models see follows diffusers' `StableDiffusionInpaintPipeline` (the reference our tests
compare with): the mask is resized with Lanczos, binarized at 0.5 (`mask_to_array`), downsampled to
the latent grid with nearest neighbour (`mask_to_latent`), and 9-channel UNets get the image with
the masked pixels zeroed (`masked_image`).

The paste-back differs from A1111 on purpose. A1111 feathers the seam *outward* (its overlay mask
is the blurred mask doubled), so pixels just outside the user's mask change. Here the feather is
mirrored *inward*: the overlay alpha is clip(2 * blurred - 1), never more than the mask itself, so
every pixel outside the mask keeps its original value exactly, and a straight edge gets the same
ramp width as in A1111, only on the other side (`overlay_alpha`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from coreml_sd.errors import InputError, choices_text
from coreml_sd.image_input import (SIXTEEN_BIT_MODES, name_key, open_image, opencv, resize_image,
                                   sixteen_to_eight)

log = logging.getLogger(__name__)

MASKED_CONTENT = ("original", "fill", "latent-noise", "latent-nothing")
# A1111's UI labels and its API's `inpainting_fill` integers.
_MASKED_CONTENT_NAMES = {"original": "original", "1": "original", "fill": "fill", "0": "fill",
                         "latent noise": "latent-noise", "2": "latent-noise",
                         "latent nothing": "latent-nothing", "3": "latent-nothing"}
# A1111's masking.fill: blur radii and how often each layer is composited, coarse to fine.
_FILL_PASSES = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))


def load_mask(source: Any, size: tuple[int, int] | None = None, *, invert: bool = False) -> Any:
    """A path or PIL image -> L mask (255 = repaint), resized to `size` (w, h) with a warning if needed.

    `invert` is A1111's "Inpaint not masked". A mask with nothing to repaint is an InputError.
    """
    from PIL import Image, ImageOps

    name = str(source) if isinstance(source, (str, os.PathLike)) else "the mask image"
    image = source if isinstance(source, Image.Image) else open_image(source)
    mask = _mask_channel(ImageOps.exif_transpose(image))
    if invert:
        mask = ImageOps.invert(mask)
    if size is not None and mask.size != tuple(size):
        log.warning("mask %s is %dx%d but the image is %dx%d: resizing the mask (Lanczos) to match",
                    name, *mask.size, *size)
        mask = resize_image(mask, int(size[0]), int(size[1]), "stretch")
    if mask.getbbox() is None:
        raise InputError(f"{name} is all black: nothing to repaint. White (or, in a mask with "
                         f"transparency, opaque) marks the area to repaint; invert the mask if yours "
                         f"marks the area to keep")
    return mask


def _mask_channel(image: Any) -> Any:
    """A1111's create_binary_mask, extended to every mode with transparency."""
    if image.mode in SIXTEEN_BIT_MODES:
        return sixteen_to_eight(image)
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        alpha = rgba.getchannel("A")
        if alpha.getextrema() != (255, 255):
            return alpha.point(lambda a: 255 if a > 128 else 0)
        return rgba.convert("L")
    return image.convert("L")


def blur_mask(mask: Any, px: int, px_y: int | None = None) -> Any:
    """A1111's "Mask blur": cv2 Gaussian, sigma = px, kernel 2 * int(2.5 * px + 0.5) + 1, x then y."""
    from PIL import Image

    px_y = px if px_y is None else px_y
    for value in (px, px_y):
        if not isinstance(value, int) or value < 0:
            raise InputError(f"mask blur must be a whole number of pixels >= 0, got {value!r}")
    cv2 = opencv()
    x = np.asarray(mask.convert("L"))
    if px > 0:
        x = cv2.GaussianBlur(x, (2 * int(2.5 * px + 0.5) + 1, 1), px)
    if px_y > 0:
        x = cv2.GaussianBlur(x, (1, 2 * int(2.5 * px_y + 0.5) + 1), px_y)
    return Image.fromarray(np.ascontiguousarray(x), "L")


def mask_to_array(mask: Any, width: int | None = None, height: int | None = None,
                  resize_mode: str = "stretch") -> np.ndarray:
    """L mask -> float32 (1, 1, H, W) of 0/1, as diffusers' inpaint `mask_processor.preprocess`."""
    mask = mask.convert("L")
    if width is not None or height is not None:
        mask = resize_image(mask, width or mask.width, height or mask.height, resize_mode)
    x = np.asarray(mask).astype(np.float32) / 255.0
    return (x >= 0.5).astype(np.float32)[None, None]


def mask_to_latent(mask: Any, latent_hw: tuple[int, int]) -> np.ndarray:
    """Mask (L image or `mask_to_array` output) -> float32 (1, 1, h, w) on the latent grid.

    Nearest neighbour with torch's index rule (floor(i * in / out) in float32), as diffusers'
    `prepare_mask_latents` calls `torch.nn.functional.interpolate` with its default mode.
    """
    x = mask if isinstance(mask, np.ndarray) else mask_to_array(mask)
    if x.ndim != 4 or x.shape[:2] != (1, 1):
        raise InputError(f"expected a mask array of shape (1, 1, H, W), got {x.shape}")
    rows = _nearest_index(x.shape[2], int(latent_hw[0]))
    cols = _nearest_index(x.shape[3], int(latent_hw[1]))
    return np.ascontiguousarray(x[:, :, rows][:, :, :, cols], dtype=np.float32)


def _nearest_index(size_in: int, size_out: int) -> np.ndarray:
    if size_out == size_in:
        return np.arange(size_out)
    if size_out == 2 * size_in:  # torch special-cases exact 2x upsampling
        return np.arange(size_out) >> 1
    scale = np.float32(size_in) / np.float32(size_out)
    return np.minimum(np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int64), size_in - 1)


def masked_image(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The 9-channel UNet's image input: (1, 3, H, W) in [-1, 1] with masked pixels set to 0."""
    if image.shape[-2:] != mask.shape[-2:]:
        raise InputError(f"image {image.shape} and mask {mask.shape} differ in size")
    return (image * (mask < 0.5)).astype(np.float32)


def parse_masked_content(name: str | int) -> str:
    """'original' | 'fill' | 'latent-noise' | 'latent-nothing', from ours or A1111's names."""
    value = _MASKED_CONTENT_NAMES.get(name_key(name))
    if value is None:
        raise InputError(f"unknown masked content {name!r}; valid: {choices_text(MASKED_CONTENT)}")
    return value


def fill_masked(image: Any, mask: Any) -> Any:
    """A1111's "fill": the masked area painted with ever finer blurs of the colours around it."""
    from PIL import Image, ImageFilter, ImageOps

    keep = Image.new("RGBa", image.size)
    keep.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    out = Image.new("RGBA", image.size)
    for radius, times in _FILL_PASSES:
        layer = keep.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(times):
            out.alpha_composite(layer)
    return out.convert("RGB")


def latent_noise(latents: np.ndarray, latent_mask: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """A1111's "latent noise": the masked latents replaced by `noise` (the request's seed noise)."""
    return (latents * (1.0 - latent_mask) + noise * latent_mask).astype(np.float32)


def latent_nothing(latents: np.ndarray, latent_mask: np.ndarray) -> np.ndarray:
    """A1111's "latent nothing": the masked latents set to zero."""
    return (latents * (1.0 - latent_mask)).astype(np.float32)


def crop_region(mask: Any, padding: int, width: int, height: int) -> tuple[int, int, int, int]:
    """A1111's "Only masked" box (x1, y1, x2, y2): the mask's bounding box grown by `padding`,
    then widened to the aspect ratio of the generation size `width` x `height` (inside the image).

    Pass the blurred mask, as A1111 does, so the box holds every pixel the paste-back can touch.
    """
    if not isinstance(padding, int) or padding < 0:
        raise InputError(f"inpaint padding must be a whole number of pixels >= 0, got {padding!r}")
    box = mask.convert("L").getbbox()
    if box is None:
        raise InputError("the mask is all black: there is no region to crop for \"Only masked\"")
    x1, y1, x2, y2 = box
    x1, y1 = max(x1 - padding, 0), max(y1 - padding, 0)
    x2, y2 = min(x2 + padding, mask.width), min(y2 + padding, mask.height)
    if (x2 - x1) / (y2 - y1) > width / height:  # too wide for the target: grow the height
        y1, y2 = _grow(y1, y2, int((x2 - x1) / (width / height) - (y2 - y1)), mask.height)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * (width / height) - (x2 - x1)), mask.width)
    return x1, y1, x2, y2


def _grow(lo: int, hi: int, extra: int, limit: int) -> tuple[int, int]:
    """Widen [lo, hi) by `extra` split evenly, shifted back inside [0, limit) (A1111's arithmetic)."""
    lo, hi = lo - extra // 2, hi + extra - extra // 2
    if hi >= limit:
        lo, hi = lo - (hi - limit), limit
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, limit)


def crop_to_region(image: Any, box: tuple[int, int, int, int], width: int, height: int) -> Any:
    """The "Only masked" input: `box` cut from the image (or mask), resized to the generation size
    with "fill", as A1111 does for both."""
    return resize_image(image.crop(box), width, height, "fill")


def overlay_alpha(mask: Any, blurred: Any | None = None) -> Any:
    """The paste-back alpha (L): the mask itself without blur; with blur, the feather mirrored inward:
    min(mask, clip(2 * blurred - 255)), so it is 0 wherever the unblurred mask is 0."""
    from PIL import Image

    m = np.asarray(mask.convert("L"))
    if blurred is None:
        return Image.fromarray(m.copy(), "L")
    b = np.asarray(blurred.convert("L")).astype(np.int16)
    inward = np.clip(2 * b - 255, 0, 255).astype(np.uint8)
    return Image.fromarray(np.minimum(m, inward), "L")


def paste_back(original: Any, generated: Any, alpha: Any,
               box: tuple[int, int, int, int] | None = None) -> Any:
    """The final image: `generated` blended over `original` by `alpha` (L, original's size).

    With `box` ("Only masked"), `generated` is first resized into the box ("crop" mode, as A1111's
    uncrop). Where alpha is 0 the result is the original pixel exactly.
    """
    from PIL import Image

    original = original.convert("RGB")
    if alpha.size != original.size:
        raise InputError(f"paste-back alpha is {alpha.size}, the original image {original.size}")
    canvas = original.copy()
    if box is not None:
        x1, y1, x2, y2 = box
        canvas.paste(resize_image(generated.convert("RGB"), x2 - x1, y2 - y1, "crop"), (x1, y1))
    elif generated.size != original.size:
        raise InputError(f"generated image is {generated.size}, the original {original.size}")
    else:
        canvas = generated.convert("RGB")
    a = np.asarray(alpha, dtype=np.float32)[..., None] / 255.0
    o = np.asarray(original, dtype=np.float32)
    out = o * (1.0 - a) + np.asarray(canvas, dtype=np.float32) * a
    return Image.fromarray(np.round(out).astype(np.uint8), "RGB")
