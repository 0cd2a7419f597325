"""How close two arrays are: PSNR, the one definition every gate, test and benchmark uses."""

from __future__ import annotations

import math

import numpy as np


def psnr(reference, test, *, peak: float | None = None, cap: float | None = None) -> float:
    """20 log10(peak / RMSE(reference - test)) in dB.

    `peak`: None for Apple's converter convention, max |reference| (for model outputs); 255 for
    8-bit images. Identical arrays give inf (or `cap`, where a finite number must be stored); a
    test with a non-finite value gives -inf.
    """
    from coreml_sd import arrays

    reference = np.asarray(arrays.to_numpy(reference), dtype=np.float64)
    test = np.asarray(arrays.to_numpy(test), dtype=np.float64)
    if reference.shape != test.shape:
        raise ValueError(f"psnr: shapes differ: reference {reference.shape}, test {test.shape}")
    if not np.all(np.isfinite(test)):
        return -math.inf
    rmse = math.sqrt(float(np.mean((reference - test) ** 2)))
    top = float(np.max(np.abs(reference))) if peak is None else float(peak)
    value = math.inf if rmse == 0.0 else 20.0 * math.log10(max(top, 1e-12) / rmse)
    return value if cap is None else min(cap, value)


def image_psnr(a, b) -> float:
    """PSNR of two 8-bit images (PIL images or arrays), peak 255."""
    return psnr(np.asarray(a), np.asarray(b), peak=255.0)
