"""Architecture configs of the rewritten modules, each read from upstream config in one place.

A key the rewrite does not implement must keep its default value; anything else is an error
naming the key, the value found and the supported value, so a checkpoint that needs a feature we
lack fails at conversion rather than producing a quietly different model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from coreml_sd.errors import ModelError, choices_text

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")

# diffusers UNet2DConditionModel keys that only name features we do not implement: each must
# hold the value given here (None = absent).
_UNET_DEFAULT_ONLY: dict[str, Any] = {
    "center_input_sample": False, "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu", "dual_cross_attention": False,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "num_class_embeds": None,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "attention_type": "default", "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None, "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
}
# Keys that do not change the function computed at inference (training-only or precision hints).
_UNET_IGNORED = frozenset({"sample_size", "dropout", "upcast_attention", "addition_embed_type_num_heads"})


def _check_defaults(kind: str, config: Mapping[str, Any], defaults: Mapping[str, Any]) -> None:
    for key, expected in defaults.items():
        found = config.get(key, expected)
        same = found == expected or (isinstance(found, (int, float)) and isinstance(expected, (int, float))
                                     and float(found) == float(expected))
        if not same:
            raise ModelError(f"{kind} config: {key}={found!r} is not supported by the converter (only {expected!r})")


def _per_block(value, n: int, key: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    values = tuple(int(v) for v in value)
    if len(values) != n:
        raise ModelError(f"UNet config: {key} has {len(values)} entries, expected one per block ({n})")
    return values


_CLASS_EMBEDS = (None, "projection")
_ADDITION_EMBEDS = (None, "text_time")


def _extra_embeddings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The supported extra embeddings (see UNetConfig) and their widths, checked."""
    cls_type, add_type = config.get("class_embed_type"), config.get("addition_embed_type")
    for key, value, valid in (("class_embed_type", cls_type, _CLASS_EMBEDS),
                              ("addition_embed_type", add_type, _ADDITION_EMBEDS)):
        if value not in valid:
            raise ModelError(f"UNet config: {key}={value!r} is not supported by the converter; "
                             f"supported: {choices_text(valid)}")
    if cls_type and add_type:
        raise ModelError("UNet config: class_embed_type and addition_embed_type together are not supported")
    proj = config.get("projection_class_embeddings_input_dim")
    if (cls_type or add_type) and not proj:
        raise ModelError("UNet config: projection_class_embeddings_input_dim is needed with "
                         f"{'class_embed_type' if cls_type else 'addition_embed_type'}")
    time_dim = config.get("addition_time_embed_dim")
    if add_type and not time_dim:
        raise ModelError("UNet config: addition_embed_type text_time needs addition_time_embed_dim")
    if not (cls_type or add_type) and (proj or time_dim):
        raise ModelError("UNet config: projection_class_embeddings_input_dim/addition_time_embed_dim without an "
                         "extra embedding type")
    return {"class_embed_type": cls_type, "addition_embed_type": add_type,
            "projection_dim": int(proj) if proj else None, "addition_time_embed_dim": int(time_dim) if time_dim else None}


@dataclass(frozen=True)
class UNetConfig:
    """What the rewritten UNet needs of diffusers' UNet2DConditionModel config."""

    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    layers_per_block: int
    cross_attention_dim: int
    heads: tuple[int, ...]  # attention heads per down block (diffusers' num_attention_heads)
    transformer_layers: tuple[int, ...]
    norm_num_groups: int
    norm_eps: float
    flip_sin_to_cos: bool
    freq_shift: float
    # Embeddings added to the time embedding from extra inputs (diffusers' names):
    # class_embed_type "projection": class_labels (B, P) -> class_embedding;
    # addition_embed_type "text_time" (SDXL): text_embeds (B, T) and sinusoidal features of
    # time_ids (B, k) -> add_embedding, P = T + k * addition_time_embed_dim.
    class_embed_type: str | None = None
    addition_embed_type: str | None = None
    projection_dim: int | None = None  # projection_class_embeddings_input_dim
    addition_time_embed_dim: int | None = None

    @property
    def extra_inputs(self) -> tuple[str, ...]:
        """The UNet's inputs beyond sample, timestep and encoder_hidden_states, in call order."""
        return (("class_labels",) if self.class_embed_type else ()) + \
            (("text_embeds", "time_ids") if self.addition_embed_type else ())

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> "UNetConfig":
        config = {k: v for k, v in dict(config).items() if not k.startswith("_")}
        known = set(cls.__dataclass_fields__) | set(_UNET_DEFAULT_ONLY) | _UNET_IGNORED | {
            "attention_head_dim", "num_attention_heads", "transformer_layers_per_block", "use_linear_projection",
            "projection_class_embeddings_input_dim"}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ModelError(f"UNet config: unknown key(s) {', '.join(unknown)}; the converter knows "
                             f"{choices_text(sorted(known))}")
        _check_defaults("UNet", config, _UNET_DEFAULT_ONLY)
        down, up = tuple(config["down_block_types"]), tuple(config["up_block_types"])
        for kind, types, valid in (("down", down, DOWN_BLOCKS), ("up", up, UP_BLOCKS)):
            bad = [t for t in types if t not in valid]
            if bad:
                raise ModelError(f"UNet config: {kind} block type {bad[0]!r} is not supported; "
                                 f"supported: {choices_text(valid)}")
        n = len(config["block_out_channels"])
        if len(down) != n or len(up) != n:
            raise ModelError(f"UNet config: {len(down)} down and {len(up)} up blocks for {n} block_out_channels")
        heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
        extra = _extra_embeddings(config)
        return cls(
            in_channels=int(config.get("in_channels", 4)),
            out_channels=int(config.get("out_channels", 4)),
            block_out_channels=tuple(int(c) for c in config["block_out_channels"]),
            down_block_types=down,
            up_block_types=up,
            layers_per_block=int(config.get("layers_per_block", 2)),
            cross_attention_dim=int(config.get("cross_attention_dim", 768)),
            heads=_per_block(heads, n, "num_attention_heads"),
            transformer_layers=_per_block(config.get("transformer_layers_per_block", 1), n,
                                          "transformer_layers_per_block"),
            norm_num_groups=int(config.get("norm_num_groups", 32)),
            norm_eps=float(config.get("norm_eps", 1e-5)),
            flip_sin_to_cos=bool(config.get("flip_sin_to_cos", True)),
            freq_shift=float(config.get("freq_shift", 0)),
            **extra,
        )

    @property
    def downscale(self) -> int:
        """Latent sides must be multiples of this (one halving per down block but the last)."""
        return 2 ** (len(self.block_out_channels) - 1)


