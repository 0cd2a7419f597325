"""Text-to-image: prompt -> text embeddings -> sampler over a guided denoiser -> VAE -> images.

`Pipeline.generate` is a generator: it yields a `Progress` after every sampler step and a
`GeneratedImage` when each image is done, so the caller owns progress display; the list of images
is also its return value. Image i of a request uses seed + i, so any image can be redone alone.
`batch_size` images go through the UNet together (each with its own noise source, so the same
images as one at a time, to the floating-point rounding a larger batch may change); a list of
prompts gives each image its own.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, replace
from typing import Any, Iterator, Sequence

import numpy as np

from coreml_sd import arrays
from coreml_sd.backends import Components, LoadOptions
from coreml_sd.conditioning import Conditioning, TextEncoding
from coreml_sd.errors import InputError
from coreml_sd.images import GenerationParams
from coreml_sd.model_source import ModelSource
from coreml_sd.rng import NoiseSource
from coreml_sd.text_conditioning import (PromptEncoder, PromptOptions, Scheduled, SizeConditioning, conditioning,
                                         pad_context)

log = logging.getLogger("coreml_sd")

MAX_SIDE = 8192
MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class Progress:
    image_index: int  # the first image of the batch being sampled
    num_images: int
    step: int  # 1-based steps completed
    steps: int
    seed: int  # of image `image_index`
    batch: int = 1  # images sampled together in this step: image_index .. image_index + batch - 1


@dataclass(frozen=True)
class GeneratedImage:
    image: Any  # PIL.Image.Image
    index: int
    seed: int
    params: GenerationParams
    latents: np.ndarray  # final latents (1, C, h, w), float32, before VAE scaling


def check_side(value: int, name: str, multiple: int = 8) -> int:
    if not isinstance(value, int) or value < multiple or value > MAX_SIDE or value % multiple:
        raise InputError(f"{name} must be a multiple of {multiple} between {multiple} and {MAX_SIDE}; got {value}")
    return value


def check_positive(value: int, name: str) -> int:
    if not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be an integer >= 1; got {value!r}")
    return value


def random_seed() -> int:
    return secrets.randbelow(2**32)


def to_pil(image) -> Any:
    """(1, 3, H, W) in [-1, 1] -> PIL RGB, rounded as diffusers' image processor does."""
    from PIL import Image

    x = arrays.to_numpy(image)[0].astype(np.float32)
    x = np.clip(x / 2 + 0.5, 0.0, 1.0).transpose(1, 2, 0)
    return Image.fromarray((x * 255).round().astype(np.uint8))


