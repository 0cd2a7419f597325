"""ControlNet models as sources: what a ControlNet is (before its weights load), and what it gives backends.

A ControlNet comes as a diffusers folder (`config.json` of a `ControlNetModel` and its weights), as
a single file in the original layout (`control_v11p_sd15_canny.pth` / `.safetensors`, fp16 or
fp32, pickles through the restricted unpickler; keys in `checkpoint/controlnet_keymap.py`), or as
a package a converted model folder holds (`controlnet/<Name>.mlpackage`, listed in its manifest).

A single file's architecture is, in order: the `config=` given, a `<stem>.coreml-sd.json` beside
it (`{"family": "sd1", "controlnet": {...diffusers ControlNetModel config...}}`), or, for a file of
a family's full size, the family's shipped UNet config with the hint block's widths read from the
file. The family is the one whose context width and UNet block widths the ControlNet has
(`families.match_controlnet`); `check_fit` refuses a ControlNet that does not fit the model it is
used with, saying what each was made for.

`open_controlnet(spec, base)` returns a `ControlNetSource`, which the backends load the
`controlnet` component from like any model source: torch from the file, coreml/mil from the
converted folder's package, with the usual fallback between them. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from coreml_sd.checkpoint import controlnet_keymap as ckm
from coreml_sd.components import controlnet_package_name
from coreml_sd.config import read_json
from coreml_sd.errors import BackendUnavailable, ModelError, choices_text
from coreml_sd.families import get_family, match_controlnet, same_layout
from coreml_sd.model_source import ModelInfo, Origin

log = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".coreml-sd.json"
FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")
FOLDER_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
CONTROLNET_CLASS = "ControlNetModel"


def legacy_hash(path: Path) -> str:
    """AUTOMATIC1111's short model hash, which its ControlNet extension shows as "name [hash]": the first
    8 hex digits of the sha256 of 64 KiB read at offset 1 MiB."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(0x100000)
        digest.update(fh.read(0x10000))
    return digest.hexdigest()[:8]


@dataclass(frozen=True)
class ControlNetInfo:
    """What a ControlNet is: name, where it is, the family it fits, its diffusers config, A1111 hash."""

    name: str
    kind: str  # "diffusers" | "checkpoint" | "coreml"
    path: Path
    family: str | None  # None: a non-standard size (tests), fitted by its widths alone
    config: Mapping[str, Any] = field(default_factory=dict)
    hash: str | None = None

    @property
    def package_name(self) -> str:
        return controlnet_package_name(self.name)

    @property
    def residuals(self) -> int:
        return ckm.residual_count(self.config)

    @property
    def context_dim(self) -> int:
        return int(self.config.get("cross_attention_dim", 1280))

    @property
    def block_widths(self) -> tuple[int, ...]:
        return tuple(int(c) for c in self.config["block_out_channels"])

    @property
    def in_channels(self) -> int:
        return int(self.config.get("in_channels", 4))

    @property
    def pooled(self) -> bool:
        """Its residuals are averaged over the image (diffusers' global_pool_conditions: shuffle)."""
        return bool(self.config.get("global_pool_conditions", False))

    @property
    def a1111_model(self) -> str:
        """The "Model" of A1111's ControlNet infotext: "control_v11p_sd15_canny [d14c016b]"."""
        return f"{self.name} [{self.hash}]" if self.hash else self.name

    def describe_fit(self) -> str:
        made_for = f"{self.family} models" if self.family else "a non-standard model size"
        return f"{made_for} (context width {self.context_dim}, block widths {list(self.block_widths)})"


