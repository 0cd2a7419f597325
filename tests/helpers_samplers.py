"""Run the same generation through diffusers' StableDiffusionPipeline and through our samplers.

Both sides share the tiny model's modules and the same text embeddings; diffusers draws its noise
from `torch.Generator("cpu").manual_seed(seed + i)` per image, we from `NoiseSource(seed + i)`.
Our side talks to the UNet only through the backend contract (`predict(sample, timestep,
encoder_hidden_states)`), via the small adapters here, so the torch backend is not needed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coreml_sd.config import SchedulerConfig
from coreml_sd.denoiser import Denoiser
from coreml_sd.rng import NoiseSource
from coreml_sd.samplers import noise_from_sources, sample
from coreml_sd.schedules import make_plan

PROMPT, NEGATIVE = "a photo of an astronaut riding a horse", "blurry, low quality"


class TorchUNet:
    """The UNet contract over a diffusers UNet2DConditionModel; records the batch of every call."""

    def __init__(self, unet, batch_size: int | None = None):
        self.unet = unet
        self.batch_size = batch_size
        self.batches: list[int] = []

    def predict(self, sample, timestep, cond):
        import torch

        if self.batch_size is not None and sample.shape[0] != self.batch_size:
            raise AssertionError(f"UNet of batch {self.batch_size} called with {sample.shape[0]} rows")
        self.batches.append(int(sample.shape[0]))
        with torch.no_grad():
            return self.unet(sample, timestep, encoder_hidden_states=cond.context).sample


class NumpyUNet(TorchUNet):
    """The same UNet taking and returning numpy arrays, as the Core ML backend does."""

    def predict(self, sample, timestep, cond):
        import torch

        assert all(isinstance(a, np.ndarray) for a in (sample, timestep, cond.context))
        out = super().predict(*(torch.from_numpy(np.ascontiguousarray(a)) for a in (sample, timestep)),
                              cond.map(lambda a: torch.from_numpy(np.ascontiguousarray(a))))
        return out.numpy()


class FixedBatchRunner:
    """A package runner (coreml_sd.backends.packages) of fixed batch over a diffusers UNet, in the
    plain (B, 77, C) text layout: what a Core ML UNet package of that batch is to the adapters."""

    def __init__(self, unet, batch: int, latent_shape: tuple, context_shape: tuple):
        from coreml_sd.components import TensorSpec

        self.unet, self.name = unet, f"Unet-batch{batch}"
        self.inputs = (TensorSpec("sample", (batch, *latent_shape), "fp32"), TensorSpec("timestep", (batch,), "fp32"),
                       TensorSpec("encoder_hidden_states", (batch, *context_shape), "fp32"))
        self.outputs = (TensorSpec("noise_pred", (batch, *latent_shape), "fp32"),)
        self.batch_size = batch
        self.batches: list[int] = []

    def native(self, value, dtype: str):
        import torch

        return value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))

    def run(self, feeds):
        import torch

        self.batches.append(int(feeds["sample"].shape[0]))
        with torch.no_grad():
            return {"noise_pred": self.unet(feeds["sample"], feeds["timestep"],
                                            encoder_hidden_states=feeds["encoder_hidden_states"]).sample}

    def describe(self) -> str:
        return "test runner"


@dataclass
class TinySD:
    """A loaded tiny pipeline, its scheduler config (dict and ours) and one prompt's embeddings."""

    pipe: object
    config_dict: dict
    cond: object  # (1, 77, C) torch
    uncond: object

    def config(self, **changes) -> SchedulerConfig:
        return SchedulerConfig.from_dict(dict(self.config_dict, **changes))

    @property
    def latent_shape(self) -> tuple[int, ...]:
        size = self.pipe.unet.config.sample_size
        return (1, self.pipe.unet.config.in_channels, size, size)


def load_tiny_sd(model_dir: Path) -> TinySD:
    import torch
    from diffusers import StableDiffusionPipeline

    from coreml_sd.tokenizer import CLIPTokenizer

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    config_dict = json.loads((Path(model_dir) / "scheduler" / "scheduler_config.json").read_text())
    tokenizer = CLIPTokenizer()
    with torch.no_grad():
        cond, uncond = (pipe.text_encoder(torch.tensor([tokenizer(p)]))[0] for p in (PROMPT, NEGATIVE))
    return TinySD(pipe, config_dict, cond, uncond)


