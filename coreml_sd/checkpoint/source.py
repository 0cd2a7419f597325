"""Model sources for single-file checkpoints, and the modifiers (VAE, LoRA, embeddings, hypernetwork)
that apply to any source with torch weights (single files and diffusers folders alike).

`SingleFileCheckpoint(path)` reads only the header of a `.safetensors` file to know what it is
(family, prediction type, size) and loads weights memory-mapped when `torch_modules` is called.
Its config is, in order: the `config=` argument, a `<stem>.coreml-sd.json` next to the file, or the
shipped config of the detected family. SD 2.x files do not say whether they predict velocity; unless
`prediction_type` is given, the UNet is run once to tell (`detect.probe_v_prediction`).

`Modified(source, ...)` wraps a source: its `torch_modules` swaps the VAE, merges LoRAs, extends
the token embedding with textual-inversion vectors and installs a hypernetwork; its tokenizer knows
the embeddings' trigger words; `generation_extras` holds the AUTOMATIC1111 parameter strings
("VAE", "VAE hash", "Lora hashes", "TI hashes", "Hypernet", "Hypernet hash", "Hypernet strength").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from coreml_sd.checkpoint import detect, keymap
from coreml_sd.checkpoint.config import CheckpointConfig, as_config, shipped_config, sidecar_path
from coreml_sd.checkpoint.safeload import SAFETENSORS, TensorInfo, sha256_file, sniff, tensor_shapes, torch_dtype_name
from coreml_sd.config import PREDICTION_TYPES
from coreml_sd.errors import ModelError, choices_text
from coreml_sd.families import get_family, layout_base, variants_of
from coreml_sd.model_source import ModelInfo, ModelSource, Origin, SourceBase, TorchModules
from coreml_sd.tokenizer import CLIPTokenizer, bundled_files

log = logging.getLogger(__name__)
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def check_prediction_type(value: str | None) -> str | None:
    if value is not None and value not in PREDICTION_TYPES:
        raise ModelError(f"prediction type {value!r} is not one of {choices_text(PREDICTION_TYPES)}")
    return value


class SingleFileCheckpoint(SourceBase):
    """One `.safetensors` / `.ckpt` / `.pt` file in the original (CompVis / A1111) layout."""

    def __init__(self, path: str | Path, *, config: Any = None, prediction_type: str | None = None,
                 ema: bool = False):
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise ModelError(f"checkpoint not found: {self.path}")
        self.ema = ema
        self._state: dict[str, Any] | None = None
        if sniff(self.path) == SAFETENSORS:
            shapes, _ = tensor_shapes(self.path)  # the header only
        else:  # a pickle has no header: load it (memory-mapped) once, for the shapes and the weights
            state = self.state()
            shapes = {k: TensorInfo(torch_dtype_name(v.dtype), tuple(v.shape)) for k, v in state.items()}
        self.detection = detect.classify(shapes)
        detect.require_model(self.detection, self.path)
        if ema and not self.detection.has_ema:
            raise ModelError(f"{self.path} holds no EMA weights (model_ema.*); open it without ema")
        self.config = self._choose_config(config, check_prediction_type(prediction_type))
        self.has_vae = self.detection.has_vae
        self.info = self._info()

    def _choose_config(self, config, prediction_type: str | None) -> CheckpointConfig:
        det = self.detection
        family = get_family(det.family)
        if config is None and sidecar_path(self.path).is_file():
            config = sidecar_path(self.path)
        if config is not None:
            cfg = as_config(config)
            if layout_base(cfg.spec) is not layout_base(family):
                raise ModelError(f"{self.path} is {det.family} (text encoder {det.text_encoder}), but its "
                                 f"config says {cfg.family}")
        elif not det.standard:
            raise ModelError(f"{self.path} is a {det.family} model of non-standard size (cross-attention width "
                             f"{det.context_dim}); pass its config (config=..., or {sidecar_path(self.path).name} "
                             f"next to it)")
        else:
            cfg = shipped_config(self._variant(family, prediction_type).config)
        if not det.has_text_encoder:
            raise ModelError(f"{self.path} holds no text encoder; a full checkpoint is needed")
        return cfg.with_prediction_type(prediction_type) if prediction_type else cfg

    def _variant(self, family, prediction_type: str | None):
        """The family or its variant that fits the file (sd2 / sd2-v by prediction type, probed if not given)."""
        variants = [v for v in variants_of(layout_base(family)) if v.config
                    and v.unet_in_channels == family.unet_in_channels]
        if len({v.prediction_type for v in variants}) < 2:
            return variants[0]
        wanted = prediction_type or ("v_prediction" if self._probe_v(variants[0]) else "epsilon")
        return next((v for v in variants if v.prediction_type == wanted), variants[0])

    def _probe_v(self, family) -> bool:
        from coreml_sd.checkpoint.loader import fill, new_unet

        cfg = shipped_config(family.config)
        unet = fill(new_unet(cfg.unet), keymap.unet_from_original(self.state(), cfg.unet, ema=self.ema), "UNet")
        v = detect.probe_v_prediction(unet)
        log.info("%s: prediction type probed: %s", self.path.name, "v_prediction" if v else "epsilon")
        return v

    def _info(self) -> ModelInfo:
        cfg = self.config
        return ModelInfo(
            name=self.path.stem, kind="checkpoint", path=self.path, scheduler=cfg.scheduler, family=cfg.family,
            sample_size=cfg.sample_size, vae_scale_factor=cfg.vae_scale_factor,
            latent_channels=int(cfg.unet.get("out_channels", 4)), scaling_factor=cfg.scaling_factor,
            text_hidden_size=int(cfg.unet.get("cross_attention_dim", cfg.spec.context_dim)),
            unet_block_widths=tuple(int(c) for c in cfg.unet["block_out_channels"]),
            tokenizer_files=bundled_files(), pad_token=cfg.pad_token, hash=sha256_file(self.path)[:10],
        )

    def state(self) -> dict[str, Any]:
        """The file's tensors under their original names (memory-mapped), loaded once."""
        if self._state is None:
            from coreml_sd.checkpoint.safeload import flat_state_dict, load_tensor_file

            obj, _ = load_tensor_file(self.path)
            self._state = flat_state_dict(obj, self.path)
        return self._state

    def torch_modules(self, *, device: str, dtype: Any, load_vae: bool = True) -> TorchModules:
        from coreml_sd.checkpoint.loader import build_components

        if load_vae and not self.has_vae:
            raise ModelError(f"{self.path} has no VAE inside (first_stage_model.*); pass one with --vae FILE")
        mods = build_components(self.state(), self.config, ema=self.ema, dtype=dtype, device=device,
                                with_vae=load_vae)
        self._state = None  # the modules hold the tensors now; let the rest of the file go
        return TorchModules(unet=mods.pop("unet"), vae=mods.pop("vae", None), **mods)