def check_fit(info: ControlNetInfo, base: ModelInfo) -> None:
    """Refuse a ControlNet made for another kind of model than `base`, saying what each is."""
    problems = []
    if info.family is not None and not same_layout(info.family, base.family):
        problems.append(f"it is for {get_family(info.family).description}, the model is {base.family}")
    if info.context_dim != base.text_hidden_size:
        problems.append(f"its context width is {info.context_dim}, the model's {base.text_hidden_size}")
    if base.unet_block_widths and info.block_widths != tuple(base.unet_block_widths):
        problems.append(f"its block widths are {list(info.block_widths)}, the model's UNet's "
                        f"{list(base.unet_block_widths)}")
    if info.in_channels != base.latent_channels:
        problems.append(f"it takes {info.in_channels} latent channels, the model has {base.latent_channels}")
    if problems:
        raise ModelError(f"ControlNet {info.name} does not fit {base.name} ({base.family}): "
                         + "; ".join(problems) + f". It was made for {info.describe_fit()}.")


# -- single files and diffusers folders ---------------------------------------------------------
class ControlNetFile:
    """A ControlNet in one original-layout file (see the module docstring)."""

    def __init__(self, path: str | Path, *, config: Mapping[str, Any] | str | Path | None = None,
                 shapes: Mapping[str, Any] | None = None, detection=None):
        from coreml_sd.checkpoint import detect
        from coreml_sd.checkpoint.safeload import tensor_shapes

        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise ModelError(f"ControlNet not found: {self.path}")
        self.shapes = shapes if shapes is not None else tensor_shapes(self.path)[0]
        det = detection or detect.classify(self.shapes)
        if det.kind != "controlnet":
            raise ModelError(f"{self.path} is not a ControlNet: expected control_model.* keys (input_hint_block, "
                             f"zero_convs), found a {det.kind} file ({det.found})")
        if ckm.is_difference_file(self.shapes):
            raise ModelError(f"{self.path} is a 'difference' ControlNet (weights relative to SD 1.5); use the "
                             f"full ControlNet (e.g. control_v11p_sd15_*.pth) instead")
        self.prefix = det.layout or ""
        self.config, self.family = self._choose_config(config, det)
        self._state: dict[str, Any] | None = None

    def _choose_config(self, config, det) -> tuple[dict[str, Any], str | None]:
        sidecar = self.path.with_name(self.path.stem + SIDECAR_SUFFIX)
        if config is None and sidecar.is_file():
            config = sidecar
        if config is not None:
            data = read_json(Path(config).expanduser()) if isinstance(config, (str, Path)) else dict(config)
            family = data.get("family")
            if family is not None:
                get_family(family)
            if "controlnet" not in data:
                raise ModelError(f"ControlNet config for {self.path.name}: expected {{\"family\": ..., \"controlnet\": "
                                 f"{{diffusers ControlNetModel config}}}}; found keys {choices_text(data)}")
            return dict(data["controlnet"]), family
        if det.family is None:
            raise ModelError(f"{self.path} is a ControlNet of no known family's size (context width "
                             f"{det.context_dim}, block widths {list(det.block_widths)}); pass its config "
                             f"({self.path.stem}{SIDECAR_SUFFIX} next to it)")
        from coreml_sd.checkpoint.config import shipped_config

        family = get_family(det.family)
        return ckm.config_from_unet(shipped_config(family.config).unet, self.shapes, self.prefix), family.name

    def state(self) -> dict[str, Any]:
        if self._state is None:
            from coreml_sd.checkpoint.safeload import flat_state_dict, load_tensor_file

            obj, _ = load_tensor_file(self.path)
            self._state = flat_state_dict(obj, self.path)
        return self._state

    def build(self, *, device: str, dtype: Any):
        """The diffusers ControlNetModel, filled strictly from the file (memory-mapped; no copy unless
        the dtype changes)."""
        from coreml_sd.checkpoint.loader import fill

        module = new_controlnet(self.config)
        state = ckm.controlnet_from_original(self.state(), module.state_dict().keys(), self.config, self.prefix)
        return fill(module, state, "ControlNet", dtype=dtype, device=device)

    def info(self) -> ControlNetInfo:
        return ControlNetInfo(self.path.stem, "checkpoint", self.path, self.family, self.config,
                              legacy_hash(self.path))


