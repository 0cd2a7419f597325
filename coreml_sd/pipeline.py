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
from functools import partial
from typing import Any, Iterator, Sequence

import numpy as np

from coreml_sd import arrays
from coreml_sd.backends import Components, LoadOptions
from coreml_sd.conditioning import Conditioning, TextEncoding
from coreml_sd.errors import BackendUnavailable, InputError, ModelError
from coreml_sd.image_conditioning import HiresFix, ImageRequest, ImageStart, Prepared, prepare, truncate
from coreml_sd.image_input import parse_resize_mode
from coreml_sd.images import GenerationParams
from coreml_sd.inpaint_inputs import InpaintSettings, finish_inpaint
from coreml_sd.masks import parse_masked_content
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
    phase: str = "sampling"  # "sampling", or "hires" for the hires fix's second pass


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



class BakedClipSkip:
    """A text encoder package converted with clip skip `baked` (convert --clip-skip): its output is
    that clip skip's hidden state, so it answers requests for that one and refuses others."""

    def __init__(self, encoder, baked: int):
        self.encoder, self.baked = encoder, baked

    def encode(self, input_ids, clip_skip: int = 1) -> TextEncoding:
        if clip_skip != self.baked:
            name = getattr(getattr(self.encoder, "package", None), "name", "the text encoder package")
            raise InputError(f"{name} was converted with clip skip {self.baked}, so clip skip {clip_skip} cannot be "
                             f"applied to it (valid: {self.baked}); convert again with --clip-skip {clip_skip}, or "
                             f"run the text encoder on torch (--backend text_encoder=torch) where the source is at "
                             f"hand")
        return self.encoder.encode(input_ids)

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
        self.refiner = None  # coreml_sd.refiner.Refiner: takes over the last steps (load(refiner=...))

    @classmethod
    def load(cls, model=None, *, backend: str = "auto", device: str = "auto", precision: str = "auto",
             compute_units: str = "all", reduce_memory: bool = False, compile: str | None = None,
             refiner=None, **source_options) -> "Pipeline":
        """Open `model` (a path; None = the built-in model) and build its components.

        `backend`: auto, a backend name, a fallback order or per component (see
        `coreml_sd.backends.selection`). `device`/`precision`: torch and mil; `compute_units`
        (ane, gpu, cpu, all): coreml; `compile`: a torch.compile mode for a torch UNet.
        `reduce_memory`: load each component just in time and release it after use (text
        encoder -> UNet -> VAE decoder), for 8 GB Macs. `refiner`: a model (path) whose UNet takes
        over the last steps (`generate(refiner_switch=...)`, see `coreml_sd.refiner`), loaded on
        the same backends; a converted folder with a UnetRefiner package brings its own.
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
        pipe = cls(source, components, reduce_memory=reduce_memory)
        # --- refiner wiring (issue #12) ---
        from coreml_sd.refiner import load_refiner

        pipe.refiner = load_refiner(cls, source, refiner, request, options, reduce_memory=reduce_memory)
        # --- end refiner wiring ---
        return pipe

    def _size(self, width: int | None, height: int | None, image=None) -> tuple[int, int]:
        # Converted Core ML packages take exactly the sizes they were converted for; an init image
        # gives its own size (to a multiple of 8) where the model takes any.
        sizes = self.info.sizes
        default_w, default_h = sizes[0] if sizes else (self.info.sample_size, self.info.sample_size)
        if image is not None and not sizes:
            from coreml_sd.image_input import load_image

            w, h = load_image(image.init_image).size
            default_w, default_h = max(8, w // 8 * 8), max(8, h // 8 * 8)
        width = check_side(width or default_w, "width")
        height = check_side(height or default_h, "height")
        if sizes and (width, height) not in sizes:
            listed = ", ".join(f"{w}x{h}" for w, h in sizes)
            raise InputError(f"{self.info.name} was converted for {listed}; got {width}x{height} "
                             f"(convert again with --sizes or --width/--height, or use the torch backend)")
        return width, height

    def prompt_encoder(self, options: PromptOptions = PromptOptions()) -> PromptEncoder:
        """Prompts in AUTOMATIC1111's syntax through this model's text encoders."""
        encoders = {t.component: self.components[t.component] for t in self.family.text_encoders}
        if self.info.clip_skip != 1:  # packages converted with a clip skip give that one only
            encoders = {c: e if self.components.backends.get(c) == "torch" else BakedClipSkip(e, self.info.clip_skip)
                        for c, e in encoders.items()}
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
                 a1111: bool = False, clip_skip: int | None = None, emphasis: str = "Original",
                 init_image: Any = None, strength: float | None = None, resize_mode: str = "stretch",
                 mask: Any = None, mask_blur: int = 4, inpaint_full_res: bool = False, inpaint_padding: int = 32,
                 masked_content: str = "original", invert_mask: bool = False,
                 outpaint: str | None = None, outpaint_fill: str = "edge",
                 hires_scale: float | None = None, hires_steps: int | None = None, hires_denoise: float = 0.7,
                 hires_upscaler: str = "latent", controlnets: Sequence[Any] = (), control_mode: str = "balanced",
                 control_resize_mode: str = "crop", refiner_switch: float | None = None,
                 timestep_spacing: str | None = None,
                 ) -> Iterator[Progress | GeneratedImage]:
        """`prompt`/`negative_prompt`: one text for every image, or a list with one per image.
        `num_images` defaults to the length of such a list, else 1. `sampler`/`schedule`: our keys
        or A1111's names ("DPM++ 2M Karras"); `eta`, `ensd` (A1111's "Eta noise seed delta") and
        `a1111` (A1111's plans throughout): see `coreml_sd.samplers.sample` and `schedules.make_plan`.
        Prompts are read in AUTOMATIC1111's syntax (emphasis, BREAK, long prompts, prompt editing and
        alternation); `clip_skip` and `emphasis` as its settings of those names (clip skip
        None: the model's, 1 unless its text encoder packages were converted with another). `timestep_spacing`
        overrides the model's ("trailing" for SD-Turbo/Hyper-SD-style few-step models).

        From a picture (`coreml_sd.image_conditioning`): `init_image` (path or PIL) with `strength`
        (A1111's denoising strength, default 0.75) and `resize_mode` is img2img; with a `mask`
        (white = repaint) inpainting, with A1111's `mask_blur`, `inpaint_full_res` ("Only masked"),
        `inpaint_padding`, `masked_content` and `invert_mask` ("Inpaint not masked"). `outpaint`
        ("left=128,right=128,up=0,down=64") grows the init image's canvas (`outpaint_fill` edge or
        noise) and inpaints the new area. `hires_scale` is A1111's hires fix: generate, upscale the
        latents (`hires_upscaler` latent) or the image (lanczos) by the scale, then img2img at that size
        with `hires_steps` (default: steps) and `hires_denoise`.

        `controlnets`: (model, image[, weight[, start[, end]]]) tuples or `coreml_sd.control.ControlUnit`s,
        summed; `control_mode` (balanced, prompt, controlnet) and `control_resize_mode` (stretch,
        crop, fill) apply to units that do not set their own (see `coreml_sd.control`). The hires
        pass runs without them.

        `refiner_switch`: the fraction of the schedule after which a loaded refiner takes over
        (default 0.8; `coreml_sd.refiner`); the hires pass runs on the base model."""
        from coreml_sd.denoiser import Denoiser
        from coreml_sd.samplers import SAMPLERS, sampling_extras
        from coreml_sd.sampler_names import resolve_sampler_and_schedule
        from coreml_sd.schedules import make_plan, with_spacing

        # --- sampler wiring (issue #14): names, eta/ENSD, A1111 plans ---
        sampler, schedule = resolve_sampler_and_schedule(sampler, schedule)
        sampling = dict(eta=eta, ensd=ensd)
        # --- end sampler wiring ---
        image = self._image_request(init_image, strength, resize_mode, mask, InpaintSettings(
            mask_blur=mask_blur, only_masked=inpaint_full_res, padding=inpaint_padding,
            masked_content=parse_masked_content(masked_content), invert=invert_mask), outpaint, outpaint_fill, seed)
        width, height = self._size(width, height, image)
        hires = None if hires_scale is None else HiresFix.checked(hires_scale, hires_steps or steps, hires_denoise,
                                                                  hires_upscaler, width, height, self.info.sizes)
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
        prepared = None
        if image is not None:
            encoder = self._vae_encoder()
            prepared = prepare(image, width, height, self.info.vae_scale_factor)
            plan = truncate(plan, image.strength)
        size = SizeConditioning.for_size(width, height)
        # Prompt editing counts denoiser calls; A1111 counts two per step for second-order samplers.
        calls = steps * (2 if SAMPLERS[sampler].second_order else 1)
        clip_skip = self.info.clip_skip if clip_skip is None else clip_skip
        prompt_options = PromptOptions(emphasis=emphasis, clip_skip=clip_skip)
        conds = self.conditionings(prompts, negatives, size, steps=calls, options=prompt_options)
        # --- ControlNet wiring (issue #16): a stage the denoiser calls before each UNet call ---
        control = self._control(controlnets, width, height, plan.steps, control_mode, control_resize_mode, a1111)
        unet_name = "controlled_unet" if control is not None else "unet"
        # --- end ControlNet wiring ---
        # --- refiner wiring (issue #12): its own conditioning, a second denoiser for the last steps ---
        from coreml_sd.refiner import Handoff

        handoff = Handoff.start(self, refiner_switch, plan, prompts, negatives, size, calls, prompt_options)
        # --- end refiner wiring ---
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
                denoiser = Denoiser(self.components[unet_name], plan, prediction_type=self.info.prediction_type,
                                    cond=Scheduled.rows([conds[(prompts[i], False)] for i in batch], Conditioning.concat),
                                    uncond=Scheduled.rows([conds[(negatives[i], True)] for i in batch],
                                                          Conditioning.concat),
                                    guidance_scale=guidance_scale, control=control)
                shape = (len(batch), self.info.latent_channels, height // f, width // f)
                start = Progress(batch[0], num_images, 0, plan.steps, seed + batch[0], len(batch))
                begin = None if prepared is None else partial(
                    ImageStart, prepared, encode=encoder.encode, plan=plan, model_scale=self._model_scale(sampler, plan),
                    unet_channels=self.unet_in_channels, latent_channels=self.info.latent_channels,
                    scaling_factor=self.info.scaling_factor, vae_factor=f, batch=len(batch))
                segments = handoff.segments(denoiser, batch, prompts, negatives, guidance_scale)
                x = yield from self._sample(sampler, segments, plan, shape, start, begin=begin, **sampling)
                latents += [(i, x[k:k + 1]) for k, i in enumerate(batch)]
            if hires is not None:
                latents = yield from self._hires(latents, hires, prompts, negatives, seed, num_images, sampler,
                                                 schedule, a1111, guidance_scale, prompt_options, sampling)
            if self.reduce_memory:
                self._release_unet(unet_name, control)
            for i, x in latents:
                picture = to_pil(self._decode(x, i, seed + i))
                if prepared is not None and prepared.inpaint is not None:
                    picture = finish_inpaint(picture, prepared.inpaint)  # every pixel outside the mask kept
                extras = {**sampling_extras(sampler, **sampling), **prompt_extras(prompt_options),
                          **(image.a1111_params() if image is not None else {}),
                          **(hires.a1111_params() if hires is not None else {}),
                          **(control.extras() if control is not None else {}), **self.generation_extras(),
                          **handoff.metadata()}
                if timestep_spacing:
                    extras["Timestep spacing"] = timestep_spacing
                meta = GenerationParams(seed=seed + i, prompt=prompts[i], negative_prompt=negatives[i],
                                        extras=extras, **params)
                results.append(GeneratedImage(picture, i, seed + i, meta, arrays.to_numpy(x)))
                yield results[-1]
        self._release_unet(unet_name, control)
        self.components.release("vae_decoder")
        return results

    def _control(self, controlnets, width: int, height: int, steps: int, mode: str, resize_mode: str, a1111: bool):
        """The request's ControlNet stage (coreml_sd.control), or None without ControlNets."""
        if not controlnets:
            return None
        from coreml_sd.control import prepare_control

        return prepare_control(self.components, self.source, list(controlnets), width=width, height=height,
                               steps=steps, mode=mode, resize_mode=resize_mode, a1111=a1111)

    def _release_unet(self, unet_name: str, control) -> None:
        for name in [unet_name, *(control.keys if control is not None else [])]:
            self.components.release(name)

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
                        "with --max-prompt-chunks, or use the torch backend)", tokens // 77, self.info.name, limit // 77)
            encoded = {k: s.map(lambda e: TextEncoding(e.hidden[:, :limit], e.pooled)) for k, s in encoded.items()}
            tokens = limit
        empty = encoder.encode("", 1).at(0)
        for spec in self.family.text_encoders:
            self.components.release(spec.component)
        return {key: s.map(lambda e, key=key: conditioning(self.family, pad_context(e, tokens, empty), size,
                                                           negative=key[1]))
                for key, s in encoded.items()}

    def _sample(self, sampler: str, segments, plan, shape, start: Progress, *, eta=None, ensd: int = 0,
                begin=None):
        """Yields a Progress per step and returns the final latents of images start.image_index ..
        + shape[0] - 1 (image i's noise from its own source, seed + i). `segments`: (denoiser, part
        of `plan`) in turn — the whole plan with one denoiser, or a refiner's hand-off (a list of one
        denoiser alone: the whole plan). `begin(noise=...)`: an `ImageStart` for a request that
        starts from a picture (it draws from the same streams first)."""
        from coreml_sd.samplers import noise_from_sources, step_noise

        segments = [(segments, plan)] if not isinstance(segments, list) else segments
        sources = [NoiseSource(start.seed + k) for k in range(shape[0])]
        noise = noise_from_sources(sources, self.components.asarray)
        if begin is not None:
            begin = begin(noise=noise)
            x, segments[0][0].latent_extra = begin.start, begin.latent_extra
        else:
            x = noise(shape) * plan.init_noise_sigma
        # One step-noise source over the whole plan, so a hand-off continues its noise.
        shared = dict(noise=noise, noise_sampler=step_noise(sampler, plan, noise, tuple(x.shape), eta=eta, ensd=ensd),
                      eta=eta, ensd=ensd)
        step = 0
        for i, (denoiser, part) in enumerate(segments):
            if i:  # prompt editing counts on across the hand-off
                denoiser.calls = segments[i - 1][0].calls
            x = yield from self._steps(sampler, denoiser, x, part, start, step, begin, shared)
            step += part.steps
            if self.reduce_memory and len(segments) > 1:
                release = getattr(denoiser.unet, "release", None)
                if callable(release):  # the next segment's UNet needs the memory
                    release()
        return x

    @staticmethod
    def _steps(sampler: str, denoiser, x, plan, start: Progress, step: int, begin, shared: dict):
        """The sampler over `plan` from `x` (the request's step `step`): a Progress per step, the latents last."""
        from coreml_sd.samplers import sample

        steps, sent = sample(sampler, denoiser, x, plan, **shared), None
        denoiser.at_step(step)
        while True:
            try:
                x = steps.send(sent)
            except StopIteration:
                return x
            sent = None if begin is None else begin.blend(step, x)  # a 4-channel inpaint's blend
            x = x if sent is None else sent
            step += 1
            denoiser.at_step(step)  # before the caller resumes the sampler into step `step` (0-based)
            yield replace(start, step=step)

    # -- starting from a picture --------------------------------------------------------------
    @property
    def unet_in_channels(self) -> int:
        return self.family.unet_in_channels

    def _image_request(self, init_image, strength, resize_mode, mask, inpaint, outpaint=None, outpaint_fill="edge",
                       seed=None) -> ImageRequest | None:
        if init_image is None:
            given = [n for n, v in (("a mask", mask), ("strength", strength), ("outpaint", outpaint)) if v is not None]
            if given:
                raise InputError(f"{given[0]} needs an init image (init_image)")
            if self.unet_in_channels != self.info.latent_channels:
                raise InputError(f"{self.info.name} is an inpainting model: it needs an init image and a mask")
            return None
        if outpaint is not None:
            if mask is not None:
                raise InputError("outpainting makes its own mask (the new area): give either a mask or outpaint")
            from coreml_sd.image_input import load_image
            from coreml_sd.outpaint import outpaint_canvas, parse_outpaint

            sides = parse_outpaint(outpaint)
            init_image, mask = outpaint_canvas(load_image(init_image), sides.left, sides.right, sides.up, sides.down,
                                               fill=outpaint_fill, seed=0 if seed is None else int(seed) % 2**32)
            strength = 1.0 if strength is None else strength  # the new area has nothing to keep
        return ImageRequest(init_image, 0.75 if strength is None else strength, parse_resize_mode(resize_mode),
                            mask, inpaint, outpaint=outpaint)

    def _vae_encoder(self):
        try:
            return self.components["vae_encoder"]
        except BackendUnavailable as exc:
            raise InputError(f"starting from an image needs a VAE encoder, and {self.info.name} has none it can run "
                             f"({exc}); convert the model again with --components "
                             f"{','.join(self.family.component_names)},vae_encoder") from None

    def _hires(self, latents, hires, prompts, negatives, seed, num_images, sampler, schedule, a1111, guidance_scale,
               prompt_options, sampling):
        """A1111's hires fix, second pass: each image's latents upscaled (or its image, re-encoded) and
        denoised again at the target size by img2img; noise from the same seeds."""
        from coreml_sd.denoiser import Denoiser
        from coreml_sd.samplers import SAMPLERS
        from coreml_sd.schedules import make_plan

        f = self.info.vae_scale_factor
        plan = truncate(make_plan(self.info.scheduler, sampler, hires.steps, schedule, family=self.info.family,
                                  a1111=a1111), hires.denoise)
        size = SizeConditioning.for_size(hires.width, hires.height)
        calls = hires.steps * (2 if SAMPLERS[sampler].second_order else 1)
        conds = self.conditionings(prompts, negatives, size, steps=calls, options=prompt_options)
        request = ImageRequest(init_image=True, strength=hires.denoise)
        out = []
        for i, x in latents:
            prepared = Prepared(request, None, latents=hires.upscale_latents(x, f)) if hires.upscaler == "latent" \
                else Prepared(request, self._upscaled_pixels(x, hires))
            denoiser = Denoiser(self.components["unet"], plan, prediction_type=self.info.prediction_type,
                                cond=conds[(prompts[i], False)], uncond=conds[(negatives[i], True)],
                                guidance_scale=guidance_scale)
            begin = partial(ImageStart, prepared, encode=self._vae_encoder().encode if prepared.latents is None else None,
                            plan=plan, model_scale=self._model_scale(sampler, plan), unet_channels=self.unet_in_channels,
                            latent_channels=self.info.latent_channels, scaling_factor=self.info.scaling_factor,
                            vae_factor=f, batch=1)
            shape = (1, self.info.latent_channels, hires.height // f, hires.width // f)
            start = Progress(i, num_images, 0, plan.steps, seed + i, 1, phase="hires")
            x = yield from self._sample(sampler, denoiser, plan, shape, start, begin=begin, **sampling)
            out.append((i, x))
        return out

    def _upscaled_pixels(self, x, hires) -> np.ndarray:
        """The image decoded, Lanczos-resized to the hires size, as the VAE encoder's input."""
        from coreml_sd.image_input import image_to_array, resize_image

        picture = to_pil(self.components["vae_decoder"].decode(x / self.info.scaling_factor))
        return image_to_array(resize_image(picture, hires.width, hires.height, "stretch"))

    @staticmethod
    def _model_scale(sampler: str, plan) -> bool:
        from coreml_sd.samplers import SAMPLERS

        return SAMPLERS[sampler].model_scale if plan.model_scale is None else plan.model_scale

    def _decode(self, x, index: int, seed: int):
        """Latents -> image (1, 3, H, W); values that are not finite are an error naming the component."""
        check_finite(x, "unet", self.components, index, seed)
        image = self.components["vae_decoder"].decode(x / self.info.scaling_factor)
        check_finite(image, "vae_decoder", self.components, index, seed)
        return image

    def generation_extras(self) -> dict[str, str]:
        extras = dict(self.source.generation_extras)
        extras["Backend"] = describe_runs_on(self.components.runs_on)
        extras["RNG"] = "CPU"  # the initial noise is torch's CPU generator's, AUTOMATIC1111's "RNG: CPU"
        return extras

    def __call__(self, prompt: str, **kwargs) -> list[GeneratedImage]:
        """Generate and return the images (no progress)."""
        return [r for r in self.generate(prompt, **kwargs) if isinstance(r, GeneratedImage)]


def check_finite(values, component: str, components: Components, index: int, seed: int) -> None:
    """NaN or inf from a component is an error (never a black image written silently)."""
    array = arrays.to_numpy(values)
    if np.isfinite(array).all():
        return
    where = components.runs_on.get(component, "")
    raise ModelError(f"the {component}{f' ({where})' if where else ''} returned {array.size - int(np.isfinite(array).sum())} "
                     f"NaN/inf values of {array.size} for image {index + 1} (seed {seed}); no image was made. An fp16 "
                     f"overflow is the usual cause: use --precision fp32 (torch), or convert the model again (this "
                     f"version makes the VAE decoder fp16-safe)")


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
