"""ControlNet preprocessors that need no downloaded weights, and the control image the model sees.

Names, defaults and steps are those of the A1111 ControlNet extension (sd-webui-controlnet):
the image is scaled so its short side is the "Preprocessor resolution" (512; cubic up, area down,
edge-padded to a multiple of 64 while the detector runs), then
  canny      cv2.Canny, thresholds low 100 / high 200
  scribble   ("scribble_thr") white where the darkest channel is below 127: black lines -> white
  threshold  white where the darkest channel is above the threshold (127)
  invert     ("invert (from white bg & black line)") 255 - pixel, at the image's own size
  none       the image unchanged: for maps made elsewhere (depth, pose, normal, lineart, ...)
Maps come back as RGB images; `prepare_control_image` turns one into the ControlNet input exactly as
diffusers' `StableDiffusionControlNetPipeline.prepare_image` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from coreml_sd.errors import InputError, choices_text
from coreml_sd.image_input import name_key, opencv, resize_image, to_rgb

DEFAULT_RESOLUTION = 512


@dataclass(frozen=True)
class Preprocessor:
    name: str
    run: Callable[..., np.ndarray]  # (RGB uint8 HxWx3, **options) -> uint8 HxW or HxWx3
    options: tuple[str, ...]        # keyword options it takes besides `resolution`
    resizes: bool                   # whether it works at the preprocessor resolution
    summary: str


def _canny(x: np.ndarray, low: int = 100, high: int = 200) -> np.ndarray:
    if not 0 <= low <= high:
        raise InputError(f"canny thresholds must satisfy 0 <= low <= high, got low={low} high={high}")
    return opencv().Canny(x, low, high)


def _scribble(x: np.ndarray) -> np.ndarray:
    return np.where(x.min(axis=2) < 127, 255, 0).astype(np.uint8)


def _threshold(x: np.ndarray, threshold: int = 127) -> np.ndarray:
    if not 0 <= threshold <= 255:
        raise InputError(f"threshold must be within 0..255, got {threshold}")
    return np.where(x.min(axis=2) > threshold, 255, 0).astype(np.uint8)


def _invert(x: np.ndarray) -> np.ndarray:
    return 255 - x


def _none(x: np.ndarray) -> np.ndarray:
    return x


PREPROCESSORS = {p.name: p for p in (
    Preprocessor("canny", _canny, ("low", "high"), True, "edges (Canny), low 100 / high 200"),
    Preprocessor("scribble", _scribble, (), True, "black lines on white -> white lines on black"),
    Preprocessor("threshold", _threshold, ("threshold",), True, "white where brighter than 127"),
    Preprocessor("invert", _invert, (), False, "255 - pixel (white background, black lines)"),
    Preprocessor("none", _none, (), False, "a ready-made map: depth, pose, normal, lineart, ..."),
)}
_ALIASES = {"scribble thr": "scribble", "invert (from white bg & black line)": "invert",
            "passthrough": "none", "identity": "none"}
# A1111 preprocessors that run a downloaded network; we name them to explain what to do instead.
_NEEDS_WEIGHTS = ("depth", "midas", "zoe", "leres", "openpose", "dw openpose", "lineart", "normal",
                  "hed", "softedge", "pidinet", "mlsd", "seg", "oneformer", "uniformer", "mediapipe", "tile",
                  "shuffle", "reference", "ip adapter", "clip", "inpaint")


def get_preprocessor(name: str) -> Preprocessor:
    """Look a preprocessor up by our name or A1111's; an unknown or model-based one is an InputError."""
    key = name_key(name)
    key = _ALIASES.get(key, key)
    if key in PREPROCESSORS:
        return PREPROCESSORS[key]
    valid = choices_text(PREPROCESSORS)
    if any(key.startswith(prefix) for prefix in _NEEDS_WEIGHTS):
        raise InputError(f"preprocessor {name!r} runs a downloaded model, which coreml-sd does not ship; "
                         f"make the map with another tool and pass it with 'none'. Valid: {valid}")
    raise InputError(f"unknown preprocessor {name!r}; valid: {valid}")


def preprocess(name: str, image: Any, *, resolution: int | None = DEFAULT_RESOLUTION, **options) -> Any:
    """Run preprocessor `name` on an image (PIL, any mode); returns the RGB map (PIL).

    `resolution` is A1111's "Preprocessor resolution" (short side; None = the image's own size).
    """
    from PIL import Image

    proc = get_preprocessor(name)
    unknown = sorted(set(options) - set(proc.options))
    if unknown:
        takes = choices_text(proc.options) if proc.options else "no options"
        raise InputError(f"preprocessor {proc.name!r} takes {takes}; got {', '.join(unknown)}")
    if resolution is not None and resolution < 1:
        raise InputError(f"preprocessor resolution must be >= 1 (or None for the image's size), got {resolution}")
    x = np.asarray(to_rgb(image))
    if proc.resizes and resolution is not None:
        padded, (h, w) = _resize_with_pad(x, resolution)
        out = proc.run(padded, **options)[:h, :w]
    else:
        out = proc.run(x, **options)
    if out.ndim == 2:
        out = np.repeat(out[:, :, None], 3, axis=2)
    return Image.fromarray(np.ascontiguousarray(out, dtype=np.uint8), "RGB")


def _resize_with_pad(x: np.ndarray, resolution: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Short side -> `resolution` (cubic up, area down), edge-padded to multiples of 64, as the extension."""
    cv2 = opencv()
    k = resolution / min(x.shape[:2])
    h, w = int(np.round(x.shape[0] * k)), int(np.round(x.shape[1] * k))
    x = cv2.resize(x, (w, h), interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
    pad_h, pad_w = -h % 64, -w % 64
    return np.pad(x, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge"), (h, w)


def prepare_control_image(image: Any, width: int, height: int, resize_mode: str = "stretch") -> np.ndarray:
    """A control map -> float32 (1, 3, H, W) in [0, 1], as diffusers' ControlNet `prepare_image`
    (Lanczos resize to the generation size, RGB, /255; no [-1, 1] normalisation). Transparency is
    flattened onto white first, as the A1111 extension does."""
    if width % 8 or height % 8:
        raise InputError(f"control image size must be multiples of 8, got {width}x{height}")
    image = resize_image(to_rgb(image), width, height, resize_mode)
    x = np.asarray(image).astype(np.float32) / 255.0
    return x.transpose(2, 0, 1)[None].copy()