class ControlNetFolder:
    """A ControlNet saved by diffusers (`save_pretrained`): config.json and its weights."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise ModelError(f"{self.path} is not a diffusers ControlNet folder: no config.json")
        config = read_json(config_path)
        if config.get("_class_name") != CONTROLNET_CLASS:
            raise ModelError(f"{self.path} is not a ControlNet: its config.json is for "
                             f"{config.get('_class_name')!r}, expected {CONTROLNET_CLASS!r}")
        self.weights = next((self.path / w for w in FOLDER_WEIGHTS if (self.path / w).is_file()), None)
        if self.weights is None:
            raise ModelError(f"{self.path} has no weights ({' or '.join(FOLDER_WEIGHTS)})")
        self.config = {k: v for k, v in config.items() if not k.startswith("_")}
        family = match_controlnet(self.config.get("cross_attention_dim"), self.config["block_out_channels"])
        self.family = family.name if family else None

    def build(self, *, device: str, dtype: Any):
        from diffusers import ControlNetModel

        try:
            module = ControlNetModel.from_pretrained(self.path, torch_dtype=dtype, local_files_only=True)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelError(f"could not load the ControlNet in {self.path}: {exc}") from exc
        return module.to(device).eval().requires_grad_(False)

    def info(self) -> ControlNetInfo:
        return ControlNetInfo(self.path.name, "diffusers", self.path, self.family, self.config,
                              legacy_hash(self.weights))


def new_controlnet(config: Mapping[str, Any]):
    import torch
    from diffusers import ControlNetModel

    with torch.device("meta"):
        try:
            return ControlNetModel(**dict(config))
        except (TypeError, ValueError) as exc:
            raise ModelError(f"ControlNet config does not build a ControlNetModel: {exc}") from None


def open_controlnet_model(path: str | Path, *, config=None) -> ControlNetFile | ControlNetFolder:
    """A ControlNet file or diffusers folder at `path`; a one-line error otherwise."""
    p = Path(path).expanduser()
    if p.is_dir():
        return ControlNetFolder(p)
    if p.is_file() and p.suffix.lower() in FILE_SUFFIXES:
        return ControlNetFile(p, config=config)
    if not p.exists():
        raise ModelError(f"ControlNet not found: {p} (expected a {'/'.join(FILE_SUFFIXES)} file, a diffusers "
                         f"ControlNet folder, or the name of one a converted model holds)")
    raise ModelError(f"{p} is not a ControlNet: expected a {'/'.join(FILE_SUFFIXES)} file or a diffusers folder")


# -- what the backends load from ----------------------------------------------------------------
class ControlNetModules:
    """The torch side of a ControlNet source: its diffusers module, by component name."""

    def __init__(self, module):
        self.controlnet = module

    def module(self, component: str):
        return self.controlnet


class ControlNetPackages:
    """A converted folder's package of one ControlNet, as the package backends ask for it."""

    def __init__(self, folder: Path, entry, batch: int, manifest):
        self.path, self.entry, self.batch, self.manifest = Path(folder), entry, batch, manifest

    def has(self, component: str) -> bool:
        return component == "controlnet"

    def package_paths(self, component: str) -> list[Path]:
        return [self.path / self.entry.info.package]

    def checked_package_paths(self, component: str) -> list[Path]:
        """The package, checked against the hash the manifest recorded (as the model's own packages)."""
        from coreml_sd.model_folder import package_hash

        path = self.path / self.entry.info.package
        if self.entry.info.sha256 and package_hash(path) != self.entry.info.sha256:
            raise ModelError(f"{path} is not the ControlNet package this folder was converted with (its contents "
                             f"changed since); convert it again with `coreml-sd convert-controlnet`")
        return [path]

    def compiled_paths(self, component: str) -> list[Path | None]:
        compiled = self.entry.info.compiled
        return [self.path / compiled if compiled and (self.path / compiled).is_dir() else None]