def diffusers_scheduler(sampler: str, schedule: str, config: dict):
    """The diffusers scheduler our sampler reproduces, built from the model's scheduler config."""
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                           EulerDiscreteScheduler, HeunDiscreteScheduler, LMSDiscreteScheduler)

    karras = schedule == "karras"
    if sampler == "heun":
        return HeunDiscreteScheduler.from_config(config, use_karras_sigmas=karras)
    if sampler == "lms":
        return LMSDiscreteScheduler.from_config(config, use_karras_sigmas=karras)
    if sampler == "dpmpp_2m_sde":
        return DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="sde-dpmsolver++", solver_order=2, use_karras_sigmas=karras)
    if sampler == "euler":
        return EulerDiscreteScheduler.from_config(config, use_karras_sigmas=karras)
    if sampler == "euler_a":
        if karras:
            return _euler_ancestral_karras_class().from_config(config)
        return EulerAncestralDiscreteScheduler.from_config(config)
    if sampler == "dpmpp_2m":
        return DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=karras)
    if sampler == "ddim" and not karras:
        return DDIMScheduler.from_config(config)
    raise ValueError(f"diffusers has no scheduler for {sampler} with {schedule} sigmas")


def _euler_ancestral_karras_class():
    """EulerAncestralDiscreteScheduler has no Karras option (diffusers 0.42): its own step over the
    sigmas and timesteps EulerDiscreteScheduler(use_karras_sigmas=True) chooses."""
    from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

    class EulerAncestralKarras(EulerAncestralDiscreteScheduler):
        def set_timesteps(self, num_inference_steps, device=None):
            super().set_timesteps(num_inference_steps, device)
            karras = EulerDiscreteScheduler.from_config(self.config, use_karras_sigmas=True)
            karras.set_timesteps(num_inference_steps, device)
            self.sigmas, self.timesteps = karras.sigmas, karras.timesteps

    return EulerAncestralKarras


def run_diffusers(sd: TinySD, scheduler, steps: int, *, seed: int = 42, num_images: int = 1,
                  guidance_scale: float = 7.5) -> np.ndarray:
    import torch

    sd.pipe.scheduler = scheduler
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(num_images)]
    out = sd.pipe(prompt_embeds=sd.cond, negative_prompt_embeds=sd.uncond, num_images_per_prompt=num_images,
                  num_inference_steps=steps, guidance_scale=guidance_scale, generator=generators,
                  output_type="latent")
    return out.images.numpy()


def run_ours(sd: TinySD, sampler: str, steps: int, schedule: str = "default", *, seed: int = 42,
             num_images: int = 1, guidance_scale: float = 7.5, config: SchedulerConfig | None = None,
             unet=None, kind: str = "torch", noise_fn=None) -> np.ndarray:
    """Our sampler over the same modules; `kind` picks torch tensors or numpy arrays throughout."""
    import torch

    config = config or sd.config()
    plan = make_plan(config, sampler, steps, schedule)
    to_kind = torch.from_numpy if kind == "torch" else np.asarray
    unet = unet or (TorchUNet if kind == "torch" else NumpyUNet)(sd.pipe.unet)
    cond, uncond = (to_kind(e.numpy()) for e in (sd.cond, sd.uncond))
    denoiser = Denoiser(unet, plan, prediction_type=config.prediction_type, cond=cond,
                        uncond=uncond if guidance_scale > 1 else None, guidance_scale=guidance_scale)
    noise = noise_fn or noise_from_sources([NoiseSource(seed + i) for i in range(num_images)], to_kind)
    x = noise((num_images,) + sd.latent_shape[1:]) * plan.init_noise_sigma
    latents = list(sample(sampler, denoiser, x, plan, noise))
    assert len(latents) == steps
    final = latents[-1]
    return final.numpy() if kind == "torch" else final