_CONTROLNET_OWN = ("conditioning_channels", "conditioning_embedding_out_channels", "global_pool_conditions",
                   "controlnet_conditioning_channel_order")
_UP_OF = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}


@dataclass(frozen=True)
class ControlNetConfig:
    """What the rewritten ControlNet needs of diffusers' ControlNetModel config: the UNet config of the
    input half it copies, and its conditioning-image embedding."""

    unet: UNetConfig  # up-block entries mirror the down blocks; the ControlNet builds none
    conditioning_channels: int
    hint_channels: tuple[int, ...]  # conditioning_embedding_out_channels

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> "ControlNetConfig":
        config = {k: v for k, v in dict(config).items() if not k.startswith("_")}
        order = config.get("controlnet_conditioning_channel_order", "rgb")
        if order != "rgb":
            raise ModelError(f"ControlNet config: controlnet_conditioning_channel_order={order!r} is not supported by "
                             f"the converter (only 'rgb'); run this ControlNet with the torch backend")
        down = tuple(config["down_block_types"])
        bad = [t for t in down if t not in _UP_OF]
        if bad:
            raise ModelError(f"ControlNet config: down block type {bad[0]!r} is not supported; "
                             f"supported: {choices_text(_UP_OF)}")
        hint = config.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)
        return cls(UNetConfig.from_diffusers(cls.unet_part(config)), int(config.get("conditioning_channels", 3)),
                   tuple(int(c) for c in hint))

    @staticmethod
    def unet_part(config: Mapping[str, Any]) -> dict[str, Any]:
        """The config of the UNet whose input half the ControlNet copies (its up blocks mirrored)."""
        unet = {k: v for k, v in config.items() if k not in _CONTROLNET_OWN and not k.startswith("_")}
        unet.update(up_block_types=[_UP_OF.get(t, t) for t in reversed(config["down_block_types"])],
                    out_channels=config.get("in_channels", 4))
        return unet


@dataclass(frozen=True)
class VAEConfig:
    """What the rewritten VAE encoder/decoder need of diffusers' AutoencoderKL config."""

    in_channels: int
    out_channels: int
    latent_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    norm_num_groups: int
    mid_block_attention: bool
    use_quant_conv: bool
    use_post_quant_conv: bool

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> "VAEConfig":
        config = dict(config)
        _check_defaults("VAE", config, {"act_fn": "silu"})
        for key, valid in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            bad = [t for t in config.get(key, ()) if t != valid]
            if bad:
                raise ModelError(f"VAE config: {key} entry {bad[0]!r} is not supported; supported: {valid}")
        return cls(
            in_channels=int(config.get("in_channels", 3)),
            out_channels=int(config.get("out_channels", 3)),
            latent_channels=int(config.get("latent_channels", 4)),
            block_out_channels=tuple(int(c) for c in config["block_out_channels"]),
            layers_per_block=int(config.get("layers_per_block", 2)),
            norm_num_groups=int(config.get("norm_num_groups", 32)),
            mid_block_attention=bool(config.get("mid_block_add_attention", True)),
            use_quant_conv=bool(config.get("use_quant_conv", True)),
            use_post_quant_conv=bool(config.get("use_post_quant_conv", True)),
        )

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


TEXT_ACTIVATIONS = ("quick_gelu", "gelu")


@dataclass(frozen=True)
class TextEncoderConfig:
    """What the rewritten CLIP text encoder needs of transformers' CLIPTextConfig."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    hidden_act: str
    layer_norm_eps: float
    eos_token_id: int

    @classmethod
    def from_transformers(cls, config: Any) -> "TextEncoderConfig":
        get = config.get if isinstance(config, Mapping) else (lambda k, d=None: getattr(config, k, d))
        act = get("hidden_act", "quick_gelu")
        if act not in TEXT_ACTIVATIONS:
            raise ModelError(f"text encoder config: hidden_act={act!r} is not supported; "
                             f"supported: {choices_text(TEXT_ACTIVATIONS)}")
        return cls(
            vocab_size=int(get("vocab_size")),
            hidden_size=int(get("hidden_size")),
            intermediate_size=int(get("intermediate_size")),
            num_hidden_layers=int(get("num_hidden_layers")),
            num_attention_heads=int(get("num_attention_heads")),
            max_position_embeddings=int(get("max_position_embeddings", 77)),
            hidden_act=act,
            layer_norm_eps=float(get("layer_norm_eps", 1e-5)),
            eos_token_id=int(get("eos_token_id", 2)),
        )
