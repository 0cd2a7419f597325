"""Helpers for the single-file checkpoint tests: tiny models written in community layouts.

Everything is built from configs here (nothing downloaded): the tiny SD1 model of `tiny_models`,
an SD2-shaped variant (OpenCLIP text encoder, linear transformer projections, 1024-wide context
in the full-size configs), fake SDXL/VAE/LoRA files with the sentinel keys real files carry, and
hostile pickles.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

from tiny_models import TEXT_CONFIG, UNET_CONFIG, build_tiny_modules

# SD 2.x changes: OpenCLIP text encoder (GELU, penultimate layer), linear proj_in/proj_out,
# per-level head counts. Sizes stay tiny.
SD2_UNET_CONFIG = dict(UNET_CONFIG, use_linear_projection=True, attention_head_dim=(2, 4))
SD2_TEXT_CONFIG = dict(TEXT_CONFIG, hidden_act="gelu", num_hidden_layers=2)


def build_tiny_sd2_modules(seed: int = 0):
    """(text_encoder, unet, vae) shaped like SD 2.x at tiny size, seeded, fp32, eval mode."""
    return build_tiny_modules(seed, unet_config=SD2_UNET_CONFIG, text_config=SD2_TEXT_CONFIG)


def write_tiny_checkpoint(path: Path, *, seed: int = 0, dtype: str = "fp32", fmt: str = "safetensors",
                          ema: bool = False, family: str = "sd1", prediction_type: str = "epsilon",
                          sidecar: bool = True, ema_seed: int | None = None):
    """Write a tiny model as one original-layout file (+ its config next to it). Returns (path, modules)."""
    from coreml_sd.checkpoint.writer import config_from_modules, write_original_checkpoint
    from coreml_sd.config import SchedulerConfig

    mods = build_tiny_modules(seed) if family == "sd1" else build_tiny_sd2_modules(seed)
    ema_unet = None
    if ema and ema_seed is not None:
        ema_unet = (build_tiny_modules(ema_seed) if family == "sd1" else build_tiny_sd2_modules(ema_seed))[1]
    path = write_original_checkpoint(*mods, path, dtype=dtype, fmt=fmt, ema=ema, family=family, ema_unet=ema_unet)
    if sidecar:
        from coreml_sd.checkpoint.config import sidecar_path

        # What the tiny diffusers folder's scheduler_config.json says (diffusers writes the spacing out).
        sched = SchedulerConfig(prediction_type=prediction_type, timestep_spacing="leading", steps_offset=1,
                                set_alpha_to_one=False)
        config_from_modules(*mods, family=family, scheduler=sched).write(sidecar_path(path))
    return path, dict(zip(("text_encoder", "unet", "vae"), mods, strict=True)), ema_unet


def save_safetensors(tensors: dict, path: Path, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return Path(path)


# ---------------------------------------------------------------- hostile pickles

class _System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Exec:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


class _Popen:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import subprocess

        return subprocess.Popen, (["touch", str(self.marker)],)


class _Nested:
    """An object whose reduce hands back another object with a malicious reduce, deep in a container."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return dict, ([("inner", [{"deeper": _Exec(self.marker)}])],)


HOSTILE = {"os.system": (_System, "system"), "builtins.exec": (_Exec, "exec"),
           "subprocess.Popen": (_Popen, "subprocess.Popen"), "nested __reduce__": (_Nested, "exec")}


def write_hostile(path: Path, kind: str, marker: Path, *, container: str = "zip") -> Path:
    """A .ckpt whose unpickling would create `marker`; `container` zip (torch.save) or raw pickle."""
    import torch

    cls, _ = HOSTILE[kind]
    payload = {"state_dict": {"model.diffusion_model.out.2.bias": torch.zeros(4)}, "extra": cls(marker)}
    if container == "zip":
        torch.save(payload, path)
    else:
        Path(path).write_bytes(pickle.dumps(payload, protocol=2 if kind != "builtins.exec" else 4))
    return Path(path)


def full_size_shapes(name: str) -> dict:
    """key -> TensorInfo of a full-size original-layout file (sd1, sd2, sdxl, sdxl-refiner), built on the
    meta device."""
    from coreml_sd.checkpoint.config import shipped_config
    from coreml_sd.checkpoint.loader import new_text_encoder, new_unet, new_vae
    from coreml_sd.checkpoint.safeload import TensorInfo
    from coreml_sd.checkpoint.writer import original_state_dict

    cfg = shipped_config(name)
    encoders = {t.component: new_text_encoder(cfg.text_config(t.component), projection=t.pooled)
                for t in cfg.spec.text_encoders}
    state = original_state_dict(encoders.get("text_encoder"), new_unet(cfg.unet), new_vae(cfg.vae),
                                family=cfg.family, text_encoder_2=encoders.get("text_encoder_2"))
    return {k: TensorInfo("F16", tuple(t.shape)) for k, t in state.items()}


