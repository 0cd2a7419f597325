"""What a tensor file is, from its key names and tensor shapes alone (no weights read).

Sentinel keys tell the layout (`model.diffusion_model.` UNet, `first_stage_model.` VAE,
`cond_stage_model.transformer.` CLIP = SD 1.x, `cond_stage_model.model.` OpenCLIP = SD 2.x,
`conditioner.embedders.` = SDXL); shapes confirm the family (the width of the cross-attention
context: 768 SD 1.x, 1024 SD 2.x, 2048 SDXL) and the UNet's input channels (4; 9 inpainting;
8 instruct-pix2pix). SD 2.x files do not say whether they predict noise or velocity; see
`probe_v_prediction`. ControlNets (`control_model.*`, or their keys at the top level) are named by
the family whose context width and UNet block widths they have (`families.match_controlnet`).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from coreml_sd import families
from coreml_sd.checkpoint import controlnet_keymap, keymap
from coreml_sd.checkpoint.safeload import TensorInfo
from coreml_sd.errors import ModelError, choices_text

# UNet input channels of model kinds other than text-to-image, for messages about them.
CHANNEL_KINDS = {9: "an inpainting model", 8: "an instruct-pix2pix model"}
_ATTN2_K = re.compile(r"^model\.diffusion_model\..*attn2\.to_k\.weight$")
_LORA = re.compile(r"(^lora_(unet|te\d?)_)|(\.lora_(down|up|A|B)\.)|(\.hada_w1_a$)|(\.lokr_w1$)")
_DTYPE_NAMES = {"F16": "fp16", "F32": "fp32", "BF16": "bf16", "F64": "fp64"}


@dataclass(frozen=True)
class Detection:
    """What a file holds. `kind`: model | controlnet | vae | lora | embedding | unknown."""

    kind: str
    family: str | None = None  # a coreml_sd.families name (variants such as sd2-v are told apart later)
    text_encoder: str | None = None  # the text encoders' layouts: clip | openclip | clip+openclip
    has_unet: bool = False
    has_vae: bool = False
    has_text_encoder: bool = False
    has_ema: bool = False
    in_channels: int | None = None
    context_dim: int | None = None
    standard: bool = False  # the family's full-size widths: its shipped config fits
    dtype: str = "?"
    params: Mapping[str, int] = field(default_factory=dict)
    found: str = ""  # a short account of the keys, for messages about unknown files
    block_widths: tuple[int, ...] = ()  # a ControlNet's (its UNet's block_out_channels)
    layout: str | None = None  # a ControlNet's key prefix in the file ("control_model." or "")


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _account(shapes: Mapping[str, TensorInfo]) -> str:
    heads = Counter(".".join(k.split(".")[:2]) if k.count(".") >= 2 else k for k in shapes)
    top = ", ".join(f"{h}.* ({n})" for h, n in heads.most_common(4))
    return f"{len(shapes)} tensors: {top}" if shapes else "no tensors"


def _params(shapes: Mapping[str, TensorInfo]) -> dict[str, int]:
    groups = {"unet": (keymap.UNET_PREFIX,), "vae": (keymap.VAE_PREFIX,),
              "text_encoder": ("cond_stage_model.", "conditioner."),
              "ema": (keymap.EMA_PREFIX + "diffusion_model",)}
    out = {name: sum(_numel(i.shape) for k, i in shapes.items() if k.startswith(p)) for name, p in groups.items()}
    out["other"] = sum(_numel(i.shape) for i in shapes.values()) - sum(out.values())
    return {k: v for k, v in out.items() if v}


def _dominant_dtype(shapes: Mapping[str, TensorInfo]) -> str:
    sizes = Counter()
    for info in shapes.values():
        sizes[info.dtype] += _numel(info.shape)
    return _DTYPE_NAMES.get(sizes.most_common(1)[0][0], sizes.most_common(1)[0][0]) if sizes else "?"


def _context_dim(shapes: Mapping[str, TensorInfo]) -> int | None:
    for key, info in shapes.items():
        if _ATTN2_K.match(key) and len(info.shape) == 2:
            return int(info.shape[1])
    return None


def _text_prefixes(keys) -> list[str]:
    """The registered families' text-encoder key prefixes that the file's keys use."""
    known = {t.prefix for name in families.family_names() for t in families.get_family(name).text_encoders}
    return sorted(p for p in known if any(k.startswith(p) for k in keys))


def classify(shapes: Mapping[str, TensorInfo]) -> Detection:
    """Describe a file from its key -> (dtype, shape) table; never raises."""
    keys = list(shapes)
    common = dict(dtype=_dominant_dtype(shapes), params=_params(shapes), found=_account(shapes))
    control = controlnet_keymap.controlnet_prefix(keys)
    if control is not None:  # before the model test: ControlNet 1.0 files hold a whole SD model too
        return _controlnet(shapes, control, common)
    has_unet = any(k.startswith(keymap.UNET_PREFIX) for k in keys)
    prefixes = _text_prefixes(keys)
    if not has_unet and not prefixes and any(_LORA.search(k) for k in keys):
        return Detection("lora", **common)
    if has_unet or prefixes or any(k.startswith("conditioner.") for k in keys):
        return _model(shapes, has_unet, prefixes, common)
    if any(_LORA.search(k) for k in keys):
        return Detection("lora", **common)
    if any(k.startswith(("encoder.down.", "decoder.up.", "encoder.down_blocks.", "decoder.up_blocks.")) for k in keys) \
            or keymap.vae_prefix(keys) == keymap.VAE_PREFIX:
        return Detection("vae", has_vae=True, **common)
    if _looks_like_embedding(shapes):
        return Detection("embedding", **common)
    return Detection("unknown", **common)


def _model(shapes, has_unet: bool, prefixes: list[str], common: dict) -> Detection:
    ctx = _context_dim(shapes)
    conv_in = shapes.get(keymap.UNET_PREFIX + "input_blocks.0.0.weight")
    in_channels = int(conv_in.shape[1]) if conv_in and len(conv_in.shape) == 4 else None
    family, standard = families.match_single_file(prefixes, ctx, None)
    layouts = None
    if family is not None and in_channels is not None and in_channels != family.unet_in_channels:
        # an inpainting (or other) variant of the layout, told apart by the UNet's input channels
        family = next(iter(families.variants_of(family, in_channels=in_channels)), family)
    if family is not None:
        layouts = "+".join(t.layout for t in family.text_encoders)
        # A text encoder of one family with the UNet context width of another is no known model.
        if ctx is not None and not standard and any(ctx == f.context_dim for f in map(families.get_family,
                                                                                       families.family_names())):
            family = None
    return Detection(
        "model", family=family.name if family else None, text_encoder=layouts, has_unet=has_unet,
        has_vae=any(k.startswith(keymap.VAE_PREFIX + "decoder.") for k in shapes),
        has_text_encoder=bool(prefixes), has_ema=keymap.has_ema(shapes), in_channels=in_channels,
        context_dim=ctx, standard=standard, **common)


def _controlnet(shapes, prefix: str, common: dict) -> Detection:
    ctx = controlnet_keymap.context_width(shapes, prefix)
    try:
        widths, _ = controlnet_keymap.block_widths(shapes, prefix)
    except (ModelError, KeyError):
        widths = ()
    family = families.match_controlnet(ctx, widths)
    conv_in = shapes.get(controlnet_keymap.conv_in_key(prefix))
    within = controlnet_keymap.key_prefix(prefix)
    params = {"controlnet": sum(_numel(i.shape) for k, i in shapes.items() if k.startswith(within))}
    common = dict(common, params={**params, **{k: v for k, v in common["params"].items() if k != "other"}})
    return Detection("controlnet", family=family.name if family else None, context_dim=ctx, block_widths=widths,
                     in_channels=int(conv_in.shape[1]) if conv_in and len(conv_in.shape) == 4 else None,
                     standard=family is not None, layout=prefix, **common)


def _looks_like_embedding(shapes: Mapping[str, TensorInfo]) -> bool:
    if "emb_params" in shapes or any(k.startswith("string_to_param") for k in shapes):
        return True
    return 0 < len(shapes) <= 2 and all(len(i.shape) in (1, 2) and i.shape[-1] in (768, 1024, 1280)
                                        for i in shapes.values())


def require_model(det: Detection, path: Path) -> None:
    """Refuse anything that is not a text-to-image checkpoint of a registered family, saying what it is."""
    what = {"vae": "a VAE", "lora": "a LoRA", "embedding": "a textual-inversion embedding",
            "controlnet": "a ControlNet"}.get(det.kind)
    if what:
        flag = {"vae": "--vae", "lora": "--lora", "embedding": "--embedding", "controlnet": "--controlnet"}[det.kind]
        raise ModelError(f"{path} is {what}, not a Stable Diffusion model; pass it with {flag} next to a model")
    if det.kind != "model":
        raise ModelError(f"{path} is not a Stable Diffusion checkpoint: expected a model's keys "
                         f"(model.diffusion_model.*, cond_stage_model.* or conditioner.*), found {det.found}")
    if det.family is None:
        raise ModelError(f"{path}: unknown Stable Diffusion variant (text encoder keys {det.text_encoder or 'absent'}"
                         f", cross-attention width {det.context_dim}); supported families: "
                         f"{choices_text(_family_lines())}")
    if not det.has_unet:
        raise ModelError(f"{path} holds no UNet (model.diffusion_model.*): found {det.found}")
    family = families.get_family(det.family)
    if det.in_channels not in (None, family.unet_in_channels):
        kind = CHANNEL_KINDS.get(det.in_channels, "a UNet")
        raise ModelError(f"{path} is {kind} ({det.in_channels} input channels); {family.name} models with "
                         f"{family.unet_in_channels} input channels are supported")


def _family_lines() -> list[str]:
    out = []
    for name in families.family_names():
        f = families.get_family(name)
        if f.variant_of is None:
            out.append(f"{name} ({'+'.join(t.layout for t in f.text_encoders)}, {f.context_dim})")
    return out


def probe_v_prediction(unet) -> bool:
    """Whether an SD 2.x UNet predicts velocity (v) rather than noise, by running it once.

    At the last timestep a noisy latent is almost pure noise, so an epsilon model returns about
    its input, while a v model returns about minus its input. On a constant 0.5 latent the mean of
    (output - input) is near 0 for epsilon and below -1 for v (the same test AUTOMATIC1111 uses).
    """
    import torch

    p = next(unet.parameters())
    ctx_dim = unet.config.cross_attention_dim
    with torch.no_grad():
        x = torch.full((1, unet.config.in_channels, 8, 8), 0.5, dtype=p.dtype, device=p.device)
        cond = torch.full((1, 2, ctx_dim), 0.5, dtype=p.dtype, device=p.device)
        out = unet(x, torch.tensor([999], device=p.device), encoder_hidden_states=cond).sample
    return float((out.float() - x.float()).mean()) < -1.0