@dataclass(frozen=True)
class Weighted:
    path: Path
    strength: float = 1.0


class Modified(SourceBase):
    """A source with a replacement VAE, LoRAs, embeddings and/or a hypernetwork applied."""

    def __init__(self, base: ModelSource, *, vae: str | Path | None = None, loras: Sequence[Weighted] = (),
                 embeddings: Sequence[str | Path] = (), hypernetworks: Sequence[Weighted] = (),
                 prediction_type: str | None = None):
        from coreml_sd.checkpoint import embeddings as emb_mod
        from coreml_sd.checkpoint import hypernetwork as hn_mod
        from coreml_sd.checkpoint.vae import VaeFile

        self.base = base
        self.vae = VaeFile(vae) if vae is not None else None
        self.loras = [w for w in loras]
        for w in self.loras:
            if not Path(w.path).expanduser().is_file():
                raise ModelError(f"LoRA not found: {w.path}")
        self.embeddings = [emb_mod.load_embedding(p) for p in embeddings]
        for e in self.embeddings:
            emb_mod.check_width(e, base.info.text_hidden_size)
        _unique_names([e.name for e in self.embeddings])
        self.hypernetworks = [(hn_mod.load_hypernetwork(w.path), w.strength) for w in hypernetworks]
        self.lora_reports: list = []
        self.info = base.info
        if check_prediction_type(prediction_type) and prediction_type != base.info.prediction_type:
            sched = replace(base.info.scheduler, prediction_type=prediction_type)
            self.info = replace(base.info, scheduler=sched)
        self.generation_extras = self._extras()

    def _extras(self) -> dict[str, str]:
        from coreml_sd.checkpoint.lora import lora_hash
        from coreml_sd.checkpoint.safeload import read_safetensors_header

        extras = dict(self.base.generation_extras)
        if self.vae is not None:
            extras["VAE hash"] = self.vae.hash
            extras["VAE"] = self.vae.path.name
        if self.loras:
            hashes = []
            for w in self.loras:
                p = Path(w.path).expanduser()
                meta = read_safetensors_header(p)[1] if sniff(p) == SAFETENSORS else {}
                hashes.append(f"{p.stem}: {lora_hash(p, meta)}")
            extras["Lora hashes"] = ", ".join(hashes)
        if self.embeddings:
            extras["TI hashes"] = ", ".join(f"{e.name}: {e.hash}" for e in self.embeddings)
        if self.hypernetworks:
            extras["Hypernet"] = ", ".join(net.name for net, _ in self.hypernetworks)
            extras["Hypernet hash"] = ", ".join(net.hash for net, _ in self.hypernetworks)
            extras["Hypernet strength"] = ", ".join(_number(s) for _, s in self.hypernetworks)
        return extras

    @property
    def origin(self) -> Origin:
        """The base model, and the modifiers as `open_model` arguments (to reopen the same model)."""
        base = self.base.origin
        modifiers: dict[str, Any] = {}
        if self.vae is not None:
            modifiers["vae"] = str(Path(self.vae.path).absolute())
        if self.loras:
            modifiers["loras"] = [[str(Path(w.path).absolute()), w.strength] for w in self.loras]
        if self.embeddings:
            modifiers["embeddings"] = [str(Path(e.path).absolute()) for e in self.embeddings]
        if self.hypernetworks:
            modifiers["hypernetworks"] = [[str(Path(n.path).absolute()), s] for n, s in self.hypernetworks]
        if self.info.prediction_type != self.base.info.prediction_type:
            modifiers["prediction_type"] = self.info.prediction_type
        return Origin(base.path, base.kind, base.hash, modifiers)

    def trigger_ids(self) -> dict[str, list[int]]:
        from coreml_sd.checkpoint.embeddings import assign_ids

        return assign_ids(self.embeddings, len(self.base.tokenizer().encoder))

    def tokenizer(self, component: str = "text_encoder") -> CLIPTokenizer:
        tok = self.base.tokenizer(component)
        for word, ids in self.trigger_ids().items():
            tok.add_trigger(word, ids)
        return tok

    def torch_unavailable(self) -> str | None:
        return self.base.torch_unavailable()

    def torch_modules(self, *, device: str, dtype: Any) -> TorchModules:
        from coreml_sd.checkpoint import embeddings as emb_mod
        from coreml_sd.checkpoint import hypernetwork as hn_mod
        from coreml_sd.checkpoint.lora import merge_lora

        if self.vae is not None and isinstance(self.base, SingleFileCheckpoint):
            mods = self.base.torch_modules(device=device, dtype=dtype, load_vae=False)
        else:
            mods = self.base.torch_modules(device=device, dtype=dtype)
        if self.vae is not None:
            mods.vae = self.vae.module(self._vae_config(mods), dtype=dtype, device=device)
        self.lora_reports = [merge_lora(mods.text_encoder, mods.unet, w.path, w.strength) for w in self.loras]
        if self.embeddings:
            vocab = mods.text_encoder.get_input_embeddings().num_embeddings
            if vocab != len(self.base.tokenizer().encoder):
                raise ModelError(f"the text encoder has {vocab} token embeddings, the tokenizer "
                                 f"{len(self.base.tokenizer().encoder)}: embeddings cannot be added")
            emb_mod.extend_text_encoder(mods.text_encoder, self.embeddings)
        for net, strength in self.hypernetworks:
            hn_mod.install(mods.unet, net, strength)
        return mods

    def _vae_config(self, mods: TorchModules) -> dict:
        if isinstance(self.base, SingleFileCheckpoint):
            return dict(self.base.config.vae)
        if mods.vae is not None:
            return {k: v for k, v in mods.vae.config.items() if not k.startswith("_")}
        return dict(shipped_config(self.info.spec.config or layout_base(self.info.spec).config).vae)


