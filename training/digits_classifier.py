"""Judging images of the built-in digits model: which digit, what ink, what paper.

A support-vector classifier learns scikit-learn's own 8x8 digits (the model's training data, with
their true labels) and labels generated images after they are brought to the same form: the ink
(each pixel's colour distance from the paper, the paper being the median border colour) cut to
its bounding square and averaged down to 8x8, 0..16. The attribute checks are plain pixel statistics on the same ink map.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Prompts people type, one form per group of ten seeds (seed s draws digit s % 10).
USER_FORMS = ("a handwritten digit {w}", "the number {n}", "{n}", "{w}", "a handwritten digit {n}")


def user_prompt(seed: int) -> tuple[str, int]:
    digit = seed % 10
    form = USER_FORMS[(seed // 10) % len(USER_FORMS)]
    return form.format(w=WORDS[digit], n=digit), digit


@dataclass(frozen=True)
class Look:
    paper: np.ndarray  # (3,) RGB in [0, 1]: median of the border pixels
    ink: np.ndarray  # (3,) RGB in [0, 1]: mean colour of the strongest strokes
    ink_map: np.ndarray  # (H, W) in [0, 1]: distance from the paper colour, 1 = the strongest stroke

    @property
    def redness(self) -> float:
        """Red minus the larger of green and blue, of the ink: about 0.8 for red ink, 0 for grey."""
        return float(self.ink[0] - max(self.ink[1], self.ink[2]))

    @property
    def dark_paper(self) -> bool:
        return float(self.paper.mean()) < 0.35

    @property
    def light_paper(self) -> bool:
        return float(self.paper.mean()) > 0.65


def look(image) -> Look:
    """Paper colour, ink colour and ink map of an RGB image (PIL or (H, W, 3) uint8)."""
    rgb = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float32) / 255.0
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    paper = np.median(border, axis=0)
    dist = np.sqrt(((rgb - paper) ** 2).sum(axis=-1))
    ink_map = dist / max(float(dist.max()), 1e-6)
    strong = ink_map > 0.6
    ink = rgb[strong].mean(axis=0) if strong.any() else paper
    return Look(paper=paper, ink=ink, ink_map=ink_map)


def digit_features(image) -> np.ndarray:
    """(64,) in 0..16 like `load_digits().data`: the ink, size-normalised as the originals were.

    The UCI digits were scaled so the digit's bounding box fills the frame, then averaged over
    4x4 blocks; the same is done here: a square around the ink's bounding box (its longer side)
    averaged down to 8x8, brightest block 16.
    """
    from PIL import Image

    ink = look(image).ink_map
    rows, cols = np.nonzero(ink > 0.3)
    if rows.size == 0:
        return np.zeros(64)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    side = max(bottom - top, right - left)
    pad = side  # the square may reach past the image: pad with paper
    cy, cx = (top + bottom) / 2 + pad, (left + right) / 2 + pad
    box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    padded = np.pad(ink.astype(np.float32), pad)
    small = np.asarray(Image.fromarray(padded).resize((8, 8), Image.BOX, box=box))
    return (small / max(float(small.max()), 1e-6) * 16.0).reshape(-1)


@lru_cache(maxsize=1)
def digit_classifier():
    """SVC on all 1,797 scikit-learn digits, each scaled so its brightest block is 16 (as above)."""
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    digits = load_digits()
    x = digits.data / digits.data.max(axis=1, keepdims=True) * 16.0
    return SVC(gamma=0.001, C=10.0).fit(x, digits.target)


def classify(images) -> np.ndarray:
    return digit_classifier().predict(np.stack([digit_features(im) for im in images]))


def accuracy(images, digits) -> float:
    return float((classify(images) == np.asarray(digits)).mean())
