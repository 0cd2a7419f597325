"""Key layouts: the original single-file layout (CompVis / AUTOMATIC1111 / Civitai) <-> diffusers.

Reading uses diffusers' own single-file converters (`convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`): they
only rename and slice, so memory-mapped tensors stay memory-mapped. None of them is given a hub
id or a model to fetch; configs come from `checkpoint/config.py`.

Writing (diffusers -> original) is written here as pure mappers `(key, tensor) -> [(key, tensor)]`
built from a module's config. The same mappers make reading strict: every file key under a
component's prefix must be what one of the loaded diffusers keys maps back to, so a stray or
misspelt key in a file is named instead of silently ignored.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable, Iterable, Mapping

from coreml_sd.errors import ModelError

UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
VAE_PREFIX = "first_stage_model."
# Text encoders sit under a family's prefix (coreml_sd.families.TextEncoderSpec.prefix): CLIP files
# as transformers' CLIPTextModel below it ("<prefix>text_model."), OpenCLIP files in their own
# names with q/k/v fused. Keys of files that are not weights of a component (noise-schedule
# buffers, EMA bookkeeping) are simply never read: every reader picks its component's prefix.
IGNORED_PREFIXES = ("first_stage_model.loss.", "loss.")  # the VAE's training discriminator

Mapper = Callable[[str, Any], list[tuple[str, Any]]]
_RESNET_RENAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                   "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET_RENAMES = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN_RENAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPENCLIP_RENAMES = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                     "self_attn.out_proj": "attn.out_proj"}


# ---------------------------------------------------------------- diffusers -> original (writing)

def encoder_table(config: Mapping) -> dict[str, tuple[str, dict]]:
    """The UNet's input half (conv_in, time and extra embeddings, down blocks, middle block): diffusers
    module prefix -> (original prefix, renames of the next name part). A ControlNet is a copy of it."""
    lpb, n = int(config["layers_per_block"]), len(config["block_out_channels"])
    res, plain = _RESNET_RENAMES, {}
    table = {"conv_in": ("input_blocks.0.0", plain), "time_embedding.linear_1": ("time_embed.0", plain),
             "time_embedding.linear_2": ("time_embed.2", plain), "mid_block.resnets.0": ("middle_block.0", res),
             "mid_block.attentions.0": ("middle_block.1", plain), "mid_block.resnets.1": ("middle_block.2", res),
             # an embedding of extra inputs added to the time embedding (class labels; SDXL's text_time)
             "class_embedding.linear_1": ("label_emb.0.0", plain), "class_embedding.linear_2": ("label_emb.0.2", plain),
             "add_embedding.linear_1": ("label_emb.0.0", plain), "add_embedding.linear_2": ("label_emb.0.2", plain)}
    for i in range(n):
        for j in range(lpb):  # input_blocks: conv_in, then per level lpb layers and a downsampler
            k = 1 + i * (lpb + 1) + j
            table[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{k}.0", res)
            table[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{k}.1", plain)
        if i < n - 1:
            table[f"down_blocks.{i}.downsamplers.0.conv"] = (f"input_blocks.{1 + i * (lpb + 1) + lpb}.0.op", plain)
    return table


def _unet_table(config: Mapping) -> dict[str, tuple[str, dict]]:
    """diffusers module prefix -> (original prefix, renames of the next name part) for a UNet config."""
    lpb, n = int(config["layers_per_block"]), len(config["block_out_channels"])
    res, plain = _RESNET_RENAMES, {}
    table = encoder_table(config)
    table.update({"conv_norm_out": ("out.0", plain), "conv_out": ("out.2", plain)})
    for i in range(n):
        for j in range(lpb + 1):  # output_blocks: per level lpb+1 layers, the last with the upsampler
            k = i * (lpb + 1) + j
            table[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{k}.0", res)
            table[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{k}.1", plain)
        if i < n - 1:
            slot = 2 if "CrossAttn" in config["up_block_types"][i] else 1
            table[f"up_blocks.{i}.upsamplers.0.conv"] = (f"output_blocks.{i * (lpb + 1) + lpb}.{slot}.conv", plain)
    return table


def _vae_table(config: Mapping) -> dict[str, tuple[str, dict]]:
    n, lpb = len(config["block_out_channels"]), int(config["layers_per_block"])
    res, attn, plain = _VAE_RESNET_RENAMES, _VAE_ATTN_RENAMES, {}
    table = {}
    for part in ("encoder", "decoder"):
        for name in ("conv_in", "conv_out"):
            table[f"{part}.{name}"] = (f"{part}.{name}", plain)
        table[f"{part}.conv_norm_out"] = (f"{part}.norm_out", plain)
        table[f"{part}.mid_block.resnets.0"] = (f"{part}.mid.block_1", res)
        table[f"{part}.mid_block.resnets.1"] = (f"{part}.mid.block_2", res)
        table[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", attn)
    for i in range(n):
        for j in range(lpb):
            table[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", res)
        table[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (f"encoder.down.{i}.downsample.conv", plain)
        for j in range(lpb + 1):  # the decoder's levels are numbered from the bottom in the original
            table[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"decoder.up.{n - 1 - i}.block.{j}", res)
        table[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (f"decoder.up.{n - 1 - i}.upsample.conv", plain)
    table["quant_conv"] = ("quant_conv", plain)
    table["post_quant_conv"] = ("post_quant_conv", plain)
    return table


def _lookup(table: Mapping[str, tuple[str, dict]], key: str, what: str) -> str:
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        hit = table.get(".".join(parts[:cut]))
        if hit is None:
            continue
        prefix, renames = hit
        rest = ".".join(parts[cut:])
        for old, new in renames.items():
            if rest.startswith(old + "."):
                rest = new + rest[len(old):]
                break
        return f"{prefix}.{rest}"
    raise ModelError(f"no original-layout name for {what} key {key!r} (is the config right for this model?)")


def unet_to_original(config: Mapping) -> Mapper:
    table = _unet_table(config)
    return lambda key, t: [(UNET_PREFIX + _lookup(table, key, "UNet"), t)]


def vae_to_original(config: Mapping, prefix: str = VAE_PREFIX) -> Mapper:
    table = _vae_table(config)

    def mapper(key: str, t):
        name = _lookup(table, key, "VAE")
        if ".mid.attn_1." in name and name.endswith("weight") and t.ndim == 2:
            t = t[:, :, None, None]  # the original attention projections are 1x1 convolutions
        return [(prefix + name, t)]

    return mapper


def clip_to_original(prefix: str) -> Mapper:
    """transformers' CLIPTextModel keys (without `text_model.`) -> a CLIP text encoder under `prefix`."""
    def mapper(key: str, t) -> list[tuple[str, Any]]:
        if key == "embeddings.position_ids":
            return []
        return [(prefix + "text_model." + key, t)]

    return mapper


