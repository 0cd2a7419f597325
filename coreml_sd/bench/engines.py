"""How each engine is loaded, exercised and described for a benchmark.

`ours` covers coreml_sd's pipelines (torch, mil and coreml components); `diffusers` is the
baseline: diffusers' own StableDiffusionPipeline (StableDiffusionXLPipeline for a model with two
text encoders), eager, at its default precision for the device
(fp32 on a CPU, fp16 on CUDA/MPS) unless a precision is named. Each engine gives a loader, a
workload (the calls measure.py times) and a description (where and how it ran: precision,
attention implementation, weight compression), so every number says what produced it.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from coreml_sd.errors import BackendUnavailable

if TYPE_CHECKING:
    from coreml_sd.bench.measure import Settings

def load_ours(task):
    """A coreml_sd Pipeline for the task's backend, through the same route as `generate`; never a
    silent fallback to another engine (the backend is a demand, and the load says where each ran)."""
    from coreml_sd.pipeline import Pipeline

    spec, path = task.run.spec, task.model_path
    pipe = Pipeline.load(path, backend=spec.engine, device=spec.device if spec.engine != "coreml" else "auto",
                         precision=task.run.precision if spec.engine != "coreml" else "auto",
                         compute_units=spec.compute_units if spec.engine == "coreml" else "all",
                         compile=task.settings.torch_compile if spec.engine == "torch" else None)
    other = {k: b for k, b in pipe.components.backends.items() if b != spec.engine}
    if other:
        raise BackendUnavailable(f"{spec.name} did not run on {spec.engine}: the pipeline fell back to "
                                 + "; ".join(f"{k} on {b}" for k, b in other.items()))
    return pipe


def diffusers_dtype(device: str, precision: str):
    """diffusers' default for the device (fp32 on a CPU, fp16 on a GPU) unless one is named."""
    from coreml_sd.devices import torch_dtype

    if precision == "auto":
        precision = "fp32" if device == "cpu" else "fp16"
    return torch_dtype(precision)


def diffusers_pipeline_class(source):
    """diffusers' text-to-image pipeline for the model's family: SDXL's for two text encoders."""
    import diffusers

    two = len(source.info.spec.text_encoders) > 1
    return diffusers.StableDiffusionXLPipeline if two else diffusers.StableDiffusionPipeline


def load_diffusers(task):
    """StableDiffusionPipeline (or StableDiffusionXLPipeline): `from_pretrained` for a diffusers folder,
    else its constructor around the modules coreml_sd reads from the file (diffusers cannot read a
    single file offline)."""
    import torch
    from diffusers import EulerAncestralDiscreteScheduler

    from coreml_sd.devices import resolve_device
    from coreml_sd.model_source import require_torch
    from coreml_sd.sources import open_model

    device = resolve_device(task.run.spec.device)
    dtype = diffusers_dtype(device, task.run.precision)
    source = open_model(task.model_path)
    require_torch(source)
    if source.info.kind == "diffusers":
        from coreml_sd.checkpoint.safeload import check_folder_weights

        check_folder_weights(source.info.path)  # refused with our message, before torch's unpickler sees a .bin
        cls = diffusers_pipeline_class(source)
        extra = {} if len(source.info.spec.text_encoders) > 1 else dict(safety_checker=None,
                                                                         requires_safety_checker=False)
        with _quiet_diffusers():
            pipe = cls.from_pretrained(source.info.path, torch_dtype=dtype, local_files_only=True, **extra)
    else:
        pipe = _pipeline_from_modules(source, device, dtype)
    # A key a config leaves null (SD 1.5 folders written from coreml_sd's configs have
    # timestep_spacing: null) takes the scheduler's default, as a missing key does in diffusers.
    config = {k: v for k, v in pipe.scheduler.config.items() if v is not None}
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(torch.device(device))


@contextlib.contextmanager
def _quiet_diffusers():
    """No loading bars or `torch_dtype` deprecation notes between the harness's progress lines."""
    from diffusers.utils import logging as dlogging

    was_enabled = dlogging.is_progress_bar_enabled()
    dlogging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        if was_enabled:
            dlogging.enable_progress_bar()


