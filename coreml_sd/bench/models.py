"""The model a benchmark runs: SD 1.5's architecture with random weights, or a user's model.

Latency and memory do not depend on weight values, so the default model is built from SD 1.5's
shipped config with seeded random weights and written once, as an fp16 diffusers folder (what
diffusers' own pipeline loads, so the baseline is diffusers end to end), under the cache
directory. Backends that run Core ML packages (`mil`, `coreml-*`) need the model converted: that
happens once per model and conversion options, by `coreml-sd convert` in its own process (it takes
minutes and GBs for the full UNet, and its memory must not count against the benchmark), and the
folder is kept in the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from coreml_sd.errors import CoreMLSDError, ModelError, choices_text
from coreml_sd.sources import BUILTIN_NAMES

DEFAULT_MODEL = "sd15-random"
# name -> shipped checkpoint config (coreml_sd/data/configs) whose architecture gets random weights.
RANDOM_MODELS = {"sd15-random": "sd1", "sdxl-random": "sdxl"}
BUILTIN = "builtin"
# Bump when the random model's contents change, so stale cached folders are not reused.
RANDOM_MODEL_VERSION = 2  # 2: modules initialised in fp16 directly (SDXL), not fp32 then halved


def default_cache_dir() -> Path:
    """The cache root (see `coreml_sd.cachedir`) + /bench."""
    from coreml_sd.cachedir import cache_root

    return cache_root() / "bench"


@dataclass(frozen=True)
class BenchModel:
    """What `--model` named, resolved: a path the pipeline opens (None: the built-in model)."""

    name: str
    path: Path | None
    description: str
    random_weights: bool = False

    def to_dict(self) -> dict:
        return {"name": self.name, "path": None if self.path is None else str(self.path),
                "description": self.description, "random_weights": self.random_weights}


def resolve_model(model: str | None, cache_dir: Path, *,
                  make_random: Callable[[Path, str, int], None] | None = None, seed: int = 0) -> BenchModel:
    """`model`: None or a random model's name, `builtin`, or a path (diffusers folder, checkpoint,
    converted folder). A random model is written on first use by `make_random(folder, config_name,
    seed)` (default: `write_random_model` in this process)."""
    model = model or DEFAULT_MODEL
    if model in RANDOM_MODELS:
        config = RANDOM_MODELS[model]
        folder = Path(cache_dir) / f"{model}-v{RANDOM_MODEL_VERSION}-seed{seed}"
        if not (folder / "model_index.json").is_file():
            (make_random or (lambda f, c, s: write_random_model(f, c, seed=s)))(folder, config, seed)
        return BenchModel(model, folder, f"{config} architecture ({model}), random weights (seed {seed}), "
                                         f"fp16 diffusers folder", random_weights=True)
    if model in BUILTIN_NAMES:
        return BenchModel(BUILTIN, None, "the built-in model")
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelError(f"model not found: {path}; expected a diffusers folder, a .safetensors/.ckpt file, a "
                         f"converted model folder, {BUILTIN!r} or one of {choices_text(RANDOM_MODELS)}")
    return BenchModel(path.name, path.resolve(), f"user model {path.name}")


def random_modules(cfg, seed: int = 0) -> dict:
    """Modules of `cfg`'s architecture (a CheckpointConfig) with diffusers' / transformers' own seeded
    random initialisation, stored in fp16, by component name. Each is built in fp16 directly: an SDXL
    UNet initialised in fp32 first would need 10 GB."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        mods = {"unet": UNet2DConditionModel(**cfg.unet), "vae": AutoencoderKL(**cfg.vae)}
        for spec in cfg.spec.text_encoders:
            cls = CLIPTextModelWithProjection if spec.pooled else CLIPTextModel
            mods[spec.component] = cls(CLIPTextConfig(**cfg.text_config(spec.component)))
    finally:
        torch.set_default_dtype(default)
    return {k: m.half().eval() for k, m in mods.items()}


