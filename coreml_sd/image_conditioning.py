"""Starting from a picture: img2img, inpainting (4- and 9-channel UNets), outpainting, as diffusers does.

`ImageRequest` holds what a request starts from (init image, mask, strength and A1111's inpaint
options); `prepare` turns it into pixel inputs at the generation size (`coreml_sd.inpaint_inputs`).
Per batch, `ImageStart` then does what diffusers' `StableDiffusionImg2ImgPipeline` and
`StableDiffusionInpaintPipeline` do, draw for draw from each image's own seed stream:

1. the init image is encoded and a latent *sampled* from the VAE's distribution (one draw);
2. the starting noise is drawn, and the latents noised to the first level of the plan truncated by
   the strength (`truncate`: diffusers' `get_timesteps`);
3. inpainting also encodes the masked image (one more draw, also for 4-channel UNets, as diffusers);
   a 9-channel UNet takes mask and masked-image latents as extra channels every step
   (`Conditioning.latent_extra`), a 4-channel one gets its latents outside the mask replaced by the
   re-noised original after every step (`blend`: the sampler continues from what it is sent).

The latents are in the plan's form: sigma space (x0 + sigma * eps) or model scale (that over
sqrt(sigma**2 + 1)), so "noised to sigma" is diffusers' `scheduler.add_noise` in either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from coreml_sd import arrays
from coreml_sd.errors import InputError
from coreml_sd.inpaint_inputs import InpaintInputs, InpaintSettings, img2img_input, prepare_inpaint


@dataclass(frozen=True)
class ImageRequest:
    """What a request starts from. `strength`: A1111's "Denoising strength", 0 < S <= 1."""

    init_image: Any = None  # path or PIL
    strength: float = 0.75
    resize_mode: str = "stretch"
    mask: Any = None  # path or PIL (white = repaint); None: img2img
    inpaint: InpaintSettings = InpaintSettings()
    outpaint: str | None = None  # the sides grown ("left=128,..."), for the metadata

    def __post_init__(self):
        s = self.strength
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or not 0 < s <= 1:
            raise InputError(f"strength (denoising strength) must be a number in (0, 1]; got {s!r}")
        if self.mask is not None and self.init_image is None:
            raise InputError("a mask needs an init image (--init-image) to repaint")

    @property
    def inpainting(self) -> bool:
        return self.mask is not None

    def a1111_params(self) -> dict[str, str]:
        params = {"Denoising strength": f"{self.strength:g}"}
        if self.outpaint:
            params["Outpaint"] = self.outpaint
        if self.inpainting:
            params.update(self.inpaint.a1111_params())
        elif self.resize_mode != "stretch":
            params["Resize mode"] = {"crop": "Crop and resize", "fill": "Resize and fill"}[self.resize_mode]
        return params


@dataclass(frozen=True)
class Prepared:
    """One request's inputs at the generation size: pixels for the VAE encoder, or latents already
    (hires fix's latent upscaler: one row per image, scaled as the UNet's)."""

    request: ImageRequest
    pixels: np.ndarray | None  # (1, 3, H, W) in [-1, 1]: the VAE encoder's input
    inpaint: InpaintInputs | None = None
    latents: Any = None  # (B, C, h, w) init latents, instead of encoding pixels


def prepare(request: ImageRequest, width: int, height: int, vae_factor: int = 8) -> Prepared:
    if request.inpainting:
        inputs = prepare_inpaint(request.init_image, request.mask, width, height,
                                 replace(request.inpaint, resize_mode=request.resize_mode), latent_factor=vae_factor)
        return Prepared(request, inputs.image, inputs)
    return Prepared(request, img2img_input(request.init_image, width, height, request.resize_mode))


UPSCALERS = ("latent", "lanczos")