def kohya_lora(text_encoder, unet, *, seed: int = 1, rank: int = 4, alpha: float | None = 2.0,
               naming: str = "diffusers", convs: bool = True) -> dict:
    """A kohya/A1111-format LoRA for these modules: every Linear of the text encoder and of the UNet's
    attention blocks; with `convs`, LoCon on the resnets' 3x3 and the attention blocks' 1x1 convolutions.
    `naming`: UNet layer names as diffusers spells them (kohya) or as the original UNet does (LyCORIS,
    kohya's SDXL). `text_encoder`: one module (lora_te_) or {LoRA prefix: module} (SDXL's lora_te1_/2_)."""
    import torch

    from coreml_sd.checkpoint import keymap

    g = torch.Generator().manual_seed(seed)
    table = keymap._unet_table(unet.config)
    sd = {}

    def add(base, down_shape, up_shape):
        sd[base + ".lora_down.weight"] = torch.randn(*down_shape, generator=g) * 0.1
        sd[base + ".lora_up.weight"] = torch.randn(*up_shape, generator=g) * 0.1
        if alpha is not None:
            sd[base + ".alpha"] = torch.tensor(float(alpha))

    encoders = text_encoder if isinstance(text_encoder, dict) else {"lora_te_": text_encoder}
    for prefix, encoder in encoders.items():
        for name, mod in encoder.named_modules():
            if isinstance(mod, torch.nn.Linear) and "encoder.layers." in name:  # kohya: the transformer's layers
                base = prefix + ("text_model." + name.removeprefix("text_model.")).replace(".", "_")
                add(base, (rank, mod.in_features), (mod.out_features, rank))
    for name, mod in unet.named_modules():
        if not isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        label = name if naming == "diffusers" else keymap._lookup(table, name + ".weight", "UNet")[: -len(".weight")]
        base = "lora_unet_" + label.replace(".", "_")
        if isinstance(mod, torch.nn.Linear) and ".attentions." in name:
            add(base, (rank, mod.in_features), (mod.out_features, rank))
        elif convs and isinstance(mod, torch.nn.Conv2d) and (".resnets." in name or "proj_" in name):
            add(base, (rank, mod.in_channels, *mod.kernel_size), (mod.out_channels, rank, 1, 1))
    return sd


# ---------------------------------------------------------------- embeddings and hypernetworks

def write_a1111_pt(path, vecs):
    """A textual-inversion embedding as AUTOMATIC1111 saves it."""
    import torch

    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vecs}, "name": "x", "step": 1000,
                "sd_checkpoint": "0123456789", "sd_checkpoint_name": "tiny"}, path)
    return path


def write_parameterdict_pt(path, vecs):
    """Early textual-inversion files keep the vectors in a torch ParameterDict."""
    import torch

    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(vecs)})
    torch.save({"string_to_token": {"*": 265}, "string_to_param": params, "name": "x", "step": 5}, path)
    return path


STRUCTURE = [1, 2, 1]


def a1111_sequential(dim, activation="relu", layer_norm=True, dropout=(0, 0.3, 0), activate_output=False):
    """The MLP exactly as AUTOMATIC1111 builds it (Linear, activation, LayerNorm, Dropout per layer)."""
    import torch

    acts = {"relu": torch.nn.ReLU, "swish": torch.nn.Hardswish, "tanh": torch.nn.Tanh}
    layers = []
    for i in range(len(STRUCTURE) - 1):
        layers.append(torch.nn.Linear(dim * STRUCTURE[i], dim * STRUCTURE[i + 1]))
        if activation != "linear" and (i < len(STRUCTURE) - 2 or activate_output):
            layers.append(acts[activation]())
        if layer_norm:
            layers.append(torch.nn.LayerNorm(dim * STRUCTURE[i + 1]))
        if dropout[i + 1] > 0:
            layers.append(torch.nn.Dropout(dropout[i + 1]))
    return torch.nn.Sequential(*layers).eval()


def write_hypernetwork(path, widths=(32,), seed=0, **kw):
    """An AUTOMATIC1111 hypernetwork .pt with random weights; returns (path, {width: [keys_mlp, values_mlp]})."""
    import torch

    torch.manual_seed(seed)
    nets = {w: [a1111_sequential(w, **kw), a1111_sequential(w, **kw)] for w in widths}
    with torch.no_grad():
        for pair in nets.values():
            for seq in pair:
                for p in seq.parameters():
                    p.normal_(0, 0.3)
    obj = {w: [{f"linear.{k}": v for k, v in seq.state_dict().items()} for seq in pair] for w, pair in nets.items()}
    obj.update(layer_structure=STRUCTURE, activation_func=kw.get("activation", "relu"),
               is_layer_norm=kw.get("layer_norm", True), weight_initialization="Normal", use_dropout=True,
               dropout_structure=list(kw.get("dropout", (0, 0.3, 0))), activate_output=kw.get("activate_output", False),
               last_layer_dropout=False, name="toon", step=2000, sd_checkpoint="0123456789", sd_checkpoint_name="tiny")
    torch.save(obj, path)
    return path, nets