class ControlNetSource:
    """One ControlNet for the backends: its facts, its torch weights (a file or folder) and/or its
    package in a converted folder."""

    generation_extras: Mapping[str, str] = {}

    def __init__(self, info: ControlNetInfo, *, model: ControlNetFile | ControlNetFolder | None = None,
                 packages: ControlNetPackages | None = None):
        self.info, self.model, self.packages = info, model, packages

    @property
    def origin(self) -> Origin:
        return Origin(self.model.path if self.model is not None else self.info.path, self.info.kind, self.info.hash)

    def torch_unavailable(self) -> str | None:
        if self.model is None:
            return (f"torch needs the ControlNet's weights, and the file it was converted from "
                    f"({self.info.path}) is not there")
        return None

    def torch_modules(self, *, device: str, dtype: Any) -> ControlNetModules:
        if self.model is None:
            raise BackendUnavailable(self.torch_unavailable())
        return ControlNetModules(self.model.build(device=device, dtype=dtype))


def open_controlnet(spec: str | Path | ControlNetSource, base, *, config=None) -> ControlNetSource:
    """The ControlNet `spec` names, checked against the model `base` (a ModelSource) it is used with.

    `spec`: a ControlNet file or diffusers folder, or (with a converted model) the name of a
    ControlNet its folder holds. With a converted model the folder's package is used when it is
    this ControlNet's conversion (the same file, or a file of the same content), else torch runs it.
    """
    if isinstance(spec, ControlNetSource):
        check_fit(spec.info, base.info)
        return spec
    manifest = getattr(base.packages, "manifest", None)
    converted = dict(getattr(manifest, "controlnets", None) or {})
    entry = _converted_entry(spec, converted)
    given = Path(str(spec)).expanduser()
    if entry is None and converted and not given.exists():
        raise ModelError(f"ControlNet {spec} not found: not a file or folder, and {base.info.name} holds "
                         f"{choices_text(converted)}")
    model = open_controlnet_model(spec, config=config) if entry is None or given.exists() else None
    if entry is not None:
        source = _converted_source(base, converted[entry], entry, model)
    else:
        info = model.info()
        if info.package_name in converted:
            log.warning("%s holds a ControlNet %s converted from another file; %s runs on torch",
                        base.info.name, info.package_name, given)
        source = ControlNetSource(info, model=model)
    check_fit(source.info, base.info)
    return source


def _converted_entry(spec, converted: Mapping[str, Any]) -> str | None:
    """Which of a folder's converted ControlNets `spec` is: by package name, or the file it came from."""
    text = str(spec)
    if text in converted:
        return text
    path = Path(text).expanduser()
    if not path.exists():
        return None
    try:
        name = controlnet_package_name(path.stem if path.is_file() else path.name)
    except ModelError:
        return None
    entry = converted.get(name)
    if entry is None:
        return None
    recorded = entry.source.get("path")
    if recorded and Path(recorded).resolve() == path.resolve():
        return name
    from coreml_sd.checkpoint.safeload import sha256_file

    same = path.is_file() and entry.source.get("sha256") == sha256_file(path)
    return name if same else None


def _converted_source(base, entry, name: str, model) -> ControlNetSource:
    src = entry.source
    if model is None and src.get("path") and Path(src["path"]).exists():
        try:
            model = open_controlnet_model(src["path"], config={"family": entry.source.get("family"),
                                                                  "controlnet": entry.config}
                                          if Path(src["path"]).is_file() else None)
        except ModelError as exc:
            log.info("the source of ControlNet %s does not open (%s); packages only", name, exc)
    info = ControlNetInfo(src.get("name") or name, "coreml", Path(src.get("path") or base.packages.path),
                          src.get("family"), dict(entry.config), src.get("hash"))
    packages = ControlNetPackages(base.packages.path, entry, base.packages.batch, base.packages.manifest)
    return ControlNetSource(info, model=model, packages=packages)
