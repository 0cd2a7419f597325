"""The model-source contract: what a model is, told before (and without) loading its weights.

Every kind of model — a diffusers folder, a single-file checkpoint, one with a VAE/LoRA/embedding
applied, a converted Core ML folder, the built-in model — is a `ModelSource`. It knows its facts
(`ModelInfo`), its tokenizers, the trigger words of embeddings baked in, the A1111 parameter
strings it adds to images, and what it can give the backends: torch modules (`torch_modules`,
where `torch_unavailable()` is None) and/or Core ML packages (`packages`, a `PackageSet`, or None).
`coreml_sd.sources.open_model` recognises a path and returns one; this module is a leaf that the
concrete sources import, so nothing here imports them (or torch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol, runtime_checkable

from coreml_sd.components import kind
from coreml_sd.config import SchedulerConfig
from coreml_sd.errors import BackendUnavailable
from coreml_sd.families import Family, get_family
from coreml_sd.tokenizer import EOS, CLIPTokenizer, TokenizerFiles, bundled_files


@dataclass(frozen=True)
class ModelInfo:
    """Facts about a model that the pipeline needs before (and without) loading weights."""

    name: str
    kind: str  # "diffusers" | "checkpoint" | "coreml" | "builtin"
    path: Path
    scheduler: SchedulerConfig
    family: str = "sd1"  # a coreml_sd.families name
    sample_size: int = 512  # default width and height, pixels
    vae_scale_factor: int = 8
    latent_channels: int = 4
    scaling_factor: float = 0.18215
    text_hidden_size: int = 768  # the UNet's context width (the text encoders' hidden states side by side)
    tokenizer_files: TokenizerFiles = field(default_factory=bundled_files)
    pad_token: str = EOS  # the first text encoder's; others pad as their family spec says
    hash: str | None = None  # AUTOMATIC1111-style short hash (sha256[:10]) of a single file
    sizes: tuple[tuple[int, int], ...] | None = None  # (width, height) a converted model takes; None: any
    unet_block_widths: tuple[int, ...] | None = None  # the UNet's block_out_channels, where known (ControlNet fit)
    max_prompt_tokens: int | None = None  # the UNet's longest text context (77 per chunk); None: any
    clip_skip: int = 1  # A1111's clip skip the (converted) text encoders give when asked for none

    @property
    def prediction_type(self) -> str:
        return self.scheduler.prediction_type

    @property
    def spec(self) -> Family:
        return get_family(self.family)


@dataclass
class TorchModules:
    """diffusers/transformers modules for the torch backend (and the converter), on device and dtype."""

    # Modules by component name; a family without a first text encoder (the SDXL refiner has
    # only text_encoder_2) leaves it None.
    text_encoder: Any = None  # transformers.CLIPTextModel (or CLIPTextModelWithProjection)
    unet: Any = None  # diffusers.UNet2DConditionModel
    vae: Any = None  # diffusers.AutoencoderKL (None while a replacement VAE is pending)
    text_encoder_2: Any = None  # the second text encoder of two-encoder families (SDXL's OpenCLIP bigG)

    def module(self, component: str):
        """The module behind a component name (both VAE components share the autoencoder; the
        ControlledUnet is the UNet itself: diffusers' UNet takes ControlNet residuals as arguments)."""
        if component in ("vae_decoder", "vae_encoder"):
            return self.vae
        return getattr(self, kind(component).torch_module or component)

    def text_encoders(self) -> dict[str, Any]:
        """The text encoder modules present, by component name."""
        return {name: m for name in ("text_encoder", "text_encoder_2") if (m := getattr(self, name)) is not None}


@dataclass(frozen=True)
class Origin:
    """Where a model came from and what was applied to it, enough to open it again."""

    path: Path
    kind: str
    hash: str | None = None
    modifiers: Mapping[str, Any] = field(default_factory=dict)  # open_model keyword arguments


class PackageSet(Protocol):
    """A converted model's Core ML packages (see coreml_sd.model_folder.ConvertedModel)."""

    path: Path
    batch: int
    manifest: Any  # coreml_sd.model_folder.Manifest: what the folder records (or what was inferred of it)

    def has(self, component: str) -> bool: ...

    def package_paths(self, component: str) -> list[Path]: ...

    def checked_package_paths(self, component: str) -> list[Path]: ...

    def compiled_paths(self, component: str) -> list[Path | None]: ...


@runtime_checkable
class ModelSource(Protocol):
    info: ModelInfo
    generation_extras: Mapping[str, str]  # AUTOMATIC1111 parameter strings ("VAE", "Lora hashes" ...)
    packages: PackageSet | None  # Core ML packages, for the coreml and mil backends
    origin: Origin

    def tokenizer(self, component: str = "text_encoder") -> CLIPTokenizer: ...

    def trigger_ids(self) -> dict[str, list[int]]: ...

    def torch_unavailable(self) -> str | None: ...

    def torch_modules(self, *, device: str, dtype: Any) -> TorchModules: ...


class SourceBase:
    """Defaults for the optional capabilities: no packages, no triggers, no extras, torch weights."""

    info: ModelInfo
    packages: PackageSet | None = None
    generation_extras: Mapping[str, str] = {}

    @property
    def origin(self) -> Origin:
        return Origin(self.info.path, self.info.kind, self.info.hash)

    def tokenizer(self, component: str = "text_encoder") -> CLIPTokenizer:
        return CLIPTokenizer(self.info.tokenizer_files, pad_token=pad_token(self.info, component))

    def trigger_ids(self) -> dict[str, list[int]]:
        return {}

    def torch_unavailable(self) -> str | None:
        return None

    def torch_modules(self, *, device: str, dtype: Any) -> TorchModules:
        raise BackendUnavailable(f"{self.info.name}: no torch weights are available for this model")


def first_text_encoder(info: ModelInfo) -> str:
    """The component name of the family's first text encoder (text_encoder; the refiner's text_encoder_2)."""
    return info.spec.text_encoders[0].component


def pad_token(info: ModelInfo, component: str) -> str:
    """The pad token of `component`'s tokenizer: the model's own for its first text encoder (a
    config or folder may say), the family's for the others (SDXL's second pads with "!")."""
    return info.pad_token if component == first_text_encoder(info) else info.spec.text_encoder(component).pad_token


def require_torch(source: ModelSource) -> None:
    reason = source.torch_unavailable()
    if reason is not None:
        raise BackendUnavailable(reason)
