"""A live preview from latents without the VAE: AUTOMATIC1111's "Approx cheap".

Each RGB pixel is a fixed linear mix of the 4 latent channels at that position (the factors people
fitted for Stable Diffusion 1.x/2.x's VAE, used by A1111's `sd_vae_approx.cheap_approximation`),
then mapped from [-1, 1] to [0, 255]: one small matrix product per step instead of a VAE decode.
The image is 1/8 of the final size (one pixel per latent). Other latent layouts get no preview.
"""

from __future__ import annotations

import numpy as np

# rows: latent channels 0..3; columns: R, G, B (Stable Diffusion 1.x/2.x latents, after scaling).
SD_LATENT_RGB = np.array([
    [0.298, 0.207, 0.208],
    [0.187, 0.286, 0.173],
    [-0.158, 0.189, 0.264],
    [-0.184, -0.271, -0.473],
], dtype=np.float32)


def latents_to_rgb(latents, index: int = 0) -> np.ndarray | None:
    """(B, 4, h, w) latents -> (h, w, 3) uint8 for image `index`; None for other shapes."""
    from coreml_sd.arrays import to_numpy

    x = to_numpy(latents)
    if x.ndim != 4 or x.shape[1] != SD_LATENT_RGB.shape[0] or not 0 <= index < x.shape[0]:
        return None
    rgb = np.einsum("chw,cr->hwr", x[index].astype(np.float32), SD_LATENT_RGB)
    return (np.clip(rgb * 0.5 + 0.5, 0.0, 1.0) * 255).round().astype(np.uint8)


def preview_png(latents, index: int = 0) -> bytes | None:
    """The preview as PNG bytes, or None when the latents have no cheap approximation."""
    import io

    from PIL import Image

    rgb = latents_to_rgb(latents, index)
    if rgb is None:
        return None
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()