def scheduler_config(config) -> dict:
    """diffusers scheduler_config keys of a coreml_sd SchedulerConfig; unset (None) keys left out."""
    return {**{k: v for k, v in config.to_dict().items() if v is not None}, "skip_prk_steps": True}


def _pipeline_from_modules(source, device: str, dtype):
    from diffusers import PNDMScheduler
    from transformers import CLIPTokenizer

    from coreml_sd.model_source import pad_token

    mods = source.torch_modules(device=device, dtype=dtype)
    files = source.info.tokenizer_files

    def tokenizer(component):
        return CLIPTokenizer(str(files.vocab), str(files.merges), model_max_length=77,
                             pad_token=pad_token(source.info, component))

    scheduler = PNDMScheduler.from_config(scheduler_config(source.info.scheduler))
    cls = diffusers_pipeline_class(source)
    if len(source.info.spec.text_encoders) > 1:
        return cls(vae=mods.vae, text_encoder=mods.text_encoder, text_encoder_2=mods.text_encoder_2,
                   tokenizer=tokenizer("text_encoder"), tokenizer_2=tokenizer("text_encoder_2"), unet=mods.unet,
                   scheduler=scheduler)
    return cls(vae=mods.vae, text_encoder=mods.text_encoder, tokenizer=tokenizer("text_encoder"), unet=mods.unet,
               scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


# -- descriptions -------------------------------------------------------------------------------
_DTYPE_NAMES = {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16"}


def torch_attention(unet) -> str:
    """The attention processors a diffusers UNet runs (torch SDPA for AttnProcessor2_0)."""
    unet = getattr(unet, "_orig_mod", unet)  # a torch.compile'd module
    names = sorted({type(p).__name__ for p in unet.attn_processors.values()})
    sdpa = any("2_0" in n for n in names)
    return ", ".join(names) + (" (torch scaled_dot_product_attention)" if sdpa else "")


def _mil_facts(pipe) -> tuple[str | None, str | None]:
    """(compute precision, attention as executed) of a mil UNet, from its executors."""
    executors = getattr(getattr(pipe.components.unet, "package", None), "executors", [])
    if not executors:
        return None, None
    half = _DTYPE_NAMES.get(str(executors[0].precision.half))
    fused = sum(ex.fused.get("fused_attention", 0) for ex in executors)
    if not fused:
        return half, "run op by op by the mil executor (no attention fused)"
    return half, f"{fused} attention blocks fused into torch scaled_dot_product_attention by the mil executor"


def describe_ours(pipe, task) -> dict:
    spec = task.run.spec
    manifest = pipe.source.packages.manifest if pipe.source.packages is not None else None
    out = {"runs_on": dict(pipe.components.runs_on)}
    if spec.engine == "torch":
        module = pipe.components.unet.module
        out.update(precision=_DTYPE_NAMES[str(pipe.components.unet.dtype)], attention=torch_attention(module),
                   compression="none")
    else:
        out.update(precision=manifest.precision, attention=manifest.attention, compression=manifest.weights)
        if spec.engine == "mil":
            half, executed = _mil_facts(pipe)
            out["precision"] = f"{half} compute ({manifest.precision} package)" if half else manifest.precision
            if executed:
                out["attention"] = f"{manifest.attention}; {executed}"
    return out


def describe_diffusers(pipe, task) -> dict:
    device, dtype = str(pipe.unet.device), str(pipe.unet.dtype)
    where = f"diffusers {device} {_DTYPE_NAMES.get(dtype, dtype)} eager"
    encoders = ("text_encoder", "text_encoder_2") if hasattr(pipe, "text_encoder_2") else ("text_encoder",)
    return {"runs_on": {**{e: where for e in encoders}, "unet": where, "vae_decoder": where},
            "precision": _DTYPE_NAMES.get(dtype, dtype), "attention": torch_attention(pipe.unet),
            "compression": "none"}


# -- workloads ----------------------------------------------------------------------------------
class OursWorkload:
    """A coreml_sd Pipeline (torch, mil or coreml components)."""

    def __init__(self, pipe, settings: Settings):
        from coreml_sd.denoiser import Denoiser
        from coreml_sd.schedules import make_plan
        from coreml_sd.text_conditioning import SizeConditioning

        self.pipe, self.s = pipe, settings
        info = pipe.info
        fixed = info.sizes[0] if info.sizes else None  # converted packages take their sizes
        self.width, self.height = fixed or (settings.width or info.sample_size, settings.height or info.sample_size)
        f = info.vae_scale_factor
        shape = (1, info.latent_channels, self.height // f, self.width // f)
        rng = np.random.default_rng(0)
        asarray = pipe.components.asarray
        self.x = asarray(rng.standard_normal(shape).astype(np.float32))
        self.z = asarray(rng.standard_normal(shape).astype(np.float32))
        plan = make_plan(info.scheduler, "euler", max(settings.steps + settings.warmup, 2))
        self.timesteps = plan.timesteps
        conds = pipe.conditionings([settings.prompt], [""], SizeConditioning.for_size(self.width, self.height))
        self.denoiser = Denoiser(pipe.components.unet, plan, prediction_type=info.prediction_type,
                                 cond=conds[(settings.prompt, False)], uncond=conds[("", True)],
                                 guidance_scale=settings.guidance_scale)

    def text_encoder(self, i: int):
        return self.pipe.encode_prompt(self.s.prompt)

    def unet_step(self, i: int):
        return self.denoiser.model_output(self.x, self.timesteps[i % len(self.timesteps)])

    def vae_decoder(self, i: int):
        return self.pipe.components.vae_decoder.decode(self.z)

    def generate(self, steps: int, *, sampler: str, guidance_scale: float):
        return self.pipe(self.s.prompt, steps=steps, seed=0, sampler=sampler, guidance_scale=guidance_scale,
                         width=self.width, height=self.height)

    def vae_encoder(self, i: int):
        encoder = self.pipe.components["vae_encoder"]  # loaded on first use, as img2img loads it
        return encoder.encode(self.pipe.components.asarray(bench_picture_array(self.width, self.height)))

    def img2img(self, steps: int, *, strength: float, sampler: str, guidance_scale: float) -> int:
        """One img2img generation; returns the sampler steps it ran."""
        from coreml_sd.pipeline import Progress

        counted = 0
        for event in self.pipe.generate(self.s.prompt, steps=steps, seed=0, sampler=sampler,
                                        guidance_scale=guidance_scale, width=self.width, height=self.height,
                                        init_image=bench_picture(self.width, self.height), strength=strength):
            counted += isinstance(event, Progress)
        return counted


class DiffusersWorkload:
    """diffusers' StableDiffusionPipeline (or SDXL's), its modules called eagerly as its __call__ does."""

    def __init__(self, pipe, settings: Settings):
        import torch

        self.pipe, self.s, self.torch = pipe, settings, torch
        unet, vae = pipe.unet, pipe.vae
        f = pipe.vae_scale_factor
        size = unet.config.sample_size * f
        self.width, self.height = settings.width or size, settings.height or size
        shape = (1, unet.config.in_channels, self.height // f, self.width // f)
        gen = torch.Generator().manual_seed(0)
        device, dtype = unet.device, unet.dtype
        self.x = torch.randn(shape, generator=gen).to(device, dtype)
        self.z = torch.randn(shape, generator=gen).to(device, vae.dtype)
        self.xl = hasattr(pipe, "text_encoder_2")
        self.ids = self._ids(settings.prompt)
        with torch.inference_mode():
            if self.xl:  # both text encoders, the pooled embedding and the size conditioning, as SDXL's __call__
                cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
                    settings.prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True)
                time_ids = torch.tensor([[self.height, self.width, 0, 0, self.height, self.width]] * 2,
                                        device=device, dtype=dtype)
                self.added = {"text_embeds": torch.cat([uncond_pooled, pooled]).to(dtype), "time_ids": time_ids}
            else:
                cond = pipe.text_encoder(self.ids)[0]
                uncond = pipe.text_encoder(self._ids(""))[0]
                self.added = None
        self.embeddings = torch.cat([uncond, cond]).to(dtype)
        pipe.scheduler.set_timesteps(max(settings.steps + settings.warmup, 2), device=device)
        self.timesteps = pipe.scheduler.timesteps

    def _ids(self, text: str):
        tok = self.pipe.tokenizer
        return tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids.to(self.pipe.text_encoder.device)

    def text_encoder(self, i: int):
        with self.torch.inference_mode():
            if self.xl:
                return self.pipe.encode_prompt(self.s.prompt, device=self.pipe.unet.device,
                                               do_classifier_free_guidance=False)[0]
            return self.pipe.text_encoder(self.ids)[0]

    def unet_step(self, i: int):
        with self.torch.inference_mode():
            t = self.timesteps[i % len(self.timesteps)]
            extra = {"added_cond_kwargs": self.added} if self.added is not None else {}
            noise = self.pipe.unet(self.torch.cat([self.x] * 2), t, encoder_hidden_states=self.embeddings,
                                   **extra).sample
            uncond, cond = noise.chunk(2)
            return uncond + self.s.guidance_scale * (cond - uncond)

    def vae_decoder(self, i: int):
        with self.torch.inference_mode():
            return self.pipe.vae.decode(self.z).sample

    def generate(self, steps: int, *, sampler: str, guidance_scale: float):
        from diffusers import EulerAncestralDiscreteScheduler, LCMScheduler

        # the bench's samplers as diffusers' schedulers (euler_a, the default; lcm, the few-step one)
        schedulers = {"euler_a": EulerAncestralDiscreteScheduler, "lcm": LCMScheduler}
        if sampler not in schedulers:
            raise BackendUnavailable(f"the diffusers baseline runs {', '.join(schedulers)}, not {sampler!r}")
        config = {k: v for k, v in self.pipe.scheduler.config.items() if v is not None}
        self.pipe.scheduler = schedulers[sampler].from_config(config)
        gen = self.torch.Generator(self.pipe.unet.device).manual_seed(0)
        return self.pipe(self.s.prompt, num_inference_steps=steps, guidance_scale=guidance_scale,
                         width=self.width, height=self.height, generator=gen).images

    def vae_encoder(self, i: int):
        vae = self.pipe.vae
        x = self.torch.from_numpy(bench_picture_array(self.width, self.height)).to(vae.device, vae.dtype)
        with self.torch.inference_mode():
            return vae.encode(x).latent_dist.parameters

    def img2img(self, steps: int, *, strength: float, sampler: str, guidance_scale: float) -> int:
        """diffusers' img2img pipeline over the same modules (Euler a); returns the steps it ran."""
        from diffusers import AutoPipelineForImage2Image, EulerAncestralDiscreteScheduler

        if sampler != "euler_a":
            raise BackendUnavailable(f"the diffusers img2img baseline runs euler_a, not {sampler!r}")
        pipe = AutoPipelineForImage2Image.from_pipe(self.pipe)
        config = {k: v for k, v in self.pipe.scheduler.config.items() if v is not None}
        pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(config)
        pipe.set_progress_bar_config(disable=True)
        counted = []
        gen = self.torch.Generator(self.pipe.unet.device).manual_seed(0)
        pipe(self.s.prompt, image=bench_picture(self.width, self.height), strength=strength,
             num_inference_steps=steps, guidance_scale=guidance_scale, generator=gen,
             callback_on_step_end=lambda p, i, t, kw: counted.append(i) or kw)
        return len(counted)


def bench_picture(width: int, height: int):
    """The img2img input: a smooth colour field with a few shapes (deterministic)."""
    from PIL import Image

    return Image.fromarray(((bench_picture_array(width, height)[0].transpose(1, 2, 0) + 1) * 127.5).astype(np.uint8))


def bench_picture_array(width: int, height: int) -> np.ndarray:
    """(1, 3, H, W) in [-1, 1]: gradients and a disc, as an encoder input."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r, g = x / max(width - 1, 1), y / max(height - 1, 1)
    disc = ((x - width / 2) ** 2 + (y - height / 2) ** 2 < (min(width, height) / 4) ** 2).astype(np.float32)
    return (np.stack([r, g, disc])[None] * 2 - 1).astype(np.float32)


@dataclass(frozen=True)
class Engine:
    load: Callable[[Any], Any]
    workload: Callable[[Any, Any], Any]
    describe: Callable[[Any, Any], dict]


ENGINES = {
    "torch": Engine(load_ours, OursWorkload, describe_ours),
    "mil": Engine(load_ours, OursWorkload, describe_ours),
    "coreml": Engine(load_ours, OursWorkload, describe_ours),
    "diffusers": Engine(load_diffusers, DiffusersWorkload, describe_diffusers),
}
