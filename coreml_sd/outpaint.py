"""Outpainting: grow the canvas and mark the new area as the mask, then inpaint it.

`--outpaint left=128,right=128,up=0,down=64` uses the direction names of A1111's outpainting
scripts. The new area is pre-filled (edge pixels stretched outward, or noise in the image's own
colours) so that even "original" masked content starts from something plausible.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from coreml_sd.errors import InputError, choices_text

SIDES = ("left", "right", "up", "down")
_ALIASES = {"top": "up", "bottom": "down"}
FILLS = ("edge", "noise")


@dataclass(frozen=True)
class Outpaint:
    """Pixels added on each side."""

    left: int = 0
    right: int = 0
    up: int = 0
    down: int = 0


def parse_outpaint(text: str) -> Outpaint:
    """"left=128,right=128,up=0,down=64" -> Outpaint; sides left out are 0."""
    amounts: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in str(text).split(","))):
        match = re.fullmatch(r"([A-Za-z]+)\s*[=:]\s*(\d+)", item)
        if match is None:
            raise InputError(f"bad outpaint item {item!r} in {text!r}; expected SIDE=PIXELS, "
                             f"e.g. left=128,right=128,up=0,down=64")
        side = _ALIASES.get(match.group(1).lower(), match.group(1).lower())
        if side not in SIDES:
            raise InputError(f"unknown outpaint side {match.group(1)!r}; valid: {choices_text(SIDES)}")
        if side in amounts:
            raise InputError(f"outpaint side {side!r} given twice in {text!r}")
        amounts[side] = int(match.group(2))
    if not any(amounts.values()):
        raise InputError(f"outpaint {text!r} adds no pixels; give at least one side > 0, "
                         f"e.g. left=128,right=128")
    return Outpaint(**amounts)


def outpaint_canvas(image: Any, left: int = 0, right: int = 0, up: int = 0, down: int = 0, *,
                    fill: str = "edge", seed: int = 0, overlap: int = 0) -> tuple[Any, Any]:
    """(canvas RGB, mask L): the image grown by the given pixels, the new area white in the mask.

    `overlap` extends the mask that many pixels into the original along each grown side, so the
    seam itself is repainted. The canvas sides must be multiples of 8 (the latent grid).
    """
    from PIL import Image

    sides = Outpaint(left, right, up, down)
    if min(left, right, up, down) < 0 or overlap < 0:
        raise InputError(f"outpaint amounts and overlap must be >= 0, got {sides} overlap={overlap}")
    if fill not in FILLS:
        raise InputError(f"unknown outpaint fill {fill!r}; valid: {choices_text(FILLS)}")
    w, h = image.width + left + right, image.height + up + down
    for name, size, grow in (("width", w, "left/right"), ("height", h, "up/down")):
        if size % 8:
            raise InputError(f"outpainted {name} {size} is not a multiple of 8: add {8 - size % 8} px "
                             f"to {grow} (or {size % 8} px less)")
    pixels = np.asarray(image.convert("RGB"))
    pad = ((up, down), (left, right), (0, 0))
    canvas = np.pad(pixels, pad, mode="edge")
    if fill == "noise":
        canvas = _noise_fill(canvas, pixels, (up, left), seed)
    mask = np.full((h, w), 255, np.uint8)
    keep_x = (left + (overlap if left else 0), left + image.width - (overlap if right else 0))
    keep_y = (up + (overlap if up else 0), up + image.height - (overlap if down else 0))
    mask[keep_y[0]:max(keep_y), keep_x[0]:max(keep_x)] = 0
    return Image.fromarray(canvas, "RGB"), Image.fromarray(mask, "L")


def _noise_fill(canvas: np.ndarray, pixels: np.ndarray, at: tuple[int, int], seed: int) -> np.ndarray:
    """Gaussian noise with the image's per-channel mean and spread, the image pasted back on top."""
    rng = np.random.default_rng(seed)
    mean, std = pixels.reshape(-1, 3).mean(0), pixels.reshape(-1, 3).std(0)
    noise = np.clip(np.round(rng.normal(mean, std, canvas.shape)), 0, 255).astype(np.uint8)
    y, x = at
    noise[y:y + pixels.shape[0], x:x + pixels.shape[1]] = pixels
    return noise
