"""Write diffusers modules as one single-file checkpoint in the original (CompVis / A1111) layout.

The inverse of the single-file source: the built-in tiny model ships this way, and the tests use
it to make community-shaped files (fp16/fp32, `.safetensors`/`.ckpt`, with EMA keys, SD1 CLIP or
SD2 OpenCLIP text encoder) from a diffusers model. The file is written next to its destination and
renamed at the end, so an interrupted write leaves nothing behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from coreml_sd.checkpoint import keymap
from coreml_sd.checkpoint.config import CheckpointConfig
from coreml_sd.checkpoint.safeload import own_memory
from coreml_sd.config import SchedulerConfig
from coreml_sd.errors import InputError, choices_text
from coreml_sd.families import get_family

DTYPES = ("fp16", "fp32")
FORMATS = ("safetensors", "ckpt")
# CLIPTextConfig arguments that shape the module; the rest of transformers' config is bookkeeping.
TEXT_CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                    "max_position_embeddings", "hidden_act", "layer_norm_eps", "projection_dim",
                    "bos_token_id", "eos_token_id", "pad_token_id")


def original_state_dict(text_encoder, unet, vae, *, family: str = "sd1", ema_unet=None,
                        text_encoder_2=None) -> dict[str, Any]:
    """All weights under their original names, text encoders laid out as `family` says;
    `ema_unet` adds the flat `model_ema.*` copy; `vae` None leaves the VAE out (a file without one)."""
    import torch

    spec = get_family(family)
    out = keymap.apply_mapper(keymap.unet_to_original(unet.config), unet.state_dict())
    if vae is not None:
        out.update(keymap.apply_mapper(keymap.vae_to_original(vae.config), vae.state_dict()))
    encoders = {"text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    for te in spec.text_encoders:
        if encoders[te.component] is None:
            raise InputError(f"family {family} needs a {te.component} module")
        out.update(keymap.text_to_original(encoders[te.component].state_dict(), te))
        if te.layout == "openclip" and te.pooled:
            # OpenCLIP files keep the whole CLIP text tower, its contrastive temperature too
            # (ln 100 once trained); nothing reads it for generation.
            out[te.prefix + "logit_scale"] = torch.tensor(4.6052)
    if ema_unet is not None:
        import torch

        ema = keymap.apply_mapper(keymap.unet_to_original(ema_unet.config), ema_unet.state_dict())
        out.update({keymap.ema_key(k): t for k, t in ema.items()})
        out["model_ema.decay"] = torch.tensor(0.9999)
        out["model_ema.num_updates"] = torch.tensor(0, dtype=torch.int32)
    return out


def write_original_checkpoint(text_encoder, unet, vae, path: str | Path, *, dtype: str = "fp16", ema: bool = False,
                              fmt: str = "safetensors", family: str = "sd1", ema_unet=None,
                              metadata: dict[str, str] | None = None, text_encoder_2=None,
                              with_vae: bool = True) -> Path:
    """Save (text_encoder, unet, vae) as one original-layout file.

    `ema=True` also writes the UNet's EMA copy (`model_ema.*`, flat names as CompVis does): the
    weights of `ema_unet` when given, else of `unet`. `fmt="ckpt"` writes a torch zip pickle wrapped
    in `{"state_dict": ...}` like CompVis/Lightning files. `with_vae=False` leaves the VAE out, as
    some community files do. Two-encoder families (SDXL) take `text_encoder_2`; a family without a
    first text encoder (the SDXL refiner) takes `text_encoder=None`.
    """
    import torch

    if dtype not in DTYPES:
        raise InputError(f"dtype is {dtype!r}; expected one of {choices_text(DTYPES)}")
    if fmt not in FORMATS:
        raise InputError(f"fmt is {fmt!r}; expected one of {choices_text(FORMATS)}")
    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
    state = original_state_dict(text_encoder, unet, vae if with_vae else None, family=family,
                                text_encoder_2=text_encoder_2,
                                ema_unet=(ema_unet if ema_unet is not None else unet) if ema else None)
    state = {k: (t.to(torch_dtype) if t.is_floating_point() and t.ndim > 0 else t).contiguous()
             for k, t in state.items()}
    from coreml_sd.outputs import replacing

    path = Path(path)
    with replacing(path) as tmp:
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file(own_memory(state), str(tmp), metadata=dict(metadata or {}, format="pt"))
        else:
            torch.save({"state_dict": state, "global_step": 0}, tmp)
    return path


def config_from_modules(text_encoder, unet, vae, *, family: str = "sd1", scheduler: SchedulerConfig | None = None,
                        pad_token: str | None = None, description: str = "", text_encoder_2=None) -> CheckpointConfig:
    """The checkpoint config that loads a file written from these modules back into the same shapes."""
    def text_config(module):
        text = module.config.to_dict()
        return {k: text[k] for k in TEXT_CONFIG_KEYS if k in text}

    return CheckpointConfig(
        family=family,
        unet={k: _plain(v) for k, v in unet.config.items() if not k.startswith("_")},
        vae={k: _plain(v) for k, v in vae.config.items() if not k.startswith("_")},
        text_encoder=text_config(text_encoder) if text_encoder is not None else None,
        text_encoder_2=text_config(text_encoder_2) if text_encoder_2 is not None else None,
        scheduler=scheduler or SchedulerConfig(),
        pad_token=pad_token,
        description=description,
    )


def _plain(value):
    return list(value) if isinstance(value, tuple) else value
