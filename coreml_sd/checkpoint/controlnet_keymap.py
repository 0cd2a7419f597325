"""ControlNet single files (lllyasviel's `cldm` layout, as A1111 and ComfyUI load them) <-> diffusers.

A ControlNet is a trainable copy of the UNet's input half, so its original names are the UNet's
(`input_blocks.*`, `middle_block.*`, `time_embed.*`, `label_emb.*`) plus three of its own:

    input_hint_block.{0,2,4,...}   the conditioning image's convolutions   controlnet_cond_embedding.*
    zero_convs.{i}.0               one 1x1 "zero" conv per residual        controlnet_down_blocks.{i}
    middle_block_out.0             the middle block's                      controlnet_mid_block

Files keep them under `control_model.` (ControlNet 1.0 files also hold a whole SD model beside
it, which is not read) or at the top level (the "extracted" files); some single files (A1111's
`diffusers_xl_*` ControlNets) are saved with diffusers' own names instead (layout `DIFFUSERS`,
read as they are). The mapping is a pure mapper
`(diffusers key, tensor) -> [(original key, tensor)]` built from the config; reading inverts it
over the keys a model of that config has, so loading is strict both ways: a file key no module
key maps to, or a module key without a file key, is named. Nothing here imports torch.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

from coreml_sd.checkpoint.keymap import Mapper, _lookup, encoder_table
from coreml_sd.errors import ModelError

CONTROL_PREFIX = "control_model."
PREFIXES = (CONTROL_PREFIX, "")
DIFFUSERS = "diffusers"  # the layout of a single file in diffusers' own names
_DIFFUSERS_SENTINELS = ("controlnet_cond_embedding.conv_in.weight", "controlnet_down_blocks.0.weight")
# Keys that only a ControlNet has (either prefix); `difference` marks the old "diff" files, whose
# weights are differences to SD 1.5's and need that model added first.
SENTINELS = ("input_hint_block.0.weight", "zero_convs.0.0.weight")
DIFFERENCE_KEY = "difference"
# diffusers ControlNetModel config entries that are the ControlNet's own (the rest are its UNet's).
OWN_CONFIG = ("conditioning_channels", "conditioning_embedding_out_channels", "global_pool_conditions",
              "controlnet_conditioning_channel_order")
_HINT = re.compile(r"^input_hint_block\.(\d+)\.weight$")
_ATTN2_K = re.compile(r"^input_blocks\.\d+\.1\.transformer_blocks\.0\.attn2\.to_k\.weight$")
_DIFFUSERS_ATTN2_K = re.compile(r"^down_blocks\.\d+\.attentions\.\d+\.transformer_blocks\.0\.attn2\.to_k\.weight$")


def controlnet_prefix(keys: Iterable[str]) -> str | None:
    """Where a file keeps its ControlNet ("control_model.", "", or DIFFUSERS for diffusers' names), or None."""
    keys = set(keys)
    for prefix in PREFIXES:
        if all(prefix + s in keys for s in SENTINELS):
            return prefix
    return DIFFUSERS if all(s in keys for s in _DIFFUSERS_SENTINELS) else None


def conv_in_key(prefix: str) -> str:
    return "conv_in.weight" if prefix == DIFFUSERS else prefix + "input_blocks.0.0.weight"


def key_prefix(prefix: str) -> str:
    """The prefix every key of the layout starts with ("" for the extracted and diffusers layouts)."""
    return "" if prefix == DIFFUSERS else prefix


def is_difference_file(keys: Iterable[str]) -> bool:
    return DIFFERENCE_KEY in set(keys)


# ---------------------------------------------------------------- diffusers -> original

def _table(config: Mapping) -> dict[str, tuple[str, dict]]:
    table = encoder_table(config)
    hint = len(config.get("conditioning_embedding_out_channels") or (16, 32, 96, 256))
    table["controlnet_cond_embedding.conv_in"] = ("input_hint_block.0", {})
    for j in range(2 * (hint - 1)):  # conv (c -> c), conv (c -> next c, stride 2), each after a SiLU
        table[f"controlnet_cond_embedding.blocks.{j}"] = (f"input_hint_block.{2 * (j + 1)}", {})
    table["controlnet_cond_embedding.conv_out"] = (f"input_hint_block.{2 * (2 * (hint - 1) + 1)}", {})
    for i in range(residual_count(config) - 1):
        table[f"controlnet_down_blocks.{i}"] = (f"zero_convs.{i}.0", {})
    table["controlnet_mid_block"] = ("middle_block_out.0", {})
    return table


def residual_count(config: Mapping) -> int:
    """How many residuals a ControlNet of this config returns: conv_in's, one per down layer, one per
    downsampler, and the middle block's (13 for SD 1.x/2.x, 10 for SDXL)."""
    n, lpb = len(config["block_out_channels"]), int(config["layers_per_block"])
    return 1 + n * lpb + (n - 1) + 1


def controlnet_to_original(config: Mapping, prefix: str = CONTROL_PREFIX) -> Mapper:
    table = _table(config)
    return lambda key, t: [(prefix + _lookup(table, key, "ControlNet"), t)]


# ---------------------------------------------------------------- original -> diffusers

def controlnet_from_original(sd: Mapping[str, Any], expected: Iterable[str], config: Mapping,
                             prefix: str) -> dict[str, Any]:
    """The ControlNet weights of a file under the diffusers names `expected` (a module's state-dict
    keys); a ModelError names missing and unexpected keys. Tensors are not copied."""
    names: dict[str, str] = {}
    if prefix == DIFFUSERS:
        names = {key: key for key in expected}
        prefix = ""
    else:
        mapper = controlnet_to_original(config, prefix)
        for key in expected:
            for original, _ in mapper(key, None):
                names[original] = key
    present = {k for k in sd if k.startswith(prefix)} if prefix else set(sd)
    missing = sorted(set(names) - present)
    unexpected = sorted(present - set(names))
    if missing or unexpected:
        parts = ([f"missing {len(missing)} (e.g. {', '.join(missing[:3])})"] if missing else []) + \
                ([f"unexpected {len(unexpected)} (e.g. {', '.join(unexpected[:3])})"] if unexpected else [])
        raise ModelError("ControlNet weights do not match the config: " + "; ".join(parts))
    return {key: sd[original] for original, key in names.items()}


# ---------------------------------------------------------------- what the shapes tell

def hint_channels(shapes: Mapping[str, Any], prefix: str) -> tuple[int, tuple[int, ...]]:
    """(conditioning image channels, conditioning_embedding_out_channels) from the hint block's shapes."""
    if prefix == DIFFUSERS:
        return _diffusers_hint(shapes)
    convs = sorted(int(m.group(1)) for k in shapes if k.startswith(prefix)
                   and (m := _HINT.match(k[len(prefix):])))
    if len(convs) < 2 or len(convs) % 2:
        raise ModelError(f"the ControlNet's input_hint_block has {len(convs)} convolutions; expected an even "
                         f"number of at least 2 (conv_in, pairs of blocks, conv_out)")
    first = _shape(shapes, f"{prefix}input_hint_block.{convs[0]}.weight")
    blocks = convs[1:-1]
    widths = (first[0], *(_shape(shapes, f"{prefix}input_hint_block.{i}.weight")[0] for i in blocks[1::2]))
    return first[1], tuple(int(w) for w in widths)


def _diffusers_hint(shapes: Mapping[str, Any]) -> tuple[int, tuple[int, ...]]:
    first = _shape(shapes, "controlnet_cond_embedding.conv_in.weight")
    blocks = sorted(int(k.split(".")[2]) for k in shapes
                    if k.startswith("controlnet_cond_embedding.blocks.") and k.endswith(".weight"))
    widths = (first[0], *(_shape(shapes, f"controlnet_cond_embedding.blocks.{j}.weight")[0] for j in blocks[1::2]))
    return first[1], tuple(int(w) for w in widths)


def context_width(shapes: Mapping[str, Any], prefix: str) -> int | None:
    pattern = _DIFFUSERS_ATTN2_K if prefix == DIFFUSERS else _ATTN2_K
    prefix = "" if prefix == DIFFUSERS else prefix
    for key in shapes:
        if key.startswith(prefix) and pattern.match(key[len(prefix):]):
            return int(_shape(shapes, key)[1])
    return None


def block_widths(shapes: Mapping[str, Any], prefix: str) -> tuple[tuple[int, ...], int]:
    """(block_out_channels, layers_per_block) from the input blocks' shapes."""
    if prefix == DIFFUSERS:
        levels = sorted({int(k.split(".")[1]) for k in shapes if k.startswith("down_blocks.")})
        lpb = len({k.split(".")[3] for k in shapes if k.startswith("down_blocks.0.resnets.")})
        return tuple(int(_shape(shapes, f"down_blocks.{i}.resnets.0.conv2.weight")[0]) for i in levels), lpb
    blocks = {int(k[len(prefix):].split(".")[1]) for k in shapes
              if k.startswith(prefix + "input_blocks.")}
    downsamplers = sum(1 for b in blocks if f"{prefix}input_blocks.{b}.0.op.weight" in shapes)
    levels = downsamplers + 1
    layers = len(blocks) - 1 - downsamplers  # without conv_in and the downsamplers
    if layers % levels or not layers:
        raise ModelError(f"the ControlNet's {layers} input layers do not divide into {levels} levels")
    lpb = layers // levels
    widths = tuple(int(_shape(shapes, f"{prefix}input_blocks.{1 + i * (lpb + 1)}.0.out_layers.3.weight")[0])
                   for i in range(levels))
    return widths, lpb


def config_from_unet(unet_config: Mapping[str, Any], shapes: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """A diffusers ControlNetModel config for a file made for a UNet of `unet_config` (its family's
    shipped config): the UNet's entries a ControlNet takes (as diffusers' ControlNetModel.from_unet)
    and the hint block's widths from the file."""
    cond_channels, hint = hint_channels(shapes, prefix)
    keep = ("in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "only_cross_attention",
            "block_out_channels", "layers_per_block", "downsample_padding", "mid_block_scale_factor", "act_fn",
            "norm_num_groups", "norm_eps", "cross_attention_dim", "transformer_layers_per_block",
            "attention_head_dim", "num_attention_heads", "use_linear_projection", "class_embed_type",
            "addition_embed_type", "addition_time_embed_dim", "num_class_embeds", "upcast_attention",
            "resnet_time_scale_shift", "projection_class_embeddings_input_dim", "encoder_hid_dim",
            "encoder_hid_dim_type")
    config = {k: unet_config[k] for k in keep if k in unet_config}
    config.update(conditioning_channels=cond_channels, conditioning_embedding_out_channels=list(hint))
    return config


def _shape(shapes: Mapping[str, Any], key: str) -> tuple[int, ...]:
    value = shapes[key]
    return tuple(getattr(value, "shape", value))