def text_to_original(state: Mapping[str, Any], spec) -> dict[str, Any]:
    """A text encoder's state dict (diffusers names) in the single-file layout of `spec` (TextEncoderSpec)."""
    # transformers' CLIPTextModelWithProjection keeps its layers under `text_model.`, CLIPTextModel not.
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    if spec.layout == "clip":
        return apply_mapper(clip_to_original(spec.prefix), state)
    return openclip_to_original(state, spec.prefix)


def openclip_to_original(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """A diffusers CLIPTextModel state dict in OpenCLIP layout under `prefix`: q/k/v fused into in_proj."""
    import torch

    out, qkv = {}, {}
    for key, t in state.items():
        key = key.removeprefix("text_model.")
        if key == "embeddings.position_ids":
            continue
        if key == "embeddings.token_embedding.weight":
            out[prefix + "token_embedding.weight"] = t
        elif key == "embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = t
        elif key.startswith("final_layer_norm."):
            out[prefix + "ln_final." + key.split(".")[-1]] = t
        elif key == "text_projection.weight":  # CLIPTextModelWithProjection: OpenCLIP stores x @ P
            out[prefix + "text_projection"] = t.T.contiguous()
        elif key.startswith("encoder.layers."):
            _, _, idx, rest = key.split(".", 3)
            base = f"{prefix}transformer.resblocks.{idx}."
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                qkv.setdefault((base, rest.split(".")[-1]), {})[rest.split(".")[1]] = t
                continue
            for old, new in _OPENCLIP_RENAMES.items():
                if rest.startswith(old + "."):
                    rest = new + rest[len(old):]
                    break
            else:
                raise ModelError(f"no OpenCLIP name for text-encoder key {key!r}")
            out[base + rest] = t
        else:
            raise ModelError(f"no OpenCLIP name for text-encoder key {key!r}")
    for (base, kind), parts in qkv.items():
        out[base + f"attn.in_proj_{kind}"] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]])
    return out


