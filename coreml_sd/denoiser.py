"""The guided denoiser D(x, sigma): a UNet behind classifier-free guidance, as samplers see it.

The UNet was trained on model-scale ("VP") latents `(x0 + sigma * eps) / sqrt(sigma**2 + 1)` at
an integer-or-fractional timestep. This adapter asks the plan for the timestep, runs the
unconditional and conditional passes as one batch (a package of fixed batch splits it at its own
boundary), mixes them with the guidance scale and turns the model output (epsilon or v) into an
estimate of x0 (k-diffusion's `DiscreteEpsDDPMDenoiser` / `DiscreteVDDPMDenoiser`). It takes the
latent in sigma space (`D(x, sigma)`, Euler-style samplers) or in model scale
(`D.scaled(x, sigma)`, DDIM and DPM-Solver), each with the arithmetic of the diffusers scheduler
that keeps latents that way, so no conversion rounds the UNet's input.
"""

from __future__ import annotations

import math

from coreml_sd import arrays
from coreml_sd.conditioning import Conditioning
from coreml_sd.config import PREDICTION_TYPES
from coreml_sd.errors import InputError, choices_text


class Denoiser:
    """D(x, sigma) -> x0 estimate, with classifier-free guidance; epsilon or v-prediction models."""

    def __init__(self, unet, plan, *, prediction_type: str, cond: Conditioning, uncond: Conditioning | None = None,
                 guidance_scale: float = 7.5, control=None):
        if prediction_type not in PREDICTION_TYPES:
            raise InputError(
                f"prediction_type is {prediction_type!r}; supported: {choices_text(PREDICTION_TYPES)}"
            )
        self.unet = unet
        self.plan = plan
        self.prediction_type = prediction_type
        self.guidance_scale = float(guidance_scale)
        # As diffusers: guidance only when the scale exceeds 1; at 1 the unconditional pass
        # would not change the result, so it is not run.
        self.guided = self.guidance_scale > 1.0
        if self.guided and uncond is None:
            raise InputError(f"guidance scale {guidance_scale} needs the unconditional (negative prompt) embeddings")
        # A Conditioning, a schedule of them over the calls (prompt editing: `.at(calls_done)`), or
        # a bare array: the text context alone (the conditioning of SD 1.x/2.x models).
        self.cond = _as_conditioning(cond)
        self.uncond = None if uncond is None else _as_conditioning(uncond)
        self.calls = 0  # guided model evaluations so far: where prompt editing stands
        # Channels concatenated to the latents at every call (a 9-channel inpainting UNet's mask and
        # masked-image latents), one row per latent; set by the pipeline once it has drawn them.
        self.latent_extra = None
        # ControlNet (coreml_sd.control.ControlStage): adds the residuals to the conditioning of each UNet call.
        self.control = control

    def at_step(self, step: int) -> None:
        """The sampler is about to run step `step` (0-based); ControlNet's guidance start/end follow it."""
        if self.control is not None:
            self.control.at_step(step)

    def __call__(self, x, sigma: float):
        """x0 from a sigma-space latent x = x0 + sigma * eps."""
        out = self.model_output(x / math.sqrt(sigma**2 + 1.0), self.plan.timestep(sigma))
        if self.prediction_type == "epsilon":
            return x - out * sigma
        # v-prediction (Salimans & Ho 2022): x0 = c_skip * x + c_out * v in sigma space.
        return out * (-sigma / math.sqrt(sigma**2 + 1.0)) + x / (sigma**2 + 1.0)

    def scaled(self, x, sigma: float):
        """x0 from a model-scale latent x = alpha * x0 + s * eps (alpha = 1 / sqrt(sigma**2 + 1), s = sigma * alpha)."""
        out = self.model_output(x, self.plan.timestep(sigma))
        alpha = 1.0 / math.sqrt(sigma**2 + 1.0)
        if self.prediction_type == "epsilon":
            return (x - out * (sigma * alpha)) / alpha
        return x * alpha - out * (sigma * alpha)

    def model_output(self, model_input, t: float):
        """The guided model output (epsilon or v) at timestep t for VP latents `model_input`."""
        batch = model_input.shape[0]
        cond = self.cond(self.calls).repeat(batch)
        uncond = self.uncond(self.calls).repeat(batch) if self.guided else None
        if self.latent_extra is not None:
            cond = cond.with_(latent_extra=self.latent_extra)
            uncond = None if uncond is None else uncond.with_(latent_extra=self.latent_extra)
        self.calls += 1
        if not self.guided:
            return self._predict(model_input, t, cond)
        # Unconditional first: the order of Apple's Core ML UNet packages and of diffusers.
        both = self._predict(arrays.concat([model_input, model_input]), t, Conditioning.concat([uncond, cond]),
                             uncond_rows=batch)
        out_uncond, out_cond = arrays.split(both, 2)
        return out_uncond + (out_cond - out_uncond) * self.guidance_scale

    def _predict(self, sample, t: float, cond: Conditioning, uncond_rows: int = 0):
        timestep = arrays.full_like(sample, t, (sample.shape[0],))
        if self.control is not None:
            cond = self.control.apply(sample, timestep, cond, uncond_rows)
        return _float32(self.unet.predict(sample, timestep, cond))


def _as_conditioning(value):
    """A function of the calls done -> Conditioning."""
    if isinstance(value, Conditioning):
        return lambda calls: value
    if hasattr(value, "at"):  # text_conditioning.Scheduled
        return value.at
    return lambda calls, c=Conditioning(value): c


def _float32(out):
    """Model outputs are float32 by contract; a backend that returns half precision is upcast here."""
    if arrays.is_torch(out):
        import torch

        return out if out.dtype == torch.float32 else out.float()
    return out if out.dtype == "float32" else out.astype("float32")
