"""The parity gate: each converted package against the upstream torch module, on seeded inputs.

The reference is the *upstream* module (diffusers / transformers) computing in fp32, not our
rewrite, so the gate covers the rewrite and the conversion together. Packages run in Core ML on macOS where
its runtime is present, elsewhere in the `mil` executor in `exact` mode (fp16 rounding after
every fp16 op, as Core ML computes). PSNR is Apple's definition, 20 log10(max|ref| / RMSE); a
component below 35 dB fails the conversion.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from coreml_sd import metrics

log = logging.getLogger(__name__)

MIN_PSNR_DB = 35.0
PSNR_CAP_DB = 200.0  # identical arrays: a finite number keeps the manifest plain JSON
VERIFY_PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, 8k"
VERIFY_TIMESTEP = 501.0


def psnr(reference: np.ndarray, test: np.ndarray) -> float:
    """20 log10(max|reference| / RMSE(reference - test)) in dB, capped at 200 (coreml_sd.metrics)."""
    return metrics.psnr(reference, test, cap=PSNR_CAP_DB)


@dataclass(frozen=True)
class ParityResult:
    component: str
    psnr_db: dict[str, float]  # per output
    threshold_db: float
    executor: str

    @property
    def min_psnr_db(self) -> float:
        return min(self.psnr_db.values())

    @property
    def passed(self) -> bool:
        return self.min_psnr_db >= self.threshold_db

    def to_dict(self) -> dict:
        return {"psnr_db": {k: _finite(v) for k, v in self.psnr_db.items()}, "min_psnr_db": _finite(self.min_psnr_db),
                "threshold_db": self.threshold_db, "executor": self.executor, "passed": self.passed}


def _finite(v: float) -> float | None:
    return round(v, 2) if math.isfinite(v) else None


def package_runner(paths: Sequence[Path], compute_units: str = "cpu"):
    """The package(s) at `paths` as one runner: Core ML where its runtime is present (on the chosen
    compute units), else the mil executor in exact mode (Core ML's fp16 rounding)."""
    from coreml_sd.backends.coreml_backend import runtime_unavailable_reason

    if runtime_unavailable_reason() is None:
        from coreml_sd.backends.coreml_backend import load_coreml_runner

        return load_coreml_runner(list(paths), compute_units=compute_units)
    from coreml_sd.backends.mil_backend import load_mil_runner

    return load_mil_runner(list(paths), device="cpu", precision_mode="exact")


class PackageRunner:
    """Runs one package at a time for the parity gate (see `package_runner`), on the CPU."""

    def __init__(self):
        from coreml_sd.backends.coreml_backend import runtime_unavailable_reason

        self.name = "coreml (cpu)" if runtime_unavailable_reason() is None else "mil exact (cpu)"
        self._loaded: dict[Path, object] | None = None

    @contextlib.contextmanager
    def keep_loaded(self, enabled: bool = True):
        """Within the block each package is loaded once (several sizes through one package); outside
        it every run loads and frees its package, so only one is in memory at a time."""
        self._loaded = {} if enabled else None
        try:
            yield
        finally:
            self._loaded = None

    def run(self, package: Path, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        from coreml_sd import arrays

        runner = None if self._loaded is None else self._loaded.get(Path(package))
        if runner is None:
            runner = package_runner([package])
            if self._loaded is not None:
                self._loaded[Path(package)] = runner
        outputs = runner.run({k: np.ascontiguousarray(v) for k, v in inputs.items()})
        return {k: arrays.to_numpy(v).astype(np.float32) for k, v in outputs.items()}


def compare(component: str, outputs: Mapping[str, np.ndarray], references: Mapping[str, np.ndarray], *,
            executor: str, threshold_db: float = MIN_PSNR_DB) -> ParityResult:
    figures = {name: psnr(ref, outputs[name]) for name, ref in references.items()}
    return ParityResult(component, figures, threshold_db, executor)


# -- seeded inputs and upstream references ------------------------------------------------------
def _randn(shape: Sequence[int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(tuple(shape)).astype(np.float32)


def hidden_output_name(hidden_layer: int = -1, final_norm: bool = True) -> str:
    """The text encoder package's hidden-state output, as Apple names it: the last layer's after the
    final norm is `last_hidden_state` (SD 1.x/2.x); another (SDXL's penultimate, raw) `hidden_embeds`."""
    return "last_hidden_state" if hidden_layer == -1 and final_norm else "hidden_embeds"


def text_encoder_case(module, tokenizer, *, extra_words: Sequence[str] = (), hidden_layer: int = -1,
                      final_norm: bool = True):
    """(package inputs, references) for the text encoder: a real prompt's token ids.

    `extra_words` (e.g. textual-inversion trigger words) are appended so their vectors are checked.
    `hidden_layer`/`final_norm`: the hidden state the family feeds the UNet (a TextEncoderSpec's);
    the pooled output is the projected one (`text_embeds`) where the module has a projection.
    """
    import torch

    ids = np.asarray([tokenizer(" ".join([VERIFY_PROMPT, *extra_words]))], dtype=np.int64)
    with torch.inference_mode():
        out = module(torch.from_numpy(ids), output_hidden_states=True)
        hidden = out.hidden_states[hidden_layer]
        if final_norm:
            hidden = getattr(module, "text_model", module).final_layer_norm(hidden)
    pooled = getattr(out, "text_embeds", None)
    refs = {hidden_output_name(hidden_layer, final_norm): hidden.float().numpy(),
            "pooled_outputs": (out.pooler_output if pooled is None else pooled).float().numpy()}
    return {"input_ids": ids.astype(np.float32)}, refs


# Representative extra UNet inputs: a size micro-conditioning (SDXL: 1024 px, no crop; the
# refiner's: aesthetic score 6) and pooled embeddings of unit scale.
TIME_IDS = {6: (1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0), 5: (1024.0, 1024.0, 0.0, 0.0, 6.0)}


@dataclass(frozen=True)
class ExtraIO:
    """An extra UNet input of a package: name, shape, and where diffusers' UNet takes it."""

    name: str
    shape: tuple[int, int]
    diffusers_arg: str = "added_cond_kwargs"


def extra_case(name: str, shape: tuple[int, int], seed: int) -> np.ndarray:
    if name == "time_ids":
        return np.tile(np.asarray(TIME_IDS[shape[1]], np.float32), (shape[0], 1))
    return _randn(shape, seed)


def _extra_kwargs(extra: Sequence[ExtraIO], values: dict[str, np.ndarray]) -> dict:
    """The extra inputs as diffusers' UNet and ControlNet take them."""
    import torch

    kwargs: dict = {}
    for e in extra:
        value = torch.from_numpy(values[e.name])
        if e.diffusers_arg == "added_cond_kwargs":
            kwargs.setdefault("added_cond_kwargs", {})[e.name] = value
        else:
            kwargs[e.diffusers_arg] = value
    return kwargs


RESIDUAL_INPUT = "additional_residual_{}"


def unet_case(module, *, batch: int, latent_shape: tuple[int, int, int], context_dim: int, seq_len: int = 77,
              seed: int = 0, extra: Sequence[ExtraIO] = (), residuals: Sequence[tuple[int, ...]] = ()):
    """(package inputs, references): seeded latents and text embedding, a mid-schedule timestep, and the
    extra inputs, given to diffusers where its UNet takes them; a ControlledUnet's also seeded residuals
    of unit scale (`residuals`: their shapes), as diffusers' down/mid additional residuals."""
    import torch

    sample = _randn((batch, *latent_shape), seed)
    context = _randn((batch, seq_len, context_dim), seed + 1)
    timestep = np.full((batch,), VERIFY_TIMESTEP, dtype=np.float32)
    extras = {e.name: extra_case(e.name, e.shape, seed + 10 + i) for i, e in enumerate(extra)}
    kwargs = _extra_kwargs(extra, extras)
    res = {RESIDUAL_INPUT.format(i): _randn(shape, seed + 100 + i) for i, shape in enumerate(residuals)}
    if res:
        tensors = [torch.from_numpy(r) for r in res.values()]
        kwargs.update(down_block_additional_residuals=tuple(tensors[:-1]), mid_block_additional_residual=tensors[-1])
    with torch.inference_mode():
        out = module(torch.from_numpy(sample), torch.from_numpy(timestep),
                     encoder_hidden_states=torch.from_numpy(context), **kwargs).sample
    inputs = {"sample": sample.astype(np.float16), "timestep": timestep.astype(np.float16),
              "encoder_hidden_states": context.transpose(0, 2, 1)[:, :, None, :].astype(np.float16),
              **{k: v.astype(np.float16) for k, v in extras.items()},
              **{k: v.astype(np.float16) for k, v in res.items()}}
    return inputs, {"noise_pred": out.float().numpy()}


def controlnet_case(module, *, batch: int, latent_shape: tuple[int, int, int], image_shape: tuple[int, int, int],
                    context_dim: int, seq_len: int = 77, seed: int = 0, extra: Sequence[ExtraIO] = ()):
    """(package inputs, references) for a ControlNet: seeded latents, text embedding and a control image in
    [0, 1], a mid-schedule timestep; the references are diffusers' residuals at conditioning scale 1."""
    import torch

    sample = _randn((batch, *latent_shape), seed)
    context = _randn((batch, seq_len, context_dim), seed + 1)
    image = np.random.default_rng(seed + 4).random((batch, *image_shape), dtype=np.float32)
    timestep = np.full((batch,), VERIFY_TIMESTEP, dtype=np.float32)
    extras = {e.name: extra_case(e.name, e.shape, seed + 10 + i) for i, e in enumerate(extra)}
    with torch.inference_mode():
        down, mid = module(torch.from_numpy(sample), torch.from_numpy(timestep),
                           encoder_hidden_states=torch.from_numpy(context), controlnet_cond=torch.from_numpy(image),
                           conditioning_scale=1.0, return_dict=False, **_extra_kwargs(extra, extras))
    refs = {RESIDUAL_INPUT.format(i): r.float().numpy() for i, r in enumerate((*down, mid))}
    inputs = {"sample": sample.astype(np.float16), "timestep": timestep.astype(np.float16),
              "encoder_hidden_states": context.transpose(0, 2, 1)[:, :, None, :].astype(np.float16),
              "controlnet_cond": image.astype(np.float16), **{k: v.astype(np.float16) for k, v in extras.items()}}
    return inputs, refs


def seeded_latents(latent_shape: Sequence[int], seed: int = 0) -> np.ndarray:
    """(1, C, h, w) N(0, 1) latents: the VAE decoder's seeded input (gate, calibration, tests)."""
    return _randn((1, *latent_shape), seed + 2)


def vae_decoder_case(vae, *, latent_shape: tuple[int, int, int], seed: int = 0):
    import torch

    z = seeded_latents(latent_shape, seed)
    with torch.inference_mode():
        image = vae.decode(torch.from_numpy(z)).sample
    return {"z": z}, {"image": image.float().numpy()}


TEST_LATENTS = "test image and noise"


def test_latents(vae, latent_shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """(1, C, h, w) latents that drive a VAE decoder to its large activations: on the left, a test
    image's (saturated colour bars with black and white edges, from the VAE's own encoder: where a
    real decode's big activations live); from the middle on, seeded N(0, 1) latents (bigger than an
    untrained or unusual VAE's encodings, where such a decoder overflows fp16)."""
    import torch

    from conversion.vae_fp16 import test_images

    f = 2 ** (len(vae.config.block_out_channels) - 1)
    bars = torch.from_numpy(test_images(latent_shape[1] * f, latent_shape[2] * f)[:1])
    with torch.inference_mode():
        z = vae.encode(bars).latent_dist.mean.float().numpy()
    half = latent_shape[2] // 2
    z[..., half:] = seeded_latents(latent_shape, seed)[..., half:]
    return z


def vae_decoder_cases(vae, *, latent_shape: tuple[int, int, int], seed: int = 0):
    """[(label, package inputs, references)] for the VAE decoder: one decode of `test_latents`, which
    the gate also compares as 8-bit pixels. One case, not a test image and noise decoded apart: each
    decode of a 512x512 image costs the gate ~11 s of fp32 reference and ~15 s of fp16-exact `mil`
    on 2 cores (issue 18), and the halves fail where they did apart (tests/test_sdxl_vae.py)."""
    import torch

    z = test_latents(vae, latent_shape, seed)
    with torch.inference_mode():
        decoded = vae.decode(torch.from_numpy(z)).sample.float().numpy()
    return [(TEST_LATENTS, {"z": z}, {"image": decoded})]


def to_8bit(image: np.ndarray) -> np.ndarray:
    """[-1, 1] -> 0..255 pixel values (as float), rounded as images are written."""
    return np.round(np.clip(image / 2 + 0.5, 0.0, 1.0) * 255.0).astype(np.float32)


def vae_encoder_case(vae, *, image_shape: tuple[int, int, int], seed: int = 0):
    import torch

    x = np.clip(_randn((1, *image_shape), seed + 3) * 0.5, -1, 1).astype(np.float32)
    with torch.inference_mode():
        moments = vae.encode(torch.from_numpy(x)).latent_dist.parameters
    return {"x": x}, {"latent": moments.float().numpy()}
