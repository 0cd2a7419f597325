"""A converted model folder: Core ML packages, tokenizer files and `manifest.json`.

Layout (resource names of Apple's Swift `StableDiffusion` package, so its apps can load it):

    manifest.json        what was converted, how, from what, and how well it matched (below)
    TextEncoder.mlpackage  Unet.mlpackage (or UnetChunk1/2.mlpackage)  VAEDecoder.mlpackage
    [VAEEncoder.mlpackage] [*.mlmodelc when compiled on macOS]
    [ControlledUnet.mlpackage (or ControlledUnetChunk1/2)  controlnet/<Name>.mlpackage ...]
    vocab.json  merges.txt

ControlNets are listed apart from the components (`Manifest.controlnets`, by package name), each
with the file it was converted from, so one folder can hold several and gain more later
(`coreml-sd convert-controlnet`).

`Manifest` is the one reader and writer of `manifest.json`; `ConvertedModel` is the model source
the runtime opens for such a folder. Nothing here imports torch or coremltools.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from coreml_sd.components import CHUNKS_OF, PACKAGE_NAMES, TensorSpec, entry_component
from coreml_sd.config import SchedulerConfig, read_json
from coreml_sd.errors import BackendUnavailable, ModelError, choices_text
from coreml_sd.families import family_names, get_family
from coreml_sd.model_source import ModelInfo, Origin, SourceBase, TorchModules, pad_token
from coreml_sd.tokenizer import EOS, CLIPTokenizer, TokenizerFiles

MANIFEST = "manifest.json"
FORMAT = "coreml-sd.model"
FORMAT_VERSION = 1

TOKENIZER_FILES = ("vocab.json", "merges.txt")
DTYPES = ("fp16", "fp32")


@dataclass(frozen=True)
class PackageInfo:
    """One converted component: its package, tensors, weight format, size and measured parity."""

    package: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    weights: str
    size_bytes: int
    psnr_db: float | None = None  # parity gate, package vs the torch reference
    compiled: str | None = None  # "<Name>.mlmodelc" (or "Resources/<Name>.mlmodelc") when compiled (macOS)
    sha256: str | None = None  # package_hash of the package as written (absent in older manifests)
    aliases: tuple[str, ...] = ()  # the same package under other names (--layout both: Swift names)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> "PackageInfo":
        _require(d, ("package", "inputs", "outputs", "weights", "size_bytes"), where)
        return cls(
            package=str(d["package"]),
            inputs=tuple(TensorSpec.from_dict(t, f"{where} input", DTYPES) for t in d["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t, f"{where} output", DTYPES) for t in d["outputs"]),
            weights=str(d["weights"]),
            size_bytes=int(d["size_bytes"]),
            psnr_db=None if d.get("psnr_db") is None else float(d["psnr_db"]),
            compiled=d.get("compiled"),
            sha256=d.get("sha256"),
            aliases=tuple(str(a) for a in d.get("aliases") or ()),
        )

    def to_dict(self) -> dict:
        out = {"package": self.package, "inputs": [t.to_dict() for t in self.inputs],
               "outputs": [t.to_dict() for t in self.outputs], "weights": self.weights,
               "size_bytes": self.size_bytes, "psnr_db": self.psnr_db, "compiled": self.compiled,
               "sha256": self.sha256}
        if self.aliases:
            out["aliases"] = list(self.aliases)
        return out


@dataclass(frozen=True)
class ControlNetPackage:
    """A converted ControlNet: its package (`controlnet/<Name>.mlpackage`), the file it came from
    (path, kind, sha256, A1111's short hash) and its diffusers ControlNetModel config."""

    info: PackageInfo
    source: Mapping[str, Any]
    config: Mapping[str, Any]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> "ControlNetPackage":
        _require(d, ("source", "config"), where)
        info = PackageInfo.from_dict({k: v for k, v in d.items() if k not in ("source", "config")}, where)
        return cls(info, dict(d["source"]), dict(d["config"]))

    def to_dict(self) -> dict:
        return {**self.info.to_dict(), "source": dict(self.source), "config": dict(self.config)}


MAX_PROMPT_CHUNKS = 12  # 900 prompt tokens; also the largest clip skip a manifest may record


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
    # A refiner UNet converted into this folder (UnetRefiner, Apple's SDXL layout; it shares the
    # folder's TextEncoder2): its family, name, hash, scheduler, text width and source record.
    refiner: dict[str, Any] = field(default_factory=dict)
    controlnets: dict[str, ControlNetPackage] = field(default_factory=dict)  # by package name (Apple's)
    # Every (width, height) the UNet and VAE take (enumerated shapes), the default first; empty in
    # folders written before multi-size conversion: width x height only.
    sizes: list = field(default_factory=list)
    layout: str = "swift"  # package names: coreml_sd.apple_layouts.LAYOUTS
    # The UNet takes a text context of max_length * k tokens for k = 1 .. prompt_chunks (A1111's
    # 75-token chunks, each with its own start and end token); 1 in folders written before.
    prompt_chunks: int = 1
    # A1111's "Clip skip" the text encoder packages give (their hidden state clip_skip - 1 layers
    # before the family's); 1 in folders written before.
    clip_skip: int = 1

    @property
    def all_sizes(self) -> tuple[tuple[int, int], ...]:
        return tuple((int(w), int(h)) for w, h in self.sizes) or ((self.width, self.height),)

    @property
    def prediction_type(self) -> str:
        return self.scheduler.prediction_type

    @property
    def chunked(self) -> bool:
        return self.is_chunked("unet")

    def is_chunked(self, component: str) -> bool:
        return bool(CHUNKS_OF.get(component)) and set(CHUNKS_OF[component]) <= set(self.components)

    def to_dict(self) -> dict:
        out = {"format": FORMAT, "format_version": FORMAT_VERSION}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "scheduler":
                value = value.to_dict()
            elif f.name in ("components", "controlnets"):
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
        kwargs["controlnets"] = {k: ControlNetPackage.from_dict(v, f"{where} controlnet {k}")
                                 for k, v in (d.get("controlnets") or {}).items()}
        manifest = cls(**kwargs)
        manifest.validate(where)
        if d.get("prediction_type", manifest.prediction_type) != manifest.prediction_type:
            raise ModelError(f"{where}: prediction_type {d['prediction_type']!r} disagrees with the scheduler's "
                             f"{manifest.prediction_type!r}")
        return manifest

    def validate(self, where: str = MANIFEST) -> None:
        if self.family not in family_names():
            raise ModelError(f"{where}: family {self.family!r} is not one of {choices_text(family_names())}")
        if self.batch not in (1, 2):
            raise ModelError(f"{where}: batch must be 1 or 2; found {self.batch}")
        if self.sizes and (not all(isinstance(s, (list, tuple)) and len(s) == 2 for s in self.sizes)
                           or tuple(self.sizes[0]) != (self.width, self.height)):
            raise ModelError(f"{where}: sizes must be [width, height] pairs, the first {self.width}x{self.height}; "
                             f"found {self.sizes!r}")
        for name, value in (("prompt_chunks", self.prompt_chunks), ("clip_skip", self.clip_skip)):
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_PROMPT_CHUNKS:
                raise ModelError(f"{where}: {name} must be a whole number from 1 to {MAX_PROMPT_CHUNKS}; "
                                 f"found {value!r}")
        unknown = sorted(set(self.components) - set(PACKAGE_NAMES))
        if unknown:
            raise ModelError(f"{where}: unknown component(s) {', '.join(unknown)}; "
                             f"valid: {choices_text(PACKAGE_NAMES)}")
        for component, entries in CHUNKS_OF.items():
            chunks = set(entries) & set(self.components)
            if chunks and chunks != set(entries):
                raise ModelError(f"{where}: a chunked {component} needs both {' and '.join(entries)}")

    def has(self, component: str) -> bool:
        return any(entry_component(e) == component for e in self.components)

    def missing_for_generation(self) -> list[str]:
        """Components a text-to-image pipeline needs that this folder lacks (a partial conversion)."""
        return [c for c in get_family(self.family).component_names if not self.has(c)]

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


def package_hash(package: Path) -> str:
    """sha256 over a package folder's files ("<relative path> <file sha256>" lines, sorted); each
    file's hash is remembered by size and mtime, so checking an unchanged package costs a stat."""
    import hashlib

    from coreml_sd.checkpoint.safeload import sha256_file

    package = Path(package)
    lines = [f"{p.relative_to(package).as_posix()} {sha256_file(p)}\n"
             for p in sorted(package.rglob("*")) if p.is_file()]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def is_converted_folder(path: Path | None) -> bool:
    """Whether `path` is a converted model folder (the one test every caller uses)."""
    return path is not None and Path(path).is_dir() and (Path(path) / MANIFEST).is_file()


def is_core_ml_folder(path: Path | None) -> bool:
    """Whether `path` is a folder of Core ML models without our manifest that coreml-sd can open
    (Apple's Swift or Python layout, Guernika, Mochi Diffusion: `coreml_sd.foreign_folder`); the one
    test every caller uses, beside `is_converted_folder`."""
    if path is None or not Path(path).is_dir() or is_converted_folder(path):
        return False
    from coreml_sd.foreign_folder import recognised_entries

    return bool(recognised_entries(Path(path)))


def _check_inside(folder: Path, names: list[str]) -> None:
    """A manifest names packages inside its own folder; a path that leaves it is refused, not followed."""
    root = folder.resolve()
    for name in names:
        target = (folder / name).resolve()
        if Path(name).is_absolute() or (target != root and root not in target.parents) or target == root:
            raise ModelError(f"{folder / MANIFEST}: package path {name!r} leaves the model folder; expected a "
                             f"package name inside {folder}")


class ConvertedModel(SourceBase):
    """A converted model folder as a model source: its Core ML packages (it is its own `PackageSet`),
    and torch weights only through its recorded source, opened again with `reopen` (open_model)."""

    # How each fact of the manifest is known, where it was not recorded by the converter
    # (a folder of another tool's: see coreml_sd.foreign_folder); empty here.
    facts: Mapping[str, Any] = {}

    def __init__(self, path: Path, *, reopen: Callable[..., Any] | None = None, partial: bool = False):
        path = Path(path)
        self._open(path, Manifest.read(path), TokenizerFiles(path / "vocab.json", path / "merges.txt"),
                   reopen=reopen, partial=partial)

    def _open(self, path: Path, manifest: Manifest, tokenizer_files: TokenizerFiles, *,
              reopen: Callable[..., Any] | None, partial: bool, what: str = "converted model") -> None:
        """Check the folder holds what `manifest` lists and set up the source's facts."""
        self.path, self.manifest, self._reopen = path, manifest, reopen
        packages = [*manifest.components.values(), *(c.info for c in manifest.controlnets.values())]
        _check_inside(self.path, [p.package for p in packages] + [p.compiled for p in packages if p.compiled])
        missing = [f.name for f in (tokenizer_files.vocab, tokenizer_files.merges) if not f.is_file()]
        missing += [p.package for p in packages if not (self.path / p.package).is_dir()]
        if not partial:  # a partial conversion (--components) can be verified, not generated from
            why = " (converted with --components)" if what == "converted model" else ""
            missing += [f"a {c} package{why}" for c in manifest.missing_for_generation()]
        if missing:
            raise ModelError(f"{self.path}: incomplete {what}, missing {', '.join(missing)}")
        m = manifest
        self.info = ModelInfo(
            name=m.name, kind="coreml", path=self.path, scheduler=m.scheduler, family=m.family,
            sample_size=m.width, vae_scale_factor=m.vae_scale_factor, latent_channels=m.latent_channels,
            scaling_factor=m.scaling_factor, text_hidden_size=m.text_hidden_size, tokenizer_files=tokenizer_files,
            pad_token=m.pad_token, hash=m.source.get("hash"), sizes=m.all_sizes,
            max_prompt_tokens=m.max_length * m.prompt_chunks, clip_skip=m.clip_skip,
        )
        self.generation_extras = dict(m.source.get("generation_extras") or {})
        self.packages = self

    @property
    def batch(self) -> int:
        return self.manifest.batch

    def contents(self) -> dict[str, Any]:
        """Models the folder holds beyond the components it runs (a converted folder: none)."""
        return {"extras": {}, "controlnets": {}}

    @property
    def origin(self) -> Origin:
        src = self.manifest.source
        return Origin(Path(src.get("path") or self.path), src.get("kind", "coreml"), src.get("hash"),
                      dict(src.get("modifiers") or {}))

    def has(self, component: str) -> bool:
        return self.manifest.has(component)

    def _entries(self, component: str) -> list[str]:
        if self.manifest.is_chunked(component):
            return list(CHUNKS_OF[component])
        if component not in self.manifest.components:
            raise BackendUnavailable(f"{self.path.name} has no {component} package; it has "
                                     f"{choices_text(self.manifest.components)}")
        return [component]

    def package_paths(self, component: str) -> list[Path]:
        """The package(s) of `component` (a chunked UNet: both chunks, in order)."""
        return [self.path / self.manifest.components[e].package for e in self._entries(component)]

    def checked_package_paths(self, component: str) -> list[Path]:
        """`package_paths`, each checked against the hash the manifest recorded: a package edited or
        swapped in from another model is named, never run silently."""
        for entry in self._entries(component):
            info = self.manifest.components[entry]
            if info.sha256 and package_hash(self.path / info.package) != info.sha256:
                raise ModelError(f"{self.path / info.package} is not the package this folder was converted with "
                                 f"(its contents changed since: sha256 differs from the manifest's); convert the "
                                 f"model again, or run `coreml-sd verify {self.path}` to see what it computes")
        return self.package_paths(component)

    def compiled_paths(self, component: str) -> list[Path | None]:
        """Per package, its `.mlmodelc` compiled at conversion, where it exists."""
        out = []
        for e in self._entries(component):
            compiled = self.manifest.components[e].compiled
            out.append(self.path / compiled if compiled and (self.path / compiled).is_dir() else None)
        return out

    def refiner_source(self) -> "ConvertedRefiner | None":
        """The refiner converted into this folder (UnetRefiner), as a model source of its own family."""
        if not self.manifest.refiner or not self.manifest.has("unet_refiner"):
            return None
        return ConvertedRefiner(self)

    def tokenizer(self, component: str = "text_encoder") -> CLIPTokenizer:
        tok = CLIPTokenizer(self.info.tokenizer_files, pad_token=pad_token(self.info, component),
                            max_length=self.manifest.max_length)
        for word, ids in self.manifest.trigger_words.items():
            tok.add_trigger(word, ids)
        return tok

    def trigger_ids(self) -> dict[str, list[int]]:
        return dict(self.manifest.trigger_words)

    def torch_unavailable(self) -> str | None:
        return _source_missing(self._reopen, self.manifest.source, "the manifest's source")

    def torch_modules(self, *, device: str, dtype: Any) -> TorchModules:
        """The source model's torch modules, where the manifest's source (and modifiers) still exist."""
        return _reopened_modules(self, self._reopen, device=device, dtype=dtype)


class ConvertedRefiner(SourceBase):
    """The refiner of a converted SDXL folder: its UnetRefiner package as the "unet", and the folder's
    text encoder packages its family needs (TextEncoder2, shared with the base as in Apple's layout)."""

    def __init__(self, base: ConvertedModel):
        self.base, self.path = base, base.path
        record = base.manifest.refiner
        self.manifest = base.manifest
        self.info = replace(base.info, name=str(record.get("name", "refiner")), family=str(record["family"]),
                            scheduler=SchedulerConfig.from_dict(record["scheduler"]), hash=record.get("hash"),
                            text_hidden_size=int(record["text_hidden_size"]), pad_token=self.info_pad(record))
        missing = [t.component for t in self.info.spec.text_encoders if not base.has(t.component)]
        if missing:
            raise ModelError(f"{self.path}: its refiner needs the {', '.join(missing)} package, which is not there")
        self.packages = self
        self.generation_extras = {}

    @staticmethod
    def info_pad(record: Mapping[str, Any]) -> str:
        return str(record.get("pad_token") or get_family(record["family"]).text_encoders[0].pad_token)

    @property
    def batch(self) -> int:
        return self.base.batch

    def _entry(self, component: str) -> str:
        return "unet_refiner" if component == "unet" else component

    def has(self, component: str) -> bool:
        return self.base.has(self._entry(component))

    def package_paths(self, component: str) -> list[Path]:
        return self.base.package_paths(self._entry(component))

    def checked_package_paths(self, component: str) -> list[Path]:
        return self.base.checked_package_paths(self._entry(component))

    def compiled_paths(self, component: str) -> list[Path | None]:
        return self.base.compiled_paths(self._entry(component))

    def tokenizer(self, component: str = "text_encoder_2") -> CLIPTokenizer:
        return self.base.tokenizer(component)

    def trigger_ids(self) -> dict[str, list[int]]:
        return self.base.trigger_ids()  # the shared text encoder package has the base's embeddings baked in

    @property
    def origin(self) -> Origin:
        src = self.manifest.refiner.get("source") or {}
        return Origin(Path(src.get("path") or self.path), src.get("kind", "coreml"), src.get("hash"),
                      dict(src.get("modifiers") or {}))

    def torch_unavailable(self) -> str | None:
        return _source_missing(self.base._reopen, self.manifest.refiner.get("source") or {}, "the refiner's source")

    def torch_modules(self, *, device: str, dtype: Any) -> TorchModules:
        return _reopened_modules(self, self.base._reopen, device=device, dtype=dtype)


def _source_missing(reopen, source: Mapping[str, Any], what: str) -> str | None:
    """Why torch cannot run a converted model's component: no way to reopen sources, or the
    recorded source file is gone; None when it can."""
    path = source.get("path")
    if reopen is None or not path or not Path(path).exists():
        return f"torch needs the source model, and {what} {path or '(none recorded)'} is not there"
    return None


def _reopened_modules(model, reopen, *, device: str, dtype: Any) -> TorchModules:
    """`model`'s source reopened with its modifiers (LoRAs, VAE ...), as torch modules."""
    reason = model.torch_unavailable()
    if reason is not None:
        raise BackendUnavailable(f"{model.path.name}: {reason}")
    origin = model.origin
    return reopen(origin.path, **origin.modifiers).torch_modules(device=device, dtype=dtype)