def write_random_model(folder: Path, config_name: str = "sd1", *, seed: int = 0, config=None) -> Path:
    """Write a diffusers folder with `config`'s architecture (default: the shipped `config_name`)
    and seeded random weights stored in fp16. Written beside `folder` and renamed when complete."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    from coreml_sd.bench.engines import scheduler_config
    from coreml_sd.checkpoint.config import shipped_config
    from coreml_sd.tokenizer import bundled_files

    cfg = config or shipped_config(config_name)
    mods = random_modules(cfg, seed)
    files = bundled_files()
    scheduler = PNDMScheduler.from_config(scheduler_config(cfg.scheduler))

    def tokenizer(spec):
        return CLIPTokenizer(str(files.vocab), str(files.merges), model_max_length=77, pad_token=spec.pad_token)

    specs = {s.component: s for s in cfg.spec.text_encoders}
    if len(specs) > 1:  # SDXL: the pipeline diffusers saves two text encoders with
        pipe = StableDiffusionXLPipeline(vae=mods["vae"], text_encoder=mods["text_encoder"],
                                         text_encoder_2=mods["text_encoder_2"], unet=mods["unet"],
                                         tokenizer=tokenizer(specs["text_encoder"]),
                                         tokenizer_2=tokenizer(specs["text_encoder_2"]), scheduler=scheduler)
    else:
        spec = next(iter(specs.values()))
        pipe = StableDiffusionPipeline(
            vae=mods["vae"], text_encoder=mods[spec.component], unet=mods["unet"],
            tokenizer=CLIPTokenizer(str(files.vocab), str(files.merges), model_max_length=77, pad_token=cfg.pad_token),
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    from coreml_sd.outputs import replacing

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with replacing(folder) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for src in (files.vocab, files.merges):  # plain tokenizer files, as community folders have them
            for sub in ("tokenizer", "tokenizer_2"):
                if (tmp / sub).is_dir():
                    shutil.copy(src, tmp / sub / src.name)
    return folder


# -- conversion cache ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ConvertOptions:
    """The `coreml-sd convert` options a benchmark's packages depend on."""

    attention: str = "split_einsum_v2"
    weights: str = "fp16"
    width: int | None = None
    height: int | None = None
    img2img: bool = False  # with the VAE encoder (convert --img2img)

    def args(self) -> list[str]:
        out = ["--attention", self.attention, "--weights", self.weights] + (["--img2img"] if self.img2img else [])
        if self.width:
            out += ["--width", str(self.width)]
        if self.height:
            out += ["--height", str(self.height)]
        return out

    def tag(self) -> str:
        size = f"{self.width or 'native'}x{self.height or 'native'}"
        return f"{self.attention}-{self.weights}-{size}" + ("-img2img" if self.img2img else "")


def is_converted(path: Path | None) -> bool:
    from coreml_sd.model_folder import is_converted_folder

    return is_converted_folder(path)


def _source_identity(path: Path | None) -> str:
    """Changes when the source does: its path, and each file's size and modification time."""
    if path is None:
        from coreml_sd import __version__

        return f"builtin {__version__}"
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    parts = [str(path)] + [f"{p.relative_to(path) if p != path else p.name}:{p.stat().st_size}:"
                           f"{p.stat().st_mtime_ns}" for p in files]
    return "\n".join(parts)


@dataclass(frozen=True)
class Converted:
    path: Path
    cached: bool
    seconds: float
    options: ConvertOptions

    def to_dict(self) -> dict:
        return {"path": str(self.path), "cached": self.cached, "seconds": round(self.seconds, 2),
                "attention": self.options.attention, "weights": self.options.weights}


class ConversionFailed(CoreMLSDError):
    """`coreml-sd convert` did not produce the model folder a backend needs."""


def converted_folder(model: BenchModel, options: ConvertOptions, cache_dir: Path,
                     progress: Callable[[str], None] = lambda s: None, *, threads: int | None = None) -> Converted:
    """A converted model folder for `model`: the model itself when it already is one, else the
    cached conversion for these options, converting first if there is none (`threads`: torch
    threads of the converting process)."""
    if is_converted(model.path):
        return Converted(model.path, True, 0.0, options)
    key = hashlib.sha256((_source_identity(model.path) + "\n" + json.dumps(options.__dict__)).encode()).hexdigest()
    out = Path(cache_dir) / "converted" / f"{model.name}-{options.tag()}-{key[:10]}"
    if is_converted(out):
        return Converted(out, True, 0.0, options)
    cmd = [sys.executable, "-m", "coreml_sd", "convert", *([str(model.path)] if model.path else []),
           "-o", str(out), "--force", *options.args()]
    progress(f"converting {model.name} ({options.tag()}) -> {out}")
    start = time.perf_counter()
    tail: deque[str] = deque(maxlen=8)
    # Its own process: the conversion's memory is returned before anything is measured.
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    with subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env) as proc:
        for line in proc.stderr:
            tail.append(line.rstrip())
            progress("  convert: " + line.rstrip())
    if proc.returncode != 0 or not is_converted(out):
        raise ConversionFailed(f"`coreml-sd convert` of {model.name} failed (exit {proc.returncode}): "
                               + " | ".join(t for t in tail if t))
    return Converted(out, False, time.perf_counter() - start, options)
