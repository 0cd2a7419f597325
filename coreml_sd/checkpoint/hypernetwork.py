"""AUTOMATIC1111 hypernetworks: small MLPs that rewrite the attention key/value context.

A hypernetwork file (`.pt`, loaded safely) holds, for each context width `d` it was trained on
(768 for the text context; often also 320/640/1280, the UNet's own widths), two residual MLPs:
one for the keys and one for the values. As in AUTOMATIC1111, every attention layer whose
context has width `d` computes

    k = to_k(context + strength * mlp_k(context))     v = to_v(context + strength * mlp_v(context))

so a 768-only file changes cross-attention alone, and files with UNet widths also change the
self-attention of those levels. Each MLP is Linear layers sized `d * layer_structure[i]`, with an
activation after all but the last (and after the last too when `activate_output`), then an
optional LayerNorm; dropout does nothing at inference. The MLPs run in float32 (A1111 does too).
No Core ML tool supports this: it is a torch-backend feature, installed as attention processors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coreml_sd.checkpoint.safeload import SAFETENSORS, load_pickle, sha256_file, sniff
from coreml_sd.errors import ModelError, choices_text

_OLD_NAMES = {"linear1": "linear.0", "linear2": "linear.1"}  # the first (NovelAI-era) files
_LINEAR_KEY = re.compile(r"^linear\.(\d+)\.(weight|bias)$")


@dataclass
class MLP:
    """One residual MLP: [(weight, bias, (ln_weight, ln_bias) | None)] in order."""

    layers: list[tuple[Any, Any, tuple[Any, Any] | None]]
    activation: str
    activate_output: bool

    def to(self, device) -> "MLP":
        """The same MLP with its tensors on `device` (float32 stays: A1111 runs hypernetworks in float32)."""
        move = (lambda t: None if t is None else t.to(device))  # noqa: E731
        layers = [(move(w), move(b), None if ln is None else (move(ln[0]), move(ln[1]))) for w, b, ln in self.layers]
        return MLP(layers, self.activation, self.activate_output)

    def __call__(self, x, strength: float):
        import torch.nn.functional as F

        h = x
        for i, (w, b, ln) in enumerate(self.layers):
            h = F.linear(h, w, b)
            if i < len(self.layers) - 1 or self.activate_output:
                h = _activation(self.activation)(h)
            if ln is not None:
                h = F.layer_norm(h, (w.shape[0],), ln[0], ln[1])
        return x + h * strength


@dataclass
class Hypernetwork:
    name: str
    path: Path
    hash: str  # sha256[:10], as AUTOMATIC1111's "Hypernet hash"
    layers: dict[int, tuple[MLP, MLP]] = field(default_factory=dict)  # context width -> (keys, values)


def _activation(name: str):
    import torch

    if name in ("linear", "", None):
        return lambda h: h
    if name == "swish":  # A1111's "swish" is torch's Hardswish
        return torch.nn.functional.hardswish
    module = "torch.nn.modules.activation"
    classes = (getattr(torch.nn, n, None) for n in dir(torch.nn.modules.activation))
    table = {c.__name__.lower(): c for c in classes if isinstance(c, type) and c.__module__ == module}
    if name not in table:
        raise ModelError(f"hypernetwork activation {name!r} is unknown; known: {choices_text(sorted(table))}")
    return table[name]()


def load_hypernetwork(path: str | Path) -> Hypernetwork:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(f"hypernetwork not found: {path} (expected an AUTOMATIC1111 .pt file)")
    if sniff(path) == SAFETENSORS:
        raise ModelError(f"{path} is a safetensors file; AUTOMATIC1111 hypernetworks are .pt files")
    obj = load_pickle(path)
    widths = [k for k in obj if isinstance(k, int)] if isinstance(obj, dict) else []
    if not widths:
        raise ModelError(f"{path} is not a hypernetwork: expected entries keyed by context width (e.g. 768)")
    activation = obj.get("activation_func") or "linear"
    _activation(activation)  # unknown names fail here, at load
    net = Hypernetwork(path.stem, path, sha256_file(path)[:10])
    for width in widths:
        pair = obj[width]
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise ModelError(f"{path}: entry {width} should hold two state dicts (keys, values)")
        net.layers[width] = tuple(_mlp(sd, width, path, activation, bool(obj.get("activate_output", False)),
                                       bool(obj.get("is_layer_norm", False))) for sd in pair)
    return net


def _mlp(sd: dict, width: int, path: Path, activation: str, activate_output: bool, layer_norm: bool) -> MLP:
    import torch

    entries: dict[int, dict[str, Any]] = {}
    for key, t in sd.items():
        for old, new in _OLD_NAMES.items():
            key = key.replace(old + ".", new + ".", 1) if key.startswith(old + ".") else key
        m = _LINEAR_KEY.match(key)
        if not m:
            raise ModelError(f"{path}: unexpected hypernetwork key {key!r}")
        entries.setdefault(int(m.group(1)), {})[m.group(2)] = t.detach().to(torch.float32)
    layers: list[list] = []
    for idx in sorted(entries):
        w, b = entries[idx].get("weight"), entries[idx].get("bias")
        if w is not None and w.ndim == 2:
            layers.append([w, b, None])
        elif w is not None and w.ndim == 1 and layers and layer_norm:
            layers[-1][2] = (w, b)
        else:
            raise ModelError(f"{path}: layer {idx} of the {width} network is neither Linear nor LayerNorm")
    if not layers or layers[0][0].shape[1] != width or layers[-1][0].shape[0] != width:
        raise ModelError(f"{path}: the {width} network does not map width {width} to itself")
    return MLP([tuple(x) for x in layers], activation, activate_output)


class HypernetworkAttnProcessor:
    """Scaled-dot-product attention (as diffusers' AttnProcessor2_0 for SD's attention blocks), with
    the key and value context passed through the hypernetwork first."""

    def __init__(self, pair: tuple[MLP, MLP], strength: float):
        self.pair, self.strength = pair, strength

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        import torch.nn.functional as F

        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        b, n, _ = hidden_states.shape  # (batch, tokens, channels)
        ctx32 = context.float()
        k_ctx = self.pair[0](ctx32, self.strength).to(context.dtype)
        v_ctx = self.pair[1](ctx32, self.strength).to(context.dtype)
        heads = attn.heads
        q = attn.to_q(hidden_states).view(b, n, heads, -1).transpose(1, 2)  # (b, heads, n, dim_head)
        k = attn.to_k(k_ctx).view(b, context.shape[1], heads, -1).transpose(1, 2)
        v = attn.to_v(v_ctx).view(b, context.shape[1], heads, -1).transpose(1, 2)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], b)
            attention_mask = attention_mask.view(b, heads, -1, attention_mask.shape[-1])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=attn.scale)
        out = out.transpose(1, 2).reshape(b, n, -1).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


def install(unet, net: Hypernetwork, strength: float) -> int:
    """Give every attention of `unet` whose context width the hypernetwork knows its processor.

    Returns how many attention layers it changes; the others keep their processor.
    """
    from diffusers.models.attention_processor import Attention

    device = next(unet.parameters()).device
    pairs = {width: (keys.to(device), values.to(device)) for width, (keys, values) in net.layers.items()}
    changed = 0
    for name, module in unet.named_modules():
        if not isinstance(module, Attention):
            continue
        width = module.to_k.in_features
        if width not in net.layers:
            continue
        _check_plain(module, name)
        module.set_processor(HypernetworkAttnProcessor(pairs[width], strength))
        changed += 1
    if not changed:
        raise ModelError(f"hypernetwork {net.name} has networks for widths {sorted(net.layers)}; no attention "
                         f"layer of this model has such a context width (another family?)")
    return changed


def _check_plain(attn, name: str) -> None:
    # SD's attention blocks use none of these; a model that does would need their handling here.
    if (attn.spatial_norm is not None or attn.group_norm is not None or attn.norm_cross or attn.residual_connection
            or attn.norm_q is not None or attn.norm_k is not None):
        raise ModelError(f"attention {name} has features the hypernetwork processor does not handle")
