"""A diffusers-format model folder (`model_index.json`, `unet/`, `vae/`, `text_encoder/` ...) as a model source.

The family comes from the registry (`families.match_diffusers`): how many text encoders the folder
has and what its UNet config declares. Each text encoder sits in the folder under its component
name (`text_encoder`, `text_encoder_2`) with its tokenizer beside it (`tokenizer`, `tokenizer_2`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from coreml_sd.config import SchedulerConfig, read_json
from coreml_sd.errors import ModelError
from coreml_sd.families import match_diffusers
from coreml_sd.model_source import ModelInfo, Origin, SourceBase, TorchModules
from coreml_sd.tokenizer import CLIPTokenizer, TokenizerFiles, bundled_files

REQUIRED = ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
            "scheduler/scheduler_config.json")
# transformers classes a diffusers folder's text encoders are saved as (config.json "architectures").
TEXT_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")


def tokenizer_folder(component: str) -> str:
    return component.replace("text_encoder", "tokenizer")


class DiffusersFolder(SourceBase):
    """A diffusers-format folder (see the module docstring)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        missing = [p for p in REQUIRED if not (self.path / p).is_file()]
        if missing:
            raise ModelError(f"{self.path} is not a complete diffusers model folder: missing {', '.join(missing)}")
        self.info = self._read_info()

    def _read_info(self) -> ModelInfo:
        unet = read_json(self.path / "unet" / "config.json")
        vae = read_json(self.path / "vae" / "config.json")
        encoders = 2 if (self.path / "text_encoder_2" / "config.json").is_file() else 1
        family = match_diffusers(encoders, unet)
        vae_factor = 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1)
        files, pad = self._tokenizer_facts("text_encoder")
        return ModelInfo(
            name=self.path.name, kind="diffusers", path=self.path, family=family.name,
            scheduler=SchedulerConfig.from_json(self.path / "scheduler" / "scheduler_config.json"),
            sample_size=int(unet.get("sample_size", 64)) * vae_factor, vae_scale_factor=vae_factor,
            latent_channels=int(unet.get("out_channels", 4)),
            scaling_factor=float(vae.get("scaling_factor", family.scaling_factor)),
            text_hidden_size=int(unet.get("cross_attention_dim", family.context_dim)),
            unet_block_widths=tuple(int(c) for c in unet.get("block_out_channels", ())) or None,
            tokenizer_files=files, pad_token=pad or family.text_encoders[0].pad_token,
        )

    def _tokenizer_facts(self, component: str) -> tuple[TokenizerFiles, str | None]:
        folder = self.path / tokenizer_folder(component)
        files = bundled_files()
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            files = TokenizerFiles(folder / "vocab.json", folder / "merges.txt")
        pad = None
        if (folder / "tokenizer_config.json").is_file():
            pad = _token_text(read_json(folder / "tokenizer_config.json").get("pad_token"))
        return files, pad

    @property
    def origin(self) -> Origin:
        return Origin(self.path, "diffusers")

    def tokenizer(self, component: str = "text_encoder") -> CLIPTokenizer:
        files, pad = self._tokenizer_facts(component)
        return CLIPTokenizer(files, pad_token=pad or self.info.spec.text_encoder(component).pad_token)

    def torch_modules(self, *, device: str, dtype: Any) -> TorchModules:
        from diffusers import AutoencoderKL, UNet2DConditionModel

        from coreml_sd.checkpoint.safeload import check_folder_weights

        check_folder_weights(self.path)  # a hostile .bin is refused with our message, before transformers sees it
        kw = dict(torch_dtype=dtype, local_files_only=True)
        try:
            encoders = {t.component: self._text_encoder(t.component, kw) for t in self.info.spec.text_encoders}
            unet = UNet2DConditionModel.from_pretrained(self.path / "unet", **kw)
            vae = AutoencoderKL.from_pretrained(self.path / "vae", **kw)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelError(f"could not load the diffusers model in {self.path}: {exc}") from exc
        mods = TorchModules(unet=unet, vae=vae, **encoders)
        for m in (unet, vae, *encoders.values()):
            m.to(device).eval().requires_grad_(False)
        return mods

    def _text_encoder(self, component: str, kw: dict):
        import transformers

        config = read_json(self.path / component / "config.json")
        name = (config.get("architectures") or ["CLIPTextModel"])[0]
        if name not in TEXT_CLASSES:
            raise ModelError(f"{self.path / component}: text encoder class {name!r} is not supported; "
                             f"supported: {', '.join(TEXT_CLASSES)}")
        return getattr(transformers, name).from_pretrained(self.path / component, **kw)


def _token_text(token) -> str | None:
    if isinstance(token, dict):  # {"content": "!", ...} in some tokenizer configs
        token = token.get("content")
    return token if isinstance(token, str) else None
