"""A converted model folder: Core ML packages, tokenizer files and `manifest.json`.

Layout (resource names of Apple's Swift `StableDiffusion` package, so its apps can load it):

    manifest.json        what was converted, how, from what, and how well it matched (below)
    TextEncoder.mlpackage  Unet.mlpackage (or UnetChunk1/2.mlpackage)  VAEDecoder.mlpackage
    [VAEEncoder.mlpackage] [*.mlmodelc when compiled on macOS]
    vocab.json  merges.txt

`Manifest` is the one reader and writer of `manifest.json`; `ConvertedModel` is the model source
the runtime opens for such a folder. Nothing here imports torch or coremltools.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from coreml_sd.config import SchedulerConfig, read_json
from coreml_sd.errors import BackendUnavailable, ModelError, choices_text
from coreml_sd.sources import ModelInfo, TorchModules
from coreml_sd.tokenizer import EOS, CLIPTokenizer, TokenizerFiles

MANIFEST = "manifest.json"
FORMAT = "coreml-sd.model"
FORMAT_VERSION = 1

# component -> package stem (Apple's Swift resource names).
PACKAGE_NAMES = {
    "text_encoder": "TextEncoder",
    "unet": "Unet",
    "unet_chunk1": "UnetChunk1",
    "unet_chunk2": "UnetChunk2",
    "vae_decoder": "VAEDecoder",
    "vae_encoder": "VAEEncoder",
}
TOKENIZER_FILES = ("vocab.json", "merges.txt")
FAMILIES = ("sd1", "sd2")
DTYPES = ("fp16", "fp32")


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a package: name, fixed shape, element type."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> "TensorSpec":
        _require(d, ("name", "shape", "dtype"), where)
        if d["dtype"] not in DTYPES:
            raise ModelError(f"{where}: dtype {d['dtype']!r} is not one of {choices_text(DTYPES)}")
        return cls(str(d["name"]), tuple(int(s) for s in d["shape"]), str(d["dtype"]))

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class PackageInfo:
    """One converted component: its package, tensors, weight format, size and measured parity."""

    package: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    weights: str
    size_bytes: int
    psnr_db: float | None = None  # parity gate, package vs the torch reference
    compiled: str | None = None  # "<Name>.mlmodelc" when compiled at conversion (macOS)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> "PackageInfo":
        _require(d, ("package", "inputs", "outputs", "weights", "size_bytes"), where)
        return cls(
            package=str(d["package"]),
            inputs=tuple(TensorSpec.from_dict(t, f"{where} input") for t in d["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t, f"{where} output") for t in d["outputs"]),
            weights=str(d["weights"]),
            size_bytes=int(d["size_bytes"]),
            psnr_db=None if d.get("psnr_db") is None else float(d["psnr_db"]),
            compiled=d.get("compiled"),
        )

    def to_dict(self) -> dict:
        return {"package": self.package, "inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs], "weights": self.weights,
                "size_bytes": self.size_bytes, "psnr_db": self.psnr_db, "compiled": self.compiled}


@dataclass(frozen=True)
class Manifest:
    """Everything `manifest.json` records (format version 1)."""

    name: str
    family: str
    scheduler: SchedulerConfig
    width: int
    height: int
    batch: int  # UNet batch: 2 = guidance pair (unconditional first), 1 = no guidance
    latent_channels: int
    vae_scale_factor: int
    scaling_factor: float
    text_hidden_size: int
    attention: str
    weights: str
    min_target: str
    components: dict[str, PackageInfo]
    precision: str = "fp16"  # compute/storage precision of the programs ("fp32": checking, GPU-only)
    pad_token: str = EOS
    max_length: int = 77
    trigger_words: dict[str, list[int]] = field(default_factory=dict)  # textual-inversion words baked in
    source: dict[str, Any] = field(default_factory=dict)  # path, kind, sha256, hash, modifiers, extras
    tools: dict[str, str] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)  # threshold, executor, per-component figures
    created: str = ""

    @property
    def prediction_type(self) -> str:
        return self.scheduler.prediction_type

    @property
    def chunked(self) -> bool:
        return "unet_chunk1" in self.components

    def to_dict(self) -> dict:
        out = {"format": FORMAT, "format_version": FORMAT_VERSION}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "scheduler":
                value = value.to_dict()
            elif f.name == "components":
                value = {k: v.to_dict() for k, v in value.items()}
            out[f.name] = value
        out["prediction_type"] = self.prediction_type
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = MANIFEST) -> "Manifest":
        if d.get("format") != FORMAT:
            raise ModelError(f"{where}: not a coreml-sd model manifest (format {d.get('format')!r}, expected {FORMAT!r})")
        if d.get("format_version") != FORMAT_VERSION:
            raise ModelError(f"{where}: manifest format version {d.get('format_version')!r} is not supported "
                             f"(this version reads {FORMAT_VERSION}); convert the model again")
        names = {f.name for f in fields(cls)}
        _require(d, [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING], where)
        unknown = sorted(set(d) - names - {"format", "format_version", "prediction_type"})
        if unknown:
            raise ModelError(f"{where}: unknown key(s) {', '.join(unknown)}")
        kwargs = {k: d[k] for k in names if k in d}
        kwargs["scheduler"] = SchedulerConfig.from_dict(d["scheduler"])
        kwargs["components"] = {k: PackageInfo.from_dict(v, f"{where} component {k}")
                                for k, v in d["components"].items()}
        manifest = cls(**kwargs)
        manifest.validate(where)
        if d.get("prediction_type", manifest.prediction_type) != manifest.prediction_type:
            raise ModelError(f"{where}: prediction_type {d['prediction_type']!r} disagrees with the scheduler's "
                             f"{manifest.prediction_type!r}")
        return manifest

    def validate(self, where: str = MANIFEST) -> None:
        if self.family not in FAMILIES:
            raise ModelError(f"{where}: family {self.family!r} is not one of {choices_text(FAMILIES)}")
        if self.batch not in (1, 2):
            raise ModelError(f"{where}: batch must be 1 or 2; found {self.batch}")
        unknown = sorted(set(self.components) - set(PACKAGE_NAMES))
        if unknown:
            raise ModelError(f"{where}: unknown component(s) {', '.join(unknown)}; "
                             f"valid: {choices_text(PACKAGE_NAMES)}")
        if ("unet_chunk1" in self.components) != ("unet_chunk2" in self.components):
            raise ModelError(f"{where}: a chunked UNet needs both unet_chunk1 and unet_chunk2")

    def missing_for_generation(self) -> list[str]:
        """Components a text-to-image pipeline needs that this folder lacks (a partial conversion)."""
        has_unet = "unet" in self.components or "unet_chunk1" in self.components
        return [name for name, ok in (("text_encoder", "text_encoder" in self.components), ("unet", has_unet),
                                      ("vae_decoder", "vae_decoder" in self.components)) if not ok]

    @classmethod
    def read(cls, folder: Path) -> "Manifest":
        return cls.from_dict(read_json(Path(folder) / MANIFEST), str(Path(folder) / MANIFEST))

    def write(self, folder: Path) -> Path:
        path = Path(folder) / MANIFEST
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path


def _require(d: Mapping[str, Any], keys, where: str) -> None:
    if not isinstance(d, Mapping):
        raise ModelError(f"{where}: expected a JSON object, found {type(d).__name__}")
    missing = [k for k in keys if k not in d]
    if missing:
        raise ModelError(f"{where}: missing key(s) {', '.join(missing)}")


def is_model_folder(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / MANIFEST).is_file()


class ConvertedModel:
    """A converted model folder as a model source (Core ML packages; torch only via its source)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.manifest = Manifest.read(self.path)
        missing = [f for f in TOKENIZER_FILES if not (self.path / f).is_file()]
        missing += [p.package for p in self.manifest.components.values() if not (self.path / p.package).is_dir()]
        missing += [f"a {c} package (converted with --components)" for c in self.manifest.missing_for_generation()]
        if missing:
            raise ModelError(f"{self.path}: incomplete converted model, missing {', '.join(missing)}")
        m = self.manifest
        self.info = ModelInfo(
            name=m.name, kind="coreml", path=self.path, scheduler=m.scheduler,
            sample_size=m.width, vae_scale_factor=m.vae_scale_factor, latent_channels=m.latent_channels,
            scaling_factor=m.scaling_factor, text_hidden_size=m.text_hidden_size, family=m.family,
            tokenizer_files=TokenizerFiles(self.path / "vocab.json", self.path / "merges.txt"),
            pad_token=m.pad_token, hash=m.source.get("hash"),
        )
        self.generation_extras = dict(m.source.get("generation_extras") or {})

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels: the packages take exactly this size."""
        return self.manifest.width, self.manifest.height

    @property
    def batch(self) -> int:
        return self.manifest.batch

    def package_path(self, component: str) -> Path:
        """Path of `component`'s package (`unet` of a chunked model: use unet_chunk1/2)."""
        info = self.manifest.components.get(component)
        if info is None:
            raise BackendUnavailable(f"{self.path.name} has no {component} package; it has "
                                     f"{choices_text(self.manifest.components)}")
        return self.path / info.package

    def tokenizer(self) -> CLIPTokenizer:
        tok = CLIPTokenizer(self.info.tokenizer_files, pad_token=self.info.pad_token,
                            max_length=self.manifest.max_length)
        for word, ids in self.manifest.trigger_words.items():
            tok.add_trigger(word, ids)
        return tok

    def torch_modules(self, *, device: str, dtype: Any) -> TorchModules:
        """The source model's torch modules, where the manifest's source (and modifiers) still exist."""
        from coreml_sd.sources import open_model

        src = self.manifest.source
        path = src.get("path")
        if not path or not Path(path).exists():
            raise BackendUnavailable(f"{self.path.name}: torch weights need the source model, and "
                                     f"{path or 'no source path'} is not there")
        return open_model(path, **(src.get("modifiers") or {})).torch_modules(device=device, dtype=dtype)
