"""Checkpoint configs: the architecture a single-file checkpoint is loaded into.

A single file holds weights only; the shapes of the modules come from a config. Real community
files are detected (`detect.py`) and use the config their family ships in `coreml_sd/data/configs/`
(see `coreml_sd.families`: sd1, sd2, sd2-v ...); a file of any other size (the built-in tiny
model) names its config explicitly. Both are the same JSON format, one object:

    {
      "description": "free text (optional)",
      "family": "sd1",                  # a registered family: how the file's keys are laid out
      "unet": {...},                    # diffusers UNet2DConditionModel config (constructor arguments)
      "vae": {...},                     # diffusers AutoencoderKL config (scaling_factor included)
      "text_encoder": {...},            # transformers CLIPTextConfig arguments, one per text encoder
      "text_encoder_2": {...},          # of the family, by component name (SDXL: both; its refiner:
                                        # text_encoder_2 alone, as diffusers and Apple name it)
      "scheduler": {...},               # diffusers scheduler_config.json keys (see coreml_sd.config)
      "tokenizer": {"pad_token": "<|endoftext|>"}   # optional; default: the family's (SD 2.x pads with "!")
    }

Pass it as `open_model(path, config=...)` (a path to such a JSON file or a dict), or put it next to
the checkpoint as `<stem>.coreml-sd.json` (`model.safetensors` -> `model.coreml-sd.json`).

For an OpenCLIP (`sd2`) file, `text_encoder.num_hidden_layers` may be one less than the layers in
the file: Stable Diffusion 2 uses the penultimate layer, so the last one is dropped on load.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from coreml_sd.config import SchedulerConfig, read_json
from coreml_sd.errors import ModelError, choices_text
from coreml_sd.families import Family, family_names, family_of_config, get_family, shipped_configs

SIDECAR_SUFFIX = ".coreml-sd.json"
_TOP_KEYS = ("description", "family", "unet", "vae", "text_encoder", "text_encoder_2", "scheduler", "tokenizer")
_TOKENIZER_KEYS = ("pad_token",)


@dataclass(frozen=True)
class CheckpointConfig:
    """Component configs for loading one single-file checkpoint (see the module docstring)."""

    family: str
    unet: Mapping[str, Any]
    vae: Mapping[str, Any]
    text_encoder: Mapping[str, Any] | None = None
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    pad_token: str | None = None  # None: the family's
    description: str = ""
    text_encoder_2: Mapping[str, Any] | None = None

    def __post_init__(self):
        if self.family not in family_names():
            raise ModelError(f"checkpoint config: family is {self.family!r}; supported: {choices_text(family_names())}")
        if self.pad_token is None:
            object.__setattr__(self, "pad_token", self.spec.text_encoders[0].pad_token)
        encoders = [spec.component for spec in self.spec.text_encoders]
        for name in ("text_encoder", "text_encoder_2"):
            if name in encoders and self.text_config(name) is None:
                raise ModelError(f"checkpoint config: family {self.family} needs a {name!r} config "
                                 f"(its text encoders: {choices_text(encoders)})")
            if name not in encoders and self.text_config(name) is not None:
                raise ModelError(f"checkpoint config: family {self.family} has no {name}; its text encoders: "
                                 f"{choices_text(encoders)}")
        for name in ("unet", "vae", *encoders):
            if not isinstance(getattr(self, name), Mapping):
                raise ModelError(f"checkpoint config: {name!r} must be an object of constructor arguments")
        for name, keys in (("unet", ("block_out_channels", "layers_per_block", "cross_attention_dim")),
                           ("vae", ("block_out_channels",)),
                           *((e, ("hidden_size", "num_hidden_layers")) for e in encoders)):
            missing = [k for k in keys if k not in getattr(self, name)]
            if missing:
                raise ModelError(f"checkpoint config: {name} needs {choices_text(missing)}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CheckpointConfig":
        unknown = sorted(set(data) - set(_TOP_KEYS))
        if unknown:
            raise ModelError(f"checkpoint config: unknown keys {choices_text(unknown)}; "
                             f"known: {choices_text(_TOP_KEYS)}")
        missing = [k for k in ("family", "unet", "vae") if k not in data]
        if missing:
            raise ModelError(f"checkpoint config: missing {choices_text(missing)}")
        tok = dict(data.get("tokenizer") or {})
        if set(tok) - set(_TOKENIZER_KEYS):
            raise ModelError(f"checkpoint config: tokenizer keys {choices_text(sorted(tok))}; known: pad_token")
        return cls(
            family=data["family"],
            unet=dict(data["unet"]),
            vae=dict(data["vae"]),
            text_encoder=dict(data["text_encoder"]) if data.get("text_encoder") else None,
            scheduler=SchedulerConfig.from_dict(dict(data.get("scheduler") or {})),
            pad_token=tok.get("pad_token"),
            description=str(data.get("description", "")),
            text_encoder_2=dict(data["text_encoder_2"]) if data.get("text_encoder_2") else None,
        )

    @classmethod
    def from_json(cls, path: str | Path) -> "CheckpointConfig":
        return cls.from_dict(read_json(Path(path)))

    def to_dict(self) -> dict:
        out = {
            "description": self.description,
            "family": self.family,
            "unet": dict(self.unet),
            "vae": dict(self.vae),
            "scheduler": self.scheduler.to_dict(),
            "tokenizer": {"pad_token": self.pad_token},
        }
        for name in ("text_encoder", "text_encoder_2"):
            if self.text_config(name) is not None:
                out[name] = dict(self.text_config(name))
        return out

    @property
    def spec(self) -> Family:
        return get_family(self.family)

    def text_config(self, component: str) -> Mapping[str, Any] | None:
        return {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}.get(component)

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def sample_size(self) -> int:
        """Default image width/height in pixels."""
        return int(self.unet.get("sample_size", 64)) * self.vae_scale_factor

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.get("scaling_factor", self.spec.scaling_factor))

    def with_prediction_type(self, prediction_type: str) -> "CheckpointConfig":
        sched = SchedulerConfig.from_dict({**self.scheduler.to_dict(), "prediction_type": prediction_type})
        return dataclasses.replace(self, scheduler=sched)


def shipped_config(name: str) -> CheckpointConfig:
    """The config a family ships (by config or family name: sd1, sd2 (512, epsilon), sd2-v (768, v) ...)."""
    if name not in shipped_configs():
        raise ModelError(f"no shipped checkpoint config {name!r}; shipped: {choices_text(shipped_configs())}")
    family_of_config(name)
    text = (resources.files("coreml_sd") / "data" / "configs" / f"{name}.json").read_text(encoding="utf-8")
    return CheckpointConfig.from_dict(json.loads(text))


def shipped_scheduler(name: str) -> SchedulerConfig:
    """Only the scheduler of a shipped config (a model without configs of its own, e.g. a Core ML
    folder another tool wrote, needs nothing else of it)."""
    if name not in shipped_configs():
        raise ModelError(f"no shipped checkpoint config {name!r}; shipped: {choices_text(shipped_configs())}")
    text = (resources.files("coreml_sd") / "data" / "configs" / f"{name}.json").read_text(encoding="utf-8")
    return SchedulerConfig.from_dict(json.loads(text)["scheduler"])


def as_config(config: "CheckpointConfig | Mapping | str | Path") -> CheckpointConfig:
    """Accept a CheckpointConfig, a dict in the JSON format, a shipped name, or a path to a JSON file."""
    if isinstance(config, CheckpointConfig):
        return config
    if isinstance(config, Mapping):
        return CheckpointConfig.from_dict(config)
    if isinstance(config, str) and config in shipped_configs():
        return shipped_config(config)
    return CheckpointConfig.from_json(Path(config).expanduser())


def sidecar_path(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.stem + SIDECAR_SUFFIX)
