"""A refiner model that takes over the last steps of sampling (AUTOMATIC1111's "Refiner", SDXL's refiner).

`--refiner MODEL --refiner-switch 0.8`: the base model samples until 80 % of the noise schedule is
done, then the refiner's UNet, with its own text encoders and conditioning, denoises the rest of
the same schedule from the same latents; the base model's VAE decodes them.

Where the switch falls is AUTOMATIC1111's rule and diffusers' `denoising_end`/`denoising_start`
alike: the base keeps the steps whose timestep is at least round(T * (1 - switch)) (T = 1000
training timesteps; A1111 switches once (999 - t) / 1000 >= switch, the same steps for integer
timesteps). The hand-off is diffusers': the refiner runs the sampler afresh on the rest of the
plan, so a multistep sampler (DPM++ 2M) starts its history again at the switch, as
StableDiffusionXLImg2ImgPipeline(denoising_start=...) does. Step noise continues: the images'
noise streams (ancestral samplers), one Brownian tree over the whole schedule, one ENSD stream.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

from coreml_sd.errors import InputError, ModelError

log = logging.getLogger("coreml_sd")

DEFAULT_SWITCH = 0.8  # A1111's and Apple's default "refiner switch at"


def check_switch(switch: float) -> float:
    if not isinstance(switch, (int, float)) or not 0.0 < float(switch) <= 1.0:
        raise InputError(f"refiner switch must be a fraction of the steps in (0, 1] (A1111's 'Refiner switch at', "
                         f"e.g. 0.8); got {switch!r}")
    return float(switch)


def switch_step(plan, switch: float) -> int:
    """How many of `plan`'s steps the base model runs before the refiner takes over."""
    n = plan.config.num_train_timesteps if plan.config is not None else 1000
    cutoff = int(round(n - check_switch(switch) * n))
    return sum(1 for t in plan.timesteps if t >= cutoff)


def split_plan(plan, k: int):
    """The plan's first k steps and the rest, as two plans over the same noise levels."""
    if not 0 <= k <= plan.steps:
        raise InputError(f"cannot split a plan of {plan.steps} steps after step {k}")
    targets = plan.targets
    first = replace(plan, sigmas=plan.sigmas[:k + 1], timesteps=plan.timesteps[:k],
                    targets=None if targets is None else targets[:k])
    rest = replace(plan, sigmas=plan.sigmas[k:], timesteps=plan.timesteps[k:],
                   targets=None if targets is None else targets[k:])
    return first, rest


@dataclass
class Refiner:
    """A loaded refiner: a Pipeline over its text encoders and UNet (no VAE), and the switch point."""

    pipeline: Any  # coreml_sd.pipeline.Pipeline
    switch: float = DEFAULT_SWITCH

    @property
    def name(self) -> str:
        return self.pipeline.info.name

    def metadata(self, switch: float) -> dict[str, str]:
        """AUTOMATIC1111's parameter strings: "Refiner: name [hash]", "Refiner switch at"."""
        info = self.pipeline.info
        title = f"{info.name} [{info.hash}]" if info.hash else info.name
        return {"Refiner": title, "Refiner switch at": f"{switch:g}"}


def check_compatible(base_info, refiner_info) -> None:
    """The refiner continues the base's latents, so both must share a latent space."""
    if (refiner_info.latent_channels, refiner_info.vae_scale_factor) != (base_info.latent_channels,
                                                                         base_info.vae_scale_factor):
        raise ModelError(f"refiner {refiner_info.name} has {refiner_info.latent_channels} latent channels at 1/"
                         f"{refiner_info.vae_scale_factor} scale; {base_info.name} has {base_info.latent_channels} at "
                         f"1/{base_info.vae_scale_factor}: its latents cannot continue the base's")
    if refiner_info.scaling_factor != base_info.scaling_factor:
        log.warning("refiner %s has VAE scaling factor %g, %s has %g: their latent spaces may differ",
                    refiner_info.name, refiner_info.scaling_factor, base_info.name, base_info.scaling_factor)
    if base_info.sizes and refiner_info.sizes and not set(base_info.sizes) & set(refiner_info.sizes):
        raise ModelError(f"refiner {refiner_info.name} was converted for {refiner_info.sizes}, {base_info.name} "
                         f"for {base_info.sizes}: convert both for the same size")


