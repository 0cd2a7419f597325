"""kohya / AUTOMATIC1111 LoRA files merged into the weights: W += strength * alpha/rank * up @ down.

Key format: `<module>.lora_down.weight`, `<module>.lora_up.weight`, `<module>.alpha`, where
`<module>` is a layer's dotted path with underscores, prefixed `lora_unet_` or, for a text encoder,
its family's prefix (`TextEncoderSpec.lora_prefix`: `lora_te_`; SDXL's `lora_te1_` CLIP ViT-L and
`lora_te2_` OpenCLIP bigG, both named as transformers' CLIP text models name them).
diffusers' own layout (`unet.<path>.lora_A.weight` / `lora_B.weight`, as `save_lora_weights`
writes PEFT LoRAs; or the older `<path>.lora.down.weight` / `lora.up.weight`; SDXL's
`text_encoder.` / `text_encoder_2.`) is read into that one (`lora_A` is down, `lora_B` up; without
an alpha the scale is 1, as in diffusers). UNet
layers are named either as diffusers names them (`lora_unet_down_blocks_0_attentions_0_..._to_q`,
kohya's sd-scripts) or as the original UNet does (`lora_unet_input_blocks_1_1_..._to_q`, LyCORIS);
both are matched through the key tables of `keymap`. Text-encoder layers carry transformers'
`text_model.` level (`lora_te_text_model_encoder_layers_0_mlp_fc1`). Linear layers, 1x1 and 3x3
convolutions (LoCon: a k x k `lora_down`, a 1x1 `lora_up`) are merged; a LoRA without `alpha`
has scale 1 (alpha = rank). Keys that match no layer are reported, not silently dropped; a LoRA
that matches nothing, or whose shapes disagree, is refused as made for another model.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from coreml_sd.checkpoint import keymap
from coreml_sd.checkpoint.safeload import SAFETENSORS, addnet_hash, load_tensor_file, sha256_file, sniff
from coreml_sd.errors import ModelError

log = logging.getLogger(__name__)

_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
_UNSUPPORTED = {".hada_w1_a": "LoHa", ".lokr_w1": "LoKr", ".lokr_w1_a": "LoKr",
                ".lora_mid.weight": "LoCon with CP/Tucker (lora_mid)", ".dora_scale": "DoRA",
                ".lora_magnitude_vector": "DoRA", ".oft_blocks": "OFT"}
# diffusers' layout: component prefix -> ours, and weight suffixes -> ours
_DIFFUSERS_PREFIXES = {"unet.": "lora_unet_", "text_encoder_2.": "lora_te2_", "text_encoder.": "lora_te_"}
_DIFFUSERS_SUFFIXES = {".lora_A.weight": ".lora_down.weight", ".lora_B.weight": ".lora_up.weight",
                       ".lora.down.weight": ".lora_down.weight", ".lora.up.weight": ".lora_up.weight",
                       ".alpha": ".alpha"}
_WIDTHS = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL", 1280: "SDXL"}


@dataclass
class LoraReport:
    name: str
    path: Path
    strength: float
    hash: str  # 12 hex, as AUTOMATIC1111's "Lora hashes"
    matched: int = 0
    unmatched: list[str] = field(default_factory=list)


def lora_hash(path: Path, metadata: Mapping[str, str]) -> str:
    """AUTOMATIC1111's LoRA short hash: kohya's `sshs_model_hash`, else the hash of the tensor data."""
    if metadata.get("sshs_model_hash"):
        return metadata["sshs_model_hash"][:12]
    return (addnet_hash(path) if sniff(path) == SAFETENSORS else sha256_file(path))[:12]


def load_lora(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    import torch

    from coreml_sd.checkpoint.safeload import flat_state_dict

    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(f"LoRA not found: {path} (expected a .safetensors or .pt file)")
    obj, metadata = load_tensor_file(path)
    sd = flat_state_dict(obj, path)
    if any(k.endswith(tuple(_DIFFUSERS_SUFFIXES)[:-1]) for k in sd):
        sd = from_diffusers_layout(sd, path)
    for key in sd:
        for suffix, kind in _UNSUPPORTED.items():
            if key.endswith(suffix):
                raise ModelError(f"{path} is a {kind} file ({key}); supported: kohya/A1111 LoRA and LoCon")
    if not any(k.endswith(_SUFFIXES[0]) for k in sd):
        raise ModelError(f"{path} is not a LoRA: expected keys ending in .lora_down.weight / .lora_up.weight; "
                         f"found {sorted(sd)[:3]}")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}, metadata


def _text_encoders(text_encoder) -> dict[str, Any]:
    """{LoRA prefix: text encoder}: a mapping as given, or one module under SD's `lora_te_`."""
    if isinstance(text_encoder, Mapping):
        return {prefix: m for prefix, m in text_encoder.items() if m is not None}
    return {"lora_te_": text_encoder}


