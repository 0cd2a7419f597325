"""Images over the API: base64 in (size-checked before decoding), base64 PNG out with A1111's
`parameters` text, and PNG Info (the parameters read back from an uploaded image)."""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

from coreml_sd.images import GenerationParams, encode_image, read_parameters
from coreml_sd.serve.errors import field_error, too_large


def b64_bytes(data: str, field: str) -> bytes:
    """Raw base64 or a data URL (`data:image/png;base64,...`), as A1111 accepts."""
    text = data.strip()
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or ";base64" not in head:
            raise field_error(field, "expected a base64 data URL (data:image/...;base64,...)")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise field_error(field, "not valid base64") from None


def decode_image(data: str, field: str, max_pixels: int) -> Any:
    """A base64 image -> a decoded PIL image. Its size is read from the header first, so an
    image over `max_pixels` is refused (413) before any pixel is decompressed."""
    from PIL import Image, UnidentifiedImageError

    raw = b64_bytes(data, field)
    try:
        image = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError as exc:
        raise too_large(f"{field}: {exc}") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise field_error(field, "not an image Pillow can read (expected PNG, JPEG, WebP, ...)") from None
    width, height = image.size
    if width * height > max_pixels:
        raise too_large(f"{field}: {width}x{height} is {width * height} pixels; this server accepts at most "
                        f"{max_pixels} (--max-image-pixels)")
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as exc:
        raise field_error(field, f"a damaged or truncated image ({exc})") from None
    return image


def encode_png(image, params: GenerationParams) -> str:
    """A base64 PNG carrying `params` as A1111's `parameters` chunk (what its API returns)."""
    return base64.b64encode(encode_image(image, "png", params)).decode("ascii")


def png_info(data: str, max_pixels: int) -> tuple[str, dict[str, str]]:
    """(the `parameters` text or "", the image's other text items), as A1111's /png-info."""
    raw = b64_bytes(data, "image")
    decode_image(data, "image", max_pixels)  # refuse what is not an image, or too large, first
    text = read_parameters(io.BytesIO(raw)) or ""
    from PIL import Image

    with Image.open(io.BytesIO(raw)) as im:
        items = {k: v for k, v in im.info.items() if isinstance(k, str) and isinstance(v, str) and k != "parameters"}
    return text, items


def parameters_dict(text: str) -> dict:
    """The infotext as the dict A1111's /png-info returns (its `parse_generation_parameters` keys)."""
    if not text.strip():
        return {}
    p = GenerationParams.from_a1111(text)
    out = {"Prompt": p.prompt, "Negative prompt": p.negative_prompt, "Steps": p.steps, "Sampler": p.sampler,
           "CFG scale": p.guidance_scale, "Seed": p.seed, "Size-1": p.width, "Size-2": p.height}
    if p.schedule != "default":
        out["Schedule type"] = p.schedule.capitalize()
    if p.model_hash:
        out["Model hash"] = p.model_hash
    if p.model:
        out["Model"] = p.model
    return {**out, **p.extras}
