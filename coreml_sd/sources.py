"""Model sources: where a model comes from, and what it tells the pipeline before anything loads.

`open_model(path)` recognises the kind of model at `path` and returns a source. A source knows the
model's facts (`ModelInfo`: noise schedule, sizes, tokenizer) without loading weights, and how to
build what a backend needs: diffusers modules for the torch backend (`torch_modules`), Core ML
packages for the coreml/mil backends. New kinds (single-file checkpoints, converted Core ML
folders, the built-in model) plug in here, without the samplers or the pipeline changing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from coreml_sd.config import SchedulerConfig, read_json
from coreml_sd.errors import BackendUnavailable, ModelError
from coreml_sd.paths import describe_input
from coreml_sd.tokenizer import EOS, CLIPTokenizer, TokenizerFiles, bundled_files


@dataclass(frozen=True)
class ModelInfo:
    """Facts about a model that the pipeline needs before (and without) loading weights."""

    name: str
    kind: str  # "diffusers" | "checkpoint" | "coreml" | "builtin"
    path: Path
    scheduler: SchedulerConfig
    sample_size: int = 512  # default width and height, pixels
    vae_scale_factor: int = 8
    latent_channels: int = 4
    scaling_factor: float = 0.18215
    text_hidden_size: int = 768
    family: str = "sd1"
    tokenizer_files: TokenizerFiles = field(default_factory=bundled_files)
    pad_token: str = EOS
    hash: str | None = None  # AUTOMATIC1111-style short hash (sha256[:10]) of a single file

    @property
    def prediction_type(self) -> str:
        return self.scheduler.prediction_type


@dataclass
class TorchModules:
    """diffusers/transformers modules for the torch backend, already on device and dtype."""

    text_encoder: Any  # transformers.CLIPTextModel
    unet: Any  # diffusers.UNet2DConditionModel
    vae: Any  # diffusers.AutoencoderKL


class ModelSource(Protocol):
    info: ModelInfo

    def tokenizer(self) -> CLIPTokenizer: ...

    def torch_modules(self, *, device: str, dtype: Any) -> TorchModules: ...


class DiffusersFolder:
    """A diffusers-format folder (`model_index.json`, `unet/`, `vae/`, `text_encoder/`, ...)."""

    REQUIRED = ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                "scheduler/scheduler_config.json")

    def __init__(self, path: Path):
        self.path = Path(path)
        missing = [p for p in self.REQUIRED if not (self.path / p).is_file()]
        if missing:
            raise ModelError(f"{self.path} is not a complete diffusers model folder: missing {', '.join(missing)}")
        self.info = self._read_info()

    def _read_info(self) -> ModelInfo:
        unet = read_json(self.path / "unet" / "config.json")
        vae = read_json(self.path / "vae" / "config.json")
        text = read_json(self.path / "text_encoder" / "config.json")
        tok_dir = self.path / "tokenizer"
        files = bundled_files()
        pad = EOS
        if (tok_dir / "vocab.json").is_file() and (tok_dir / "merges.txt").is_file():
            files = TokenizerFiles(tok_dir / "vocab.json", tok_dir / "merges.txt")
        if (tok_dir / "tokenizer_config.json").is_file():
            pad = _token_text(read_json(tok_dir / "tokenizer_config.json").get("pad_token"), EOS)
        vae_factor = 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1)
        return ModelInfo(
            name=self.path.name,
            kind="diffusers",
            path=self.path,
            scheduler=SchedulerConfig.from_json(self.path / "scheduler" / "scheduler_config.json"),
            sample_size=int(unet.get("sample_size", 64)) * vae_factor,
            vae_scale_factor=vae_factor,
            latent_channels=int(unet.get("in_channels", 4)),
            scaling_factor=float(vae.get("scaling_factor", 0.18215)),
            text_hidden_size=int(text.get("hidden_size", 768)),
            family="sd2" if int(text.get("hidden_size", 768)) == 1024 else "sd1",
            tokenizer_files=files,
            pad_token=pad,
        )

    def tokenizer(self) -> CLIPTokenizer:
        return CLIPTokenizer(self.info.tokenizer_files, pad_token=self.info.pad_token)

    def torch_modules(self, *, device: str, dtype: Any) -> TorchModules:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        from coreml_sd.checkpoint.safeload import check_folder_weights

        check_folder_weights(self.path)  # a hostile .bin is refused with our message, before transformers sees it

        kw = dict(torch_dtype=dtype, local_files_only=True)
        try:
            text_encoder = CLIPTextModel.from_pretrained(self.path / "text_encoder", **kw)
            unet = UNet2DConditionModel.from_pretrained(self.path / "unet", **kw)
            vae = AutoencoderKL.from_pretrained(self.path / "vae", **kw)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelError(f"could not load the diffusers model in {self.path}: {exc}") from exc
        mods = TorchModules(text_encoder, unet, vae)
        for m in (mods.text_encoder, mods.unet, mods.vae):
            m.to(device).eval().requires_grad_(False)
        return mods


def _token_text(token, default: str) -> str:
    if isinstance(token, dict):  # {"content": "!", ...} in some tokenizer configs
        token = token.get("content")
    return token if isinstance(token, str) else default


BUILTIN = "builtin"
BUILTIN_NAMES = (BUILTIN, "digits")  # `models` lists it as builtin; the model itself is called digits


def builtin_checkpoint() -> Path:
    """The built-in model: a tiny SD-architecture model of handwritten digits (training/train_digits.py),
    one original-layout checkpoint with its config beside it (`<stem>.coreml-sd.json`)."""
    from importlib import resources

    return Path(str(resources.files("coreml_sd") / "data" / "builtin" / "digits.safetensors"))


def open_model(path: str | Path | None = None, *, vae: str | Path | None = None, loras=(), embeddings=(),
               hypernetworks=(), prediction_type: str | None = None, config=None, ema: bool = False) -> ModelSource:
    """Recognise the model at `path` and return its source; a one-line error otherwise.

    `path`: a diffusers folder or a single-file checkpoint (.safetensors/.ckpt/.pt). The modifiers
    work on both: `vae` a replacement VAE file, `loras` paths or (path, strength) pairs, `embeddings`
    textual-inversion files, `hypernetworks` (path, strength) pairs, `prediction_type` to override
    the model's. `config` (single files only): the architecture of a non-standard file, see
    `coreml_sd.checkpoint.config`; `ema`: use a checkpoint's EMA weights. None, "builtin" or "digits": the
    built-in model, which loads through the same single-file path as a community checkpoint.
    """
    if path is None or (str(path) in BUILTIN_NAMES and not Path(path).exists()):  # a local folder "digits" wins
        path = builtin_checkpoint()
    from coreml_sd.checkpoint.source import CHECKPOINT_SUFFIXES, SingleFileCheckpoint, with_modifiers

    p = Path(path).expanduser()
    problem = describe_input(p)  # a missing path, a symlink loop, a FIFO, ... each said as what it is
    if problem:
        raise ModelError(f"model not found: {problem} (expected a converted Core ML model folder, a diffusers model "
                         f"folder or a .safetensors/.ckpt file; without --model the built-in model is used)")
    if p.is_dir() and (p / "manifest.json").is_file():
        return _converted_folder(p, vae=vae, loras=loras, embeddings=embeddings, hypernetworks=hypernetworks,
                                 prediction_type=prediction_type)
    if p.is_dir() and (p / "model_index.json").is_file():
        source = DiffusersFolder(p)
    elif p.is_file() and p.suffix.lower() in CHECKPOINT_SUFFIXES:
        source = SingleFileCheckpoint(p, config=config, prediction_type=prediction_type, ema=ema)
    else:
        found = "a folder without model_index.json" if p.is_dir() else f"a file ({p.suffix or 'no extension'})"
        raise ModelError(f"{p} is not a model: expected a diffusers model folder (with model_index.json), a "
                         f"converted model folder (with manifest.json) or a {'/'.join(CHECKPOINT_SUFFIXES)} "
                         f"checkpoint, found {found}")
    return with_modifiers(source, vae=vae, loras=loras, embeddings=embeddings, hypernetworks=hypernetworks,
                          prediction_type=prediction_type)


def _converted_folder(path: Path, **modifiers) -> ModelSource:
    """A folder written by `coreml-sd convert` (its VAE, LoRAs and embeddings are already baked in)."""
    from coreml_sd.model_folder import ConvertedModel

    given = [k for k, v in modifiers.items() if v]
    if given:
        raise ModelError(f"{path} is a converted model: {', '.join(given)} cannot be applied to it; pass them to "
                         f"`coreml-sd convert` instead")
    return ConvertedModel(path)


def require_torch_modules(source: ModelSource) -> None:
    if not hasattr(source, "torch_modules"):
        raise BackendUnavailable(f"{source.info.name}: no torch weights are available for this model")
