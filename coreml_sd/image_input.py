"""Images people give us (init images, control maps): load any file as RGB, resize as AUTOMATIC1111.

Loading follows what AUTOMATIC1111 does to an init image: EXIF orientation applied
(`ImageOps.exif_transpose`), transparency composited onto white (its default "img2img background
colour"), everything else converted to RGB. It goes further where it would mangle a file: 16-bit
grayscale PNGs are scaled to 8 bits (Pillow's own conversion clips them at 255), and every mode with
transparency (LA, PA, P with a transparent index), not only RGBA, is composited.

The resize modes are AUTOMATIC1111's `images.resize_image` modes 0-2 (which diffusers'
`VaeImageProcessor.resize` reproduces as "default"/"crop"/"fill"): the same Pillow calls, so the
pixels are identical. Pillow is imported inside functions: importing this module costs nothing.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from coreml_sd.errors import CoreMLSDError, InputError, choices_text

log = logging.getLogger(__name__)

BACKGROUND = "#ffffff"  # AUTOMATIC1111's default opts.img2img_background_color

RESIZE_MODES = ("stretch", "crop", "fill")
# Every spelling an A1111 user may type (its UI labels, its API's integers), normalised by name_key().
_RESIZE_NAMES = {
    "stretch": "stretch", "just resize": "stretch", "0": "stretch",
    "crop": "crop", "crop and resize": "crop", "1": "crop",
    "fill": "fill", "resize and fill": "fill", "2": "fill",
}
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa")


def name_key(name: str | int) -> str:
    """A name as typed, lowercased, with runs of spaces, dashes and underscores made one space."""
    return re.sub(r"[\s_\-]+", " ", str(name).strip().lower())


def parse_resize_mode(name: str | int) -> str:
    """'stretch' | 'crop' | 'fill' from ours or A1111's names ("Just resize", "Crop and resize", ...)."""
    mode = _RESIZE_NAMES.get(name_key(name))
    if mode is None:
        raise InputError(
            f"unknown resize mode {name!r}; valid: {choices_text(RESIZE_MODES)} "
            f"(or AUTOMATIC1111's \"Just resize\", \"Crop and resize\", \"Resize and fill\")")
    return mode


def load_image(source: Any, *, background: str = BACKGROUND) -> Any:
    """A path or PIL image -> an RGB PIL image, oriented and flattened as described above."""
    from PIL import Image, ImageOps

    image = open_image(source) if not isinstance(source, Image.Image) else source
    image = ImageOps.exif_transpose(image)  # returns a copy; the caller's image is left alone
    return to_rgb(image, background=background)


def open_image(path: str | os.PathLike) -> Any:
    """Open and fully decode an image file; anything else is an InputError naming what was found."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise InputError(f"image file not found: {path}")
    if not path.is_file():
        raise InputError(f"expected an image file at {path}, found a directory or special file")
    try:
        with Image.open(path) as opened:
            opened.load()  # decode now: a truncated file fails here, not later inside the pipeline
            image = opened.copy()  # the first frame, with its info (EXIF), and the file closed
    except UnidentifiedImageError:
        raise InputError(f"{path} is not an image Pillow can read; found {describe_file(path)}. "
                         f"Expected PNG, JPEG, WebP, BMP, TIFF or GIF") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{path} is a damaged or truncated image ({exc}); "
                         f"found {describe_file(path)}") from None
    except Image.DecompressionBombError as exc:
        raise InputError(f"{path} is too large to open safely ({exc})") from None
    return image


def describe_file(path: Path) -> str:
    """A short description of what a file holds, for error messages."""
    with open(path, "rb") as fh:
        head = fh.read(16)
    size = path.stat().st_size
    kinds = {b"PK\x03\x04": "a zip archive (a .ckpt or .zip?)", b"\x89PNG": "a PNG header",
             b"\xff\xd8\xff": "a JPEG header", b"RIFF": "a RIFF (WebP?) header", b"%PDF": "a PDF document",
             b"GIF8": "a GIF header"}
    kind = next((k for magic, k in kinds.items() if head.startswith(magic)), None)
    if kind is None:
        try:
            head.decode("utf-8")
            kind = "text"
        except UnicodeDecodeError:
            kind = f"bytes starting {head[:8]!r}"
    return f"a {size}-byte file: {kind}" if size else "an empty file"


def to_rgb(image: Any, *, background: str = BACKGROUND) -> Any:
    """Any Pillow mode -> RGB: 16-bit scaled to 8, transparency flattened onto `background`."""
    from PIL import Image

    if image.mode in SIXTEEN_BIT_MODES:
        image = sixteen_to_eight(image)
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background)
        canvas.paste(rgba, mask=rgba)  # as A1111's images.flatten
        image = canvas
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise InputError(f"cannot convert an image of mode {image.mode} to RGB ({exc})") from None


def sixteen_to_eight(image: Any) -> Any:
    """16-bit grayscale -> L, full range scaled (65535 -> 255), not clipped as Pillow's convert does."""
    from PIL import Image

    values = np.asarray(image).astype(np.float64)
    if values.max(initial=0) > 65535 or values.min(initial=0) < 0:
        raise InputError(f"a {image.mode} image with values outside 0..65535 "
                         f"({values.min():g}..{values.max():g}); expected 8- or 16-bit pixels")
    return Image.fromarray(np.round(values / 257.0).astype(np.uint8), "L")