def _unique_names(names: list[str]) -> None:
    seen = set()
    for n in names:
        if n.lower() in seen:
            raise ModelError(f"two embeddings have the trigger word {n!r}; rename one file")
        seen.add(n.lower())


def _number(x: float) -> str:
    return f"{x:g}"


def _weighted(item, what: str) -> Weighted:
    """A path, a (path, strength) pair or a Weighted."""
    if isinstance(item, Weighted):
        return item
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return Weighted(Path(item[0]).expanduser(), float(item[1]))
    if isinstance(item, (str, Path)):
        return Weighted(Path(item).expanduser())
    raise ModelError(f"{what}: expected a path or (path, strength), got {item!r}")


def with_modifiers(source: ModelSource, *, vae=None, loras=(), embeddings=(), hypernetworks=(),
                   prediction_type: str | None = None) -> ModelSource:
    """`source` itself when nothing modifies it, else a `Modified` wrapper."""
    loras = [_weighted(x, "lora") for x in loras]
    hypernetworks = [_weighted(x, "hypernetwork") for x in hypernetworks]
    embeddings = [Path(e).expanduser() for e in embeddings]
    override = prediction_type if not isinstance(source, SingleFileCheckpoint) else None
    if (vae is None and not loras and not embeddings and not hypernetworks and override is None
            and source_has_vae(source)):
        return source
    if not source_has_vae(source) and vae is None:
        raise ModelError(f"{source.info.path} has no VAE inside (first_stage_model.*); pass one with --vae FILE")
    return Modified(source, vae=vae, loras=loras, embeddings=embeddings, hypernetworks=hypernetworks,
                    prediction_type=override)


def source_has_vae(source: ModelSource) -> bool:
    """A single file may lack its VAE; every other source has one."""
    return not isinstance(source, SingleFileCheckpoint) or source.has_vae