def apply_mapper(mapper: Mapper, state: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, t in state.items():
        for new_key, new_t in mapper(key, t):
            if new_key in out:
                raise ModelError(f"two keys map to {new_key!r} (the last from {key!r})")
            out[new_key] = new_t
    return out


def ema_key(original_key: str) -> str:
    """CompVis stores EMA weights flat: model.diffusion_model.a.b.weight -> model_ema.diffusion_modelabweight."""
    return EMA_PREFIX + original_key[len("model."):].replace(".", "")


# ---------------------------------------------------------------- original -> diffusers (reading)

def ema_as_unet(sd: Mapping[str, Any]) -> dict[str, Any]:
    """The EMA copy of the UNet under the non-EMA names, so the UNet converter reads it."""
    out, missing = {}, []
    for key in sd:
        if key.startswith(UNET_PREFIX):
            if ema_key(key) in sd:
                out[key] = sd[ema_key(key)]
            else:
                missing.append(ema_key(key))
    if missing:
        raise ModelError(f"EMA weights requested, but {len(missing)} are missing, e.g. {missing[0]}")
    return out


def has_ema(keys: Iterable[str]) -> bool:
    return any(k.startswith(EMA_PREFIX + "diffusion_model") for k in keys)


def unet_from_original(sd: Mapping[str, Any], config: Mapping, *, ema: bool = False) -> dict[str, Any]:
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    source = ema_as_unet(sd) if ema else {k: v for k, v in sd.items() if k.startswith(UNET_PREFIX)}
    converted = convert_ldm_unet_checkpoint(source, dict(config), extract_ema=False)
    _check_round_trip("UNet", source, converted, unet_to_original(config))
    return converted


def vae_prefix(keys: Iterable[str]) -> str:
    """Where the VAE sits: inside a full checkpoint, or at the top of a VAE file ('' )."""
    keys = list(keys)
    for prefix in (VAE_PREFIX, "vae."):
        if any(k.startswith(prefix + "decoder.") for k in keys):
            return prefix
    return ""


def vae_from_original(sd: Mapping[str, Any], config: Mapping, prefix: str) -> dict[str, Any]:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    source = {VAE_PREFIX + k[len(prefix):]: v for k, v in sd.items()
              if k.startswith(prefix) and not k.startswith(IGNORED_PREFIXES) and k[len(prefix):].split(".")[0]
              in ("encoder", "decoder", "quant_conv", "post_quant_conv")}
    converted = convert_ldm_vae_checkpoint(source, dict(config))
    _check_round_trip("VAE", source, converted, vae_to_original(config))
    return converted


def text_from_original(sd: Mapping[str, Any], config: Mapping, spec) -> dict[str, Any]:
    """A text encoder's weights (diffusers names) from a single file, as `spec` (TextEncoderSpec) lays them out."""
    if spec.layout == "clip":
        return _clip_from_original(sd, spec.prefix)
    return _openclip_from_original(sd, config, spec)


def _clip_from_original(sd: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    # transformers' CLIPTextModel keys below the prefix; files written by transformers < 4.x lack
    # the `text_model.` level: give it back. (The keys are renamed only, so mmap stays mmap.)
    full = prefix + "text_model."
    source = {}
    for k, v in sd.items():
        if k.startswith(prefix) and not k.endswith("position_ids"):
            source[k if k.startswith(full) else full + k[len(prefix):]] = v
    converted = {k[len(full):]: v for k, v in source.items()}
    _check_round_trip("text encoder", source, converted, clip_to_original(prefix))
    return converted


def _openclip_from_original(sd: Mapping[str, Any], config: Mapping, spec) -> dict[str, Any]:
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    prefix = spec.prefix
    layers = openclip_layers(sd, prefix)
    wanted = int(config["num_hidden_layers"])
    if layers not in (wanted, wanted + 1):
        raise ModelError(f"the OpenCLIP text encoder in the file has {layers} layers; the config expects "
                         f"{wanted} (or {wanted + 1}, of which the last is unused)")
    dropped = f"{prefix}transformer.resblocks.{layers - 1}." if layers == wanted + 1 else None
    # The projection is read only by encoders whose pooled output is used (SDXL's second).
    unused = ((prefix + "logit_scale",) if spec.pooled else (prefix + "text_projection", prefix + "logit_scale"))
    source = {k: v for k, v in sd.items() if k.startswith(prefix) and k not in unused
              and not (dropped and k.startswith(dropped))}
    # diffusers reads the projection width from the model's config; only that is needed here.
    stub = SimpleNamespace(config=SimpleNamespace(hidden_size=int(config["hidden_size"])))
    converted = {k.removeprefix("text_model."): v
                 for k, v in convert_open_clip_checkpoint(stub, source, prefix=prefix).items()}
    back = openclip_to_original(converted, prefix)
    stray = sorted(set(source) - set(back))
    if stray:
        raise ModelError(f"text encoder: {len(stray)} keys in the file were not understood, e.g. {stray[:3]}")
    return converted


def openclip_layers(keys: Iterable[str], prefix: str) -> int:
    prefix = prefix + "transformer.resblocks."
    found = {int(k[len(prefix):].split(".")[0]) for k in keys if k.startswith(prefix)}
    return max(found) + 1 if found else 0


def _check_round_trip(what: str, source: Mapping, converted: Mapping, mapper: Mapper) -> None:
    """Every source key must be one that a converted key maps back to: nothing read is dropped."""
    try:
        back = {k for key, t in converted.items() if t is not None for k, _ in mapper(key, t)}
    except ModelError as exc:
        raise ModelError(f"{what}: {exc}") from None
    stray = sorted(set(source) - back)
    if stray:
        raise ModelError(f"{what}: {len(stray)} keys in the file were not understood, e.g. {', '.join(stray[:3])}")


def check_strict(what: str, expected: Mapping[str, tuple], got: Mapping[str, Any]) -> None:
    """Name missing and unexpected keys and shape mismatches against a module's own state dict shapes."""
    problems = []
    missing = sorted(k for k in expected if got.get(k) is None)
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(k for k in expected if got.get(k) is not None and tuple(got[k].shape) != tuple(expected[k]))
    if missing:
        problems.append(f"missing {len(missing)} (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        k = wrong[0]
        problems.append(f"{len(wrong)} with another shape (e.g. {k}: file {tuple(got[k].shape)}, "
                        f"model {tuple(expected[k])})")
    if problems:
        raise ModelError(f"{what} weights do not match the config: " + "; ".join(problems))