def resize_image(image: Any, width: int, height: int, mode: str = "stretch") -> Any:
    """A1111's resize_image: "stretch" (Just resize), "crop" (Crop and resize), "fill" (Resize and fill).

    Lanczos, as A1111 with no img2img upscaler set. "crop" scales to cover the box and cuts the
    overflow evenly; "fill" scales to fit and stretches the outermost rows/columns into the bars.
    The result has the input's mode for L and RGB images (A1111 always returns RGB; the values are
    the same, since an L image pasted on RGB is replicated to the three channels).
    """
    mode = parse_resize_mode(mode)
    _check_size(width, height)
    if mode == "stretch":
        return _lanczos(image, width, height)
    ratio, src_ratio = width / height, image.width / image.height
    if mode == "crop":
        src_w = width if ratio > src_ratio else image.width * height // image.height
        src_h = height if ratio <= src_ratio else image.height * width // image.width
    else:
        src_w = width if ratio < src_ratio else image.width * height // image.height
        src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = _lanczos(image, src_w, src_h)
    canvas = _canvas(image, width, height)
    canvas.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if mode == "fill":
        _fill_bars(canvas, resized, ratio, src_ratio)
    return canvas


def _fill_bars(canvas: Any, resized: Any, ratio: float, src_ratio: float) -> None:
    """Stretch the resized image's first/last row (or column) over the empty bars, as A1111."""
    width, height = canvas.size
    if ratio < src_ratio:
        bar = height // 2 - resized.height // 2
        if bar > 0:
            canvas.paste(resized.resize((width, bar), box=(0, 0, width, 0)), box=(0, 0))
            canvas.paste(resized.resize((width, bar), box=(0, resized.height, width, resized.height)),
                         box=(0, bar + resized.height))
    elif ratio > src_ratio:
        bar = width // 2 - resized.width // 2
        if bar > 0:
            canvas.paste(resized.resize((bar, height), box=(0, 0, 0, height)), box=(0, 0))
            canvas.paste(resized.resize((bar, height), box=(resized.width, 0, resized.width, height)),
                         box=(bar + resized.width, 0))


def _lanczos(image: Any, width: int, height: int) -> Any:
    from PIL import Image

    return image.resize((width, height), resample=Image.Resampling.LANCZOS)


def _canvas(image: Any, width: int, height: int) -> Any:
    from PIL import Image

    return Image.new(image.mode if image.mode in ("L", "RGB") else "RGB", (width, height))


def _check_size(width: int, height: int) -> None:
    if not (isinstance(width, int) and isinstance(height, int)) or width < 1 or height < 1:
        raise InputError(f"expected a positive integer width and height, got {width!r} x {height!r}")


def opencv() -> Any:
    """The cv2 module (mask blur and control preprocessors use OpenCV, as A1111 does)."""
    try:
        import cv2
    except ImportError:
        raise CoreMLSDError("OpenCV is not installed; it is needed for mask blur and ControlNet "
                            "preprocessors: pip install opencv-python-headless") from None
    return cv2


def image_to_array(image: Any) -> np.ndarray:
    """RGB PIL image -> float32 (1, 3, H, W) in [-1, 1], as diffusers' VaeImageProcessor.preprocess.

    The inverse is coreml_sd.pipeline.to_pil (which rounds as diffusers' postprocess).
    """
    if image.mode != "RGB":
        raise InputError(f"expected an RGB image (use load_image first), got mode {image.mode}")
    x = np.asarray(image).astype(np.float32) / 255.0
    return (2.0 * x - 1.0).transpose(2, 0, 1)[None].copy()