def from_diffusers_layout(sd: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """`unet.a.b.lora_A.weight` -> `lora_unet_a_b.lora_down.weight` (and the like) for every key."""
    out = {}
    # SDXL's two text encoders are lora_te1_/lora_te2_ in kohya's names; SD 1.x/2.x's one is lora_te_.
    sdxl = any(k.startswith("text_encoder_2.") for k in sd)
    for key, value in sd.items():
        prefix = next((p for p in _DIFFUSERS_PREFIXES if key.startswith(p)), None)
        suffix = next((x for x in _DIFFUSERS_SUFFIXES if key.endswith(x)), None)
        if prefix is None or suffix is None:
            raise ModelError(f"{path}: key {key!r} is neither a UNet nor a text-encoder LoRA weight in diffusers' "
                             f"layout (expected {', '.join(_DIFFUSERS_PREFIXES)}<layer>{'|'.join(_DIFFUSERS_SUFFIXES)})")
        module = key[len(prefix):-len(suffix)].replace(".", "_")
        target = _DIFFUSERS_PREFIXES[prefix]
        if sdxl and target == "lora_te_":
            target = "lora_te1_"
        out[target + module + _DIFFUSERS_SUFFIXES[suffix]] = value
    return out


def lora_targets(text_encoder, unet) -> dict[str, Any]:
    """LoRA layer name -> Linear/Conv2d module, under every spelling a file may use. `text_encoder`:
    one module (SD 1.x/2.x: `lora_te_`) or {LoRA prefix: module} (SDXL: lora_te1_, lora_te2_)."""
    import torch

    kinds = (torch.nn.Linear, torch.nn.Conv2d)
    targets = {}
    for lora_prefix, encoder in _text_encoders(text_encoder).items():
        te_prefix = "" if hasattr(encoder, "text_model") else "text_model."
        for name, mod in encoder.named_modules():
            if isinstance(mod, kinds):
                targets[lora_prefix + (te_prefix + name).replace(".", "_")] = mod
    table = keymap._unet_table(unet.config)
    for name, mod in unet.named_modules():
        if isinstance(mod, kinds):
            targets["lora_unet_" + name.replace(".", "_")] = mod
            original = keymap._lookup(table, name + ".weight", "UNet")[: -len(".weight")]
            targets["lora_unet_" + original.replace(".", "_")] = mod
    return targets


def merge_lora(text_encoder, unet, path: str | Path, strength: float = 1.0) -> LoraReport:
    """Merge one LoRA file into the modules in place and report what matched. `text_encoder`: one
    module or {LoRA prefix: module} (see `lora_targets`)."""
    path = Path(path).expanduser()
    sd, metadata = load_lora(path)
    _check_text_prefixes(sd, _text_encoders(text_encoder), path)
    report = LoraReport(path.stem, path, float(strength), lora_hash(path, metadata))
    targets = lora_targets(text_encoder, unet)
    bases = sorted({k[: -len(s)] for k in sd for s in _SUFFIXES if k.endswith(s)})
    stray = sorted(k for k in sd if not k.endswith(_SUFFIXES))
    plan = []
    for base in bases:
        module = targets.get(base)
        if module is None or base + ".lora_up.weight" not in sd or base + ".lora_down.weight" not in sd:
            report.unmatched.append(base)
            continue
        delta = _delta(sd, base, module.weight.shape, path)
        plan.append((module, delta))
    if not plan:
        raise ModelError(f"{path}: none of its {len(bases)} layers matches this model "
                         f"(e.g. {bases[0] if bases else '-'}); is it a LoRA for another family?")
    _apply(plan, strength)
    report.matched = len(plan)
    report.unmatched += stray
    if report.unmatched:
        log.warning("LoRA %s: %d keys match no layer of this model and were ignored: %s", path.name,
                    len(report.unmatched), ", ".join(report.unmatched[:5]))
    return report


_TE_PREFIX = re.compile(r"^(lora_te\d?_)")
_KINDS = {"lora_te_": "an SD 1.x/2.x LoRA (one text encoder, lora_te_)",
          "lora_te1_": "an SDXL LoRA (two text encoders, lora_te1_/lora_te2_)",
          "lora_te2_": "an SDXL LoRA (two text encoders, lora_te1_/lora_te2_)"}


def _check_text_prefixes(sd: Mapping[str, Any], encoders: Mapping[str, Any], path: Path) -> None:
    """A LoRA whose text-encoder keys are another family's is refused by name, not half merged."""
    found = sorted({m.group(1) for k in sd if (m := _TE_PREFIX.match(k))})
    foreign = [p for p in found if p not in encoders]
    if foreign:
        raise ModelError(f"{path} is {_KINDS.get(foreign[0], 'a LoRA for another model')}; this model's text "
                         f"encoder layers are {', '.join(p + '*' for p in encoders)}: use a LoRA made for its family")


def _delta(sd: Mapping[str, Any], base: str, shape, path: Path):
    """alpha/rank * up @ down, shaped like the target weight (fp32)."""
    down = sd[base + ".lora_down.weight"].float()
    up = sd[base + ".lora_up.weight"].float()
    rank = down.shape[0]
    alpha = float(sd[base + ".alpha"]) if base + ".alpha" in sd else float(rank)
    fan_in = 1
    for d in shape[1:]:
        fan_in *= d
    if up.shape[0] != shape[0] or down[0].numel() != fan_in or up.flatten(1).shape[1] != rank:
        raise ModelError(
            f"{path}: layer {base} has LoRA shapes down {tuple(down.shape)}, up {tuple(up.shape)}; the model's "
            f"weight is {tuple(shape)}. This LoRA was made for another model ({_guess_family(sd)})."
        )
    return ((up.flatten(1) @ down.flatten(1)) * (alpha / rank)).reshape(shape)


def _apply(plan, strength: float) -> None:
    import torch

    with torch.no_grad():
        for module, delta in plan:
            w = module.weight
            w.copy_((w.float() + strength * delta.to(w.device)).to(w.dtype))


def _guess_family(sd: Mapping[str, Any]) -> str:
    for key, t in sd.items():
        if "attn2_to_k" in key and key.endswith(".lora_down.weight"):
            width = int(t.shape[1])
            return f"its cross-attention context is {width} wide: {_WIDTHS.get(width, 'unknown family')}"
    return "unknown family"
