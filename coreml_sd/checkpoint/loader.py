"""Build diffusers modules from a config and fill them with a file's tensors, without copies.

Modules are created on the `meta` device (no random initialisation, no memory) and the tensors are
assigned, not copied, so a memory-mapped fp16 file loaded as fp16 costs its page cache and nothing
more. Only a dtype change (fp16 file, fp32 requested) copies, and then tensor by tensor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from coreml_sd.checkpoint import keymap
from coreml_sd.checkpoint.config import CheckpointConfig
from coreml_sd.checkpoint.writer import TEXT_CONFIG_KEYS
from coreml_sd.errors import ModelError, choices_text


def new_unet(config: Mapping):
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return _construct("unet", UNet2DConditionModel, config)


def new_vae(config: Mapping):
    import torch
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        return _construct("vae", AutoencoderKL, config)


def new_text_encoder(config: Mapping, *, projection: bool = False):
    """A CLIP text model (with its pooled-output projection where the family uses it)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    known = set(CLIPTextConfig().to_dict()) | set(TEXT_CONFIG_KEYS)
    unknown = sorted(set(config) - known)
    if unknown:
        raise ModelError(f"text_encoder config: unknown keys {choices_text(unknown)}")
    with torch.device("meta"):
        return (CLIPTextModelWithProjection if projection else CLIPTextModel)(CLIPTextConfig(**config))


def _construct(what: str, cls, config: Mapping):
    try:
        return cls(**dict(config))
    except (TypeError, ValueError) as exc:
        raise ModelError(f"{what} config does not build a {cls.__name__}: {exc}") from None


def fill(module, state: Mapping[str, Any], what: str, *, dtype=None, device: str = "cpu"):
    """Assign `state` to a meta-device module strictly (names and shapes), then move/cast it."""
    import torch

    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    keymap.check_strict(what, expected, state)
    if dtype is not None:  # per tensor: only tensors of another dtype are copied
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    module.load_state_dict(dict(state), strict=True, assign=True)
    for name, buf in list(module.named_buffers()):
        if buf.is_meta:  # non-persistent buffers are not in files; CLIP's position ids are the one known
            if not name.endswith("position_ids"):
                raise ModelError(f"{what}: buffer {name} has no value in the file")
            owner = module.get_submodule(name.rsplit(".", 1)[0])
            owner.register_buffer("position_ids", torch.arange(buf.shape[-1]).expand(buf.shape), persistent=False)
    return module.to(device).eval().requires_grad_(False)


def build_components(sd: Mapping[str, Any], config: CheckpointConfig, *, ema: bool = False, dtype=None,
                     device: str = "cpu", with_vae: bool = True) -> dict[str, Any]:
    """diffusers modules (by component name) from an original-layout state dict; the VAE only if asked."""
    mods = {"unet": fill(new_unet(config.unet), keymap.unet_from_original(sd, config.unet, ema=ema), "UNet",
                         dtype=dtype, device=device)}
    for spec in config.spec.text_encoders:
        text_config = config.text_config(spec.component)
        # Only OpenCLIP files store a projection of the pooled output (SDXL's second encoder);
        # a CLIP encoder's pooled output is its pooler output.
        module = new_text_encoder(text_config, projection=spec.pooled and spec.layout == "openclip")
        state = keymap.text_from_original(sd, text_config, spec)
        if any(k.startswith("text_model.") for k in module.state_dict()):
            state = {k if k == "text_projection.weight" else "text_model." + k: v for k, v in state.items()}
        mods[spec.component] = fill(module, state, spec.component.replace("_", " "), dtype=dtype, device=device)
    if with_vae:
        mods["vae"] = fill(new_vae(config.vae), keymap.vae_from_original(sd, config.vae, keymap.VAE_PREFIX), "VAE",
                           dtype=dtype, device=device)
    return mods


def read_original(path: str | Path, config: CheckpointConfig, *, ema: bool = False, dtype=None,
                  device: str = "cpu") -> dict[str, Any]:
    """(text_encoder, unet, vae) diffusers modules from an original-layout file, by name."""
    from coreml_sd.checkpoint.safeload import flat_state_dict, load_tensor_file

    path = Path(path)
    obj, _ = load_tensor_file(path)
    return build_components(flat_state_dict(obj, path), config, ema=ema, dtype=dtype, device=device)