class Pipeline:
    """A loaded model: its source (facts, tokenizer) and the components the backends built."""

    def __init__(self, source: ModelSource, components: Components, *, reduce_memory: bool = False):
        self.source = source
        self.info = source.info
        self.family = source.info.spec
        self.components = components
        self.tokenizers = {t.component: source.tokenizer(t.component) for t in self.family.text_encoders}
        self.tokenizer = self.tokenizers["text_encoder"] if "text_encoder" in self.tokenizers \
            else next(iter(self.tokenizers.values()))
        # Components load when first used and are released after their phase: all latents are
        # sampled before the first is decoded, so each model is in memory once per request.
        self.reduce_memory = reduce_memory

    @classmethod
    def load(cls, model=None, *, backend: str = "auto", device: str = "auto", precision: str = "auto",
             compute_units: str = "all", reduce_memory: bool = False, compile: str | None = None,
             **source_options) -> "Pipeline":
        """Open `model` (a path; None = the built-in model) and build its components.

        `backend`: auto, a backend name, a fallback order or per component (see
        `coreml_sd.backends.selection`). `device`/`precision`: torch and mil; `compute_units`
        (ane, gpu, cpu, all): coreml; `compile`: a torch.compile mode for a torch UNet.
        `reduce_memory`: load each component just in time and release it after use (text
        encoder -> UNet -> VAE decoder), for 8 GB Macs.
        """
        from coreml_sd.backends.coreml_backend import compute_units_name
        from coreml_sd.backends.selection import load_components, parse_backend
        from coreml_sd.sources import open_model

        request = parse_backend(backend)
        compute_units_name(compute_units)  # a wrong name fails before anything loads
        if compile:
            from coreml_sd.backends.torch_compile import check_mode

            check_mode(compile)
        source = open_model(model, **source_options)
        options = LoadOptions(device=device, precision=precision, compute_units=compute_units, compile=compile)
        components = load_components(source, request, options, reduce_memory=reduce_memory)
        return cls(source, components, reduce_memory=reduce_memory)

    def _size(self, width: int | None, height: int | None) -> tuple[int, int]:
        # Converted Core ML packages take exactly the sizes they were converted for.
        sizes = self.info.sizes
        default_w, default_h = sizes[0] if sizes else (self.info.sample_size, self.info.sample_size)
        width = check_side(width or default_w, "width")
        height = check_side(height or default_h, "height")
        if sizes and (width, height) not in sizes:
            listed = ", ".join(f"{w}x{h}" for w, h in sizes)
            raise InputError(f"{self.info.name} was converted for {listed}; got {width}x{height} "
                             f"(convert again with --width/--height, or use the torch backend)")
        return width, height

    def prompt_encoder(self, options: PromptOptions = PromptOptions()) -> PromptEncoder:
        """Prompts in AUTOMATIC1111's syntax through this model's text encoders."""
        encoders = {t.component: self.components[t.component] for t in self.family.text_encoders}
        return PromptEncoder(self.family, encoders, self.tokenizers, options)

    def encode_prompt(self, text: str, *, negative: bool = False,
                      options: PromptOptions = PromptOptions()) -> TextEncoding:
        """One prompt (its first stretch, if it edits itself) through the family's text encoders:
        context (1, 77 k, C) and pooled output."""
        return self.prompt_encoder(options).encode(text, 1, negative=negative).at(0)

    def generate(self, prompt: str | Sequence[str], *, negative_prompt: str | Sequence[str] = "",
                 seed: int | None = None, num_images: int | None = None, batch_size: int = 1,
                 sampler: str = "euler_a", schedule: str = "default", steps: int = 25,
                 guidance_scale: float = 7.5, width: int | None = None,
                 height: int | None = None, eta: float | None = None, ensd: int = 0,
                 a1111: bool = False, clip_skip: int = 1, emphasis: str = "Original",
                 timestep_spacing: str | None = None,
                 ) -> Iterator[Progress | GeneratedImage]:
        """`prompt`/`negative_prompt`: one text for every image, or a list with one per image.
        `num_images` defaults to the length of such a list, else 1. `sampler`/`schedule`: our keys
        or A1111's names ("DPM++ 2M Karras"); `eta`, `ensd` (A1111's "Eta noise seed delta") and
        `a1111` (A1111's plans throughout): see `coreml_sd.samplers.sample` and `schedules.make_plan`.
        Prompts are read in AUTOMATIC1111's syntax (emphasis, BREAK, long prompts, prompt editing and
        alternation); `clip_skip` and `emphasis` as its settings of those names. `timestep_spacing`
        overrides the model's ("trailing" for SD-Turbo/Hyper-SD-style few-step models)."""
        from coreml_sd.denoiser import Denoiser
        from coreml_sd.samplers import SAMPLERS, sampling_extras
        from coreml_sd.sampler_names import resolve_sampler_and_schedule
        from coreml_sd.schedules import make_plan, with_spacing

        # --- sampler wiring (issue #14): names, eta/ENSD, A1111 plans ---
        sampler, schedule = resolve_sampler_and_schedule(sampler, schedule)
        sampling = dict(eta=eta, ensd=ensd)
        # --- end sampler wiring ---
        width, height = self._size(width, height)
        check_positive(steps, "steps")
        lists = [len(p) for p in (prompt, negative_prompt) if not isinstance(p, str)]
        num_images = num_images if num_images is not None else (lists[0] if lists else 1)
        check_positive(num_images, "num_images")
        check_positive(batch_size, "batch_size")
        prompts = per_image(prompt, num_images, "prompt")
        negatives = per_image(negative_prompt, num_images, "negative_prompt")
        seed = random_seed() if seed is None else int(seed)
        if not 0 <= seed <= MAX_SEED - (num_images - 1):
            raise InputError(f"seed must be between 0 and {MAX_SEED - num_images + 1}; got {seed}")

        plan = make_plan(with_spacing(self.info.scheduler, timestep_spacing), sampler, steps, schedule,
                         family=self.info.family, a1111=a1111)
        size = SizeConditioning.for_size(width, height)
        # Prompt editing counts denoiser calls; A1111 counts two per step for second-order samplers.
        calls = steps * (2 if SAMPLERS[sampler].second_order else 1)
        prompt_options = PromptOptions(emphasis=emphasis, clip_skip=clip_skip)
        conds = self.conditionings(prompts, negatives, size, steps=calls, options=prompt_options)
        f = self.info.vae_scale_factor
        params = dict(steps=steps, sampler=SAMPLERS[sampler].display_name, schedule=schedule,
                      guidance_scale=guidance_scale, width=width, height=height, model=self.info.name,
                      model_hash=self.info.hash)
        batches = [list(range(i, min(i + batch_size, num_images))) for i in range(0, num_images, batch_size)]
        # Each batch is sampled and decoded in turn; with reduce_memory all are sampled first, so
        # the UNet is released before the VAE decoder loads.
        groups = [batches] if self.reduce_memory else [[b] for b in batches]
        results = []
        for group in groups:
            latents = []
            for batch in group:
                denoiser = Denoiser(self.components["unet"], plan, prediction_type=self.info.prediction_type,
                                    cond=Scheduled.rows([conds[(prompts[i], False)] for i in batch], Conditioning.concat),
                                    uncond=Scheduled.rows([conds[(negatives[i], True)] for i in batch],
                                                          Conditioning.concat),
                                    guidance_scale=guidance_scale)
                shape = (len(batch), self.info.latent_channels, height // f, width // f)
                start = Progress(batch[0], num_images, 0, steps, seed + batch[0], len(batch))
                x = yield from self._sample(sampler, denoiser, plan, shape, start, **sampling)
                latents += [(i, x[k:k + 1]) for k, i in enumerate(batch)]
            if self.reduce_memory:
                self.components.release("unet")
            for i, x in latents:
                image = to_pil(self.components["vae_decoder"].decode(x / self.info.scaling_factor))
                extras = {**sampling_extras(sampler, **sampling), **prompt_extras(prompt_options),
                                          **self.generation_extras()}
                if timestep_spacing:
                    extras["Timestep spacing"] = timestep_spacing
                meta = GenerationParams(seed=seed + i, prompt=prompts[i], negative_prompt=negatives[i],
                                        extras=extras, **params)
                results.append(GeneratedImage(image, i, seed + i, meta, arrays.to_numpy(x)))
                yield results[-1]
        self.components.release("unet")
        self.components.release("vae_decoder")
        return results

    def conditionings(self, prompts: list[str], negatives: list[str], size: SizeConditioning, *, steps: int = 1,
                      options: PromptOptions = PromptOptions()) -> dict[tuple[str, bool], Scheduled]:
        """Each distinct (text, negative?) encoded once over `steps` denoiser calls, all padded to one
        context length (the longest; the empty prompt's chunks fill the rest); the text encoders are
        released after."""
        encoder = self.prompt_encoder(options)
        keys = list(dict.fromkeys([(p, False) for p in prompts] + [(n, True) for n in negatives]))
        encoded = {key: encoder.encode(key[0], steps, negative=key[1]) for key in keys}
        tokens = max(e.hidden.shape[1] for s in encoded.values() for _, e in s.entries)
        limit = self.info.max_prompt_tokens
        if limit and tokens > limit:
            log.warning("the prompt needs %d chunks of 75 tokens; %s takes %d: the rest is ignored (convert "
                        "with more prompt chunks, or use the torch backend)", tokens // 77, self.info.name, limit // 77)
            encoded = {k: s.map(lambda e: TextEncoding(e.hidden[:, :limit], e.pooled)) for k, s in encoded.items()}
            tokens = limit
        empty = encoder.encode("", 1).at(0)
        for spec in self.family.text_encoders:
            self.components.release(spec.component)
        return {key: s.map(lambda e, key=key: conditioning(self.family, pad_context(e, tokens, empty), size,
                                                           negative=key[1]))
                for key, s in encoded.items()}

    def _sample(self, sampler: str, denoiser, plan, shape, start: Progress, *, eta=None, ensd: int = 0):
        """Yields a Progress per step and returns the final latents of images start.image_index ..
        + shape[0] - 1 (image i's noise from its own source, seed + i)."""
        from coreml_sd.samplers import noise_from_sources, sample

        sources = [NoiseSource(start.seed + k) for k in range(shape[0])]
        noise = noise_from_sources(sources, self.components.asarray)
        x = noise(shape) * plan.init_noise_sigma
        for step, x in enumerate(sample(sampler, denoiser, x, plan, noise, eta=eta, ensd=ensd), start=1):
            yield replace(start, step=step)
        return x

    def generation_extras(self) -> dict[str, str]:
        extras = dict(self.source.generation_extras)
        extras["Backend"] = describe_runs_on(self.components.runs_on)
        extras["RNG"] = "CPU"  # the initial noise is torch's CPU generator's, AUTOMATIC1111's "RNG: CPU"
        return extras

    def __call__(self, prompt: str, **kwargs) -> list[GeneratedImage]:
        """Generate and return the images (no progress)."""
        return [r for r in self.generate(prompt, **kwargs) if isinstance(r, GeneratedImage)]


def prompt_extras(options: PromptOptions) -> dict[str, str]:
    """AUTOMATIC1111's parameter strings for non-default prompt settings."""
    extras = {}
    if options.clip_skip != 1:
        extras["Clip skip"] = str(options.clip_skip)
    if options.emphasis != "Original":
        extras["Emphasis"] = options.emphasis
    return extras


def per_image(text: str | Sequence[str], num_images: int, name: str) -> list[str]:
    if isinstance(text, str):
        return [text] * num_images
    texts = list(text)
    if len(texts) != num_images or not all(isinstance(t, str) for t in texts):
        raise InputError(f"{name} must be one text or a list of {num_images} texts (one per image); "
                         f"got {len(texts)} items")
    return texts


def describe_runs_on(runs_on: dict[str, str]) -> str:
    values = set(runs_on.values())
    if len(values) == 1:
        return values.pop()
    return "; ".join(f"{k} {v}" for k, v in runs_on.items())