def load_refiner(pipeline_cls, base_source, refiner, request, options, *, reduce_memory: bool = False):
    """The Refiner of a request: `refiner` (a model path) opened and loaded on the same backends, or
    the one a converted folder carries (Apple's UnetRefiner beside the Unet); None without either."""
    from coreml_sd.backends.selection import load_components
    from coreml_sd.sources import open_model

    if refiner is not None:
        source = open_model(refiner)
    else:
        source = getattr(base_source, "refiner_source", lambda: None)()
        if source is None:
            return None
    check_compatible(base_source.info, source.info)
    names = tuple(t.component for t in source.info.spec.text_encoders) + ("unet",)
    components = load_components(source, request, options, names=names, reduce_memory=reduce_memory)
    return Refiner(pipeline_cls(source, components, reduce_memory=reduce_memory))


class _Across:
    """The refiner's UNet inside the base model's sampling loop: arrays converted to the refiner's
    engine on the way in and back on the way out (both kinds agree in the common case: no copy)."""

    def __init__(self, unet, inner, outer):
        self.unet, self.inner, self.outer = unet, inner, outer

    @property
    def batch_size(self):
        return getattr(self.unet, "batch_size", None)

    def predict(self, sample, timestep, cond):
        out = self.unet.predict(self.inner(sample), self.inner(timestep), cond.map(self.inner))
        return self.outer(out)

    def release(self) -> None:
        release = getattr(self.unet, "release", None)
        if callable(release):
            release()


@dataclass
class Handoff:
    """One request's refiner plan: where it switches, and its conditioning for every prompt."""

    refiner: Refiner | None
    plan: Any
    switch: float = DEFAULT_SWITCH
    base_steps: int = 0
    conds: dict | None = None
    outer: Any = None  # the base loop's asarray

    @classmethod
    def start(cls, pipe, switch, plan, prompts, negatives, size, calls: int, options) -> "Handoff":
        """Decide the switch step and encode the prompts with the refiner's text encoders."""
        refiner = pipe.refiner
        if refiner is None:
            if switch is not None:
                raise InputError("a refiner switch needs a refiner (--refiner MODEL)")
            return cls(None, plan, base_steps=plan.steps)
        switch = check_switch(refiner.switch if switch is None else switch)
        k = switch_step(plan, switch)
        conds = None
        if k < plan.steps:
            conds = refiner.pipeline.conditionings(prompts, negatives, size, steps=calls, options=options)
        return cls(refiner, plan, switch, k, conds, pipe.components.asarray)

    @property
    def active(self) -> bool:
        return self.refiner is not None and self.base_steps < self.plan.steps

    def segments(self, denoiser, batch: list[int], prompts: list[str], negatives: list[str],
                 guidance_scale: float) -> list[tuple[Any, Any]]:
        """(denoiser, plan part) in turn: the base's denoiser for its steps, a refiner's for the rest."""
        if not self.active:
            return [(denoiser, self.plan)]
        from coreml_sd.conditioning import Conditioning
        from coreml_sd.denoiser import Denoiser
        from coreml_sd.text_conditioning import Scheduled

        first, rest = split_plan(self.plan, self.base_steps)
        rp = self.refiner.pipeline
        refined = Denoiser(_Across(rp.components["unet"], rp.components.asarray, self.outer), self.plan,
                           prediction_type=rp.info.prediction_type, guidance_scale=guidance_scale,
                           cond=Scheduled.rows([self.conds[(prompts[i], False)] for i in batch], Conditioning.concat),
                           uncond=Scheduled.rows([self.conds[(negatives[i], True)] for i in batch],
                                                 Conditioning.concat))
        return ([(denoiser, first)] if self.base_steps else []) + [(refined, rest)]

    def metadata(self) -> dict[str, str]:
        return self.refiner.metadata(self.switch) if self.active else {}