@dataclass(frozen=True)
class HiresFix:
    """A1111's "Hires. fix": target size, second-pass steps and denoising, and the upscaler."""

    scale: float
    steps: int
    denoise: float
    upscaler: str
    width: int
    height: int

    @classmethod
    def checked(cls, scale, steps, denoise, upscaler, width: int, height: int, sizes=None) -> "HiresFix":
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 1:
            raise InputError(f"hires scale must be a number above 1; got {scale!r}")
        if not isinstance(steps, int) or steps < 1:
            raise InputError(f"hires steps must be an integer >= 1; got {steps!r}")
        ImageRequest(init_image=True, strength=denoise)  # the same (0, 1] rule as img2img's strength
        key = str(upscaler).lower().replace(" ", "-")
        key = {"latent": "latent", "lanczos": "lanczos", "latent-(bilinear)": "latent"}.get(key)
        if key is None:
            raise InputError(f"unknown hires upscaler {upscaler!r}; valid: {', '.join(UPSCALERS)}")
        w, h = int(width * scale) // 8 * 8, int(height * scale) // 8 * 8  # A1111's size, on the latent grid
        if sizes and (w, h) not in sizes:
            listed = ", ".join(f"{a}x{b}" for a, b in sizes)
            raise InputError(f"hires fix to {w}x{h} needs the UNet at that size; this converted model takes {listed} "
                             f"(convert it with both sizes, or use the torch backend)")
        return cls(float(scale), steps, float(denoise), key, w, h)

    def upscale_latents(self, x, factor: int):
        """A1111's "Latent" upscaler: bilinear, no antialiasing, to the target's latent size."""
        return arrays.resize_bilinear(x, (self.height // factor, self.width // factor))

    def a1111_params(self) -> dict[str, str]:
        return {"Hires upscale": f"{self.scale:g}", "Hires steps": str(self.steps),
                "Hires upscaler": {"latent": "Latent", "lanczos": "Lanczos"}[self.upscaler],
                "Denoising strength": f"{self.denoise:g}"}


def truncate(plan, strength: float):
    """The plan's last int(steps * strength) steps (diffusers' `get_timesteps`)."""
    steps = plan.steps
    run = min(int(steps * strength), steps)
    if run < 1:
        raise InputError(f"strength {strength:g} of {steps} steps leaves no step to run (strength x steps must "
                         f"reach 1); raise --strength or --steps")
    start = steps - run
    targets = None if plan.targets is None else plan.targets[start:]
    return replace(plan, sigmas=plan.sigmas[start:], timesteps=plan.timesteps[start:], targets=targets)


def noised(latents, noise, sigma: float, model_scale: bool):
    """`latents` noised to `sigma` in the plan's form (diffusers' scheduler.add_noise)."""
    x = latents + noise * sigma
    return x / math.sqrt(sigma * sigma + 1.0) if model_scale else x


def sample_latents(moments, noise, scaling_factor: float):
    """A latent drawn from the VAE's diagonal Gaussian (mean, log-variance clamped as diffusers), scaled."""
    mean, logvar = arrays.split(moments, 2, axis=1)
    logvar = logvar.clip(-30.0, 20.0) if not arrays.is_torch(logvar) else logvar.clamp(-30.0, 20.0)
    std = (logvar * 0.5).exp() if arrays.is_torch(logvar) else np.exp(logvar * 0.5)
    return (mean + std * noise) * scaling_factor


class ImageStart:
    """One batch's start from a picture (see the module docstring): the initial latents, the
    9-channel UNet's extra channels and the 4-channel blend, all from the batch's noise streams."""

    def __init__(self, prepared: Prepared, *, encode, noise, plan, model_scale: bool, unet_channels: int,
                 latent_channels: int, scaling_factor: float, vae_factor: int, batch: int):
        self.prepared, self.plan, self.model_scale = prepared, plan, model_scale
        asarray = noise.asarray
        inpaint = prepared.inpaint
        nine = unet_channels == latent_channels + 1 + latent_channels
        strength_max = prepared.request.strength >= 1.0
        self.image_latents = None
        if prepared.latents is not None:
            self.image_latents = asarray(prepared.latents)
            shape = tuple(self.image_latents.shape)
        else:
            pixels = asarray(np.repeat(prepared.pixels, batch, axis=0))
            shape = _latent_shape(pixels, latent_channels, vae_factor)
            if not (inpaint is not None and nine and strength_max):  # diffusers skips the encode only then
                self.image_latents = sample_latents(encode(pixels), noise(shape), scaling_factor)
        self.noise = noise(shape)
        self.mask = None if inpaint is None else asarray(np.repeat(inpaint.latent_mask, batch, axis=0))
        self.latent_extra = None
        if inpaint is not None:
            masked = asarray(np.repeat(inpaint.masked_image, batch, axis=0))
            masked_latents = sample_latents(encode(masked), noise(shape), scaling_factor)
            if nine:
                self.latent_extra = arrays.concat([self.mask, masked_latents], axis=1)
            elif unet_channels != latent_channels:
                raise InputError(f"the UNet takes {unet_channels} input channels: neither an inpainting "
                                 f"({2 * latent_channels + 1}) nor a plain ({latent_channels}) one")
            self._masked_content(inpaint.masked_content)
        if inpaint is not None and strength_max:
            self.start = self.noise * plan.init_noise_sigma  # diffusers' inpaint: pure noise at strength 1
        else:
            self.start = noised(self.image_latents, self.noise, plan.sigmas[0], model_scale)
        self.blends = inpaint is not None and not nine

    def _masked_content(self, content: str) -> None:
        """A1111's "latent noise" / "latent nothing": the masked area of the init latents replaced."""
        if self.image_latents is None:  # a 9-channel UNet at strength 1 starts from noise anyway
            return
        if content == "latent-noise":
            self.image_latents = self.image_latents * (1.0 - self.mask) + self.noise * self.mask
        elif content == "latent-nothing":
            self.image_latents = self.image_latents * (1.0 - self.mask)

    def blend(self, step: int, x):
        """After step `step` (0-based) of a 4-channel inpaint: outside the mask, the original re-noised
        to the next level (the clean original after the last step), as diffusers' inpaint loop."""
        if not self.blends:
            return None
        last = step == self.plan.steps - 1
        proper = self.image_latents if last else noised(self.image_latents, self.noise, self.plan.sigmas[step + 1],
                                                        self.model_scale)
        return proper * (1.0 - self.mask) + x * self.mask


def _latent_shape(pixels, latent_channels: int, factor: int) -> tuple[int, ...]:
    return (pixels.shape[0], latent_channels, pixels.shape[2] // factor, pixels.shape[3] // factor)
