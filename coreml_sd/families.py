"""Model families as data: the one place that knows how SD 1.x, SD 2.x and their relatives differ.

A family says, for every model of its kind: which text encoders it has (their single-file
layout and key prefix, width, pad token, which hidden state feeds the UNet and whether their
pooled output does), the UNet's cross-attention width and extra inputs (beyond sample, timestep
and text context), latent channels, the VAE's scaling factor, the default image size, and which
shipped config (`coreml_sd/data/configs/<name>.json`: diffusers configs and scheduler defaults)
builds a full-size model. Every other module asks the registry instead of comparing names, so a
new family (SDXL, an inpainting variant, a test's fake one) is one `register_family` call.

    from coreml_sd.families import Family, TextEncoderSpec, ExtraInput, register_family
    register_family(Family("mine", "my variant", (TextEncoderSpec("text_encoder", "clip", 768),),
                           context_dim=768, extra_inputs=(ExtraInput("class_labels", "pooled"),)))

Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from coreml_sd.errors import ModelError, choices_text

EOS = "<|endoftext|>"  # = coreml_sd.tokenizer.EOS (kept import-free: the tokenizer needs `regex`)
TEXT_LAYOUTS = ("clip", "openclip")
# How the pipeline computes an extra UNet input (coreml_sd.conditioning.EXTRA_PROVIDERS):
#   pooled      the text encoders' pooled (projected) output, (B, P)
#   time_ids    SDXL micro-conditioning: original size, crop top-left, target size, (B, 6)
#   aesthetic_time_ids  the SDXL refiner's: original size, crop top-left, aesthetic score, (B, 5)
PROVIDERS = ("pooled", "time_ids", "aesthetic_time_ids")
PROVIDER_WIDTHS = {"time_ids": 6, "aesthetic_time_ids": 5}  # values per row (pooled: the encoder's width)
# Where diffusers' UNet2DConditionModel takes an extra input.
DIFFUSERS_ARGS = ("added_cond_kwargs", "class_labels")


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of a family."""

    component: str  # component name: text_encoder, text_encoder_2
    layout: str  # single-file layout: "clip" (transformers CLIP) or "openclip" (fused in_proj)
    hidden_size: int  # width of a full-size model's hidden states
    prefix: str = "cond_stage_model.transformer."  # single-file key prefix of its weights
    pad_token: str = EOS
    # The hidden state that feeds the UNet: -1 the last layer, -2 the penultimate ...; and whether
    # it goes through the final layer norm (SD 1.x/2.x: yes; SDXL: the raw penultimate state).
    hidden_layer: int = -1
    final_norm: bool = True
    pooled: bool = False  # its projected pooled output is part of the conditioning (SDXL's text_embeds)
    # kohya/A1111 LoRA key prefix of its layers (lora_te_; SDXL's two: lora_te1_, lora_te2_), and the
    # key of its vectors in a textual-inversion file with one set per encoder (SDXL: clip_l, clip_g;
    # None: files hold one set of vectors).
    lora_prefix: str = "lora_te_"
    embedding_key: str | None = None

    def __post_init__(self):
        if self.layout not in TEXT_LAYOUTS:
            raise ValueError(f"text encoder layout {self.layout!r}; valid: {choices_text(TEXT_LAYOUTS)}")


@dataclass(frozen=True)
class ExtraInput:
    """A UNet input beyond (sample, timestep, encoder_hidden_states)."""

    name: str  # tensor name (Core ML package input; diffusers' added_cond_kwargs key)
    provider: str  # how the pipeline computes it (PROVIDERS)
    diffusers_arg: str = "added_cond_kwargs"  # where diffusers' UNet takes it (DIFFUSERS_ARGS)

    def __post_init__(self):
        if self.provider not in PROVIDERS:
            raise ValueError(f"extra input provider {self.provider!r}; valid: {choices_text(PROVIDERS)}")
        if self.diffusers_arg not in DIFFUSERS_ARGS:
            raise ValueError(f"diffusers argument {self.diffusers_arg!r}; valid: {choices_text(DIFFUSERS_ARGS)}")


@dataclass(frozen=True)
class Family:
    """Everything that differs between model families (see the module docstring)."""

    name: str
    description: str
    text_encoders: tuple[TextEncoderSpec, ...]
    context_dim: int  # full-size UNet cross-attention width (the text encoders' hidden states, concatenated)
    extra_inputs: tuple[ExtraInput, ...] = ()
    # diffusers UNet config entries that tell this family's folders apart (e.g. addition_embed_type)
    unet_config: Mapping[str, Any] = field(default_factory=dict)
    unet_in_channels: int = 4  # 9: inpainting (latents + mask + masked-image latents)
    latent_channels: int = 4
    scaling_factor: float = 0.18215
    default_size: int = 512
    prediction_type: str = "epsilon"
    config: str | None = None  # shipped config name; None: models of this family bring their own
    # An empty negative prompt is all zeros, not the encoding of "" (diffusers' SDXL
    # force_zeros_for_empty_prompt).
    zero_empty_negative: bool = False
    align_your_steps: str = "sd1"  # which of NVIDIA's Align Your Steps tables fits: "sd1" or "sdxl"
    variant_of: str | None = None  # same layout as that family, other defaults (sd2-v of sd2)
    unet_prefix: str = "model.diffusion_model."
    vae_prefix: str = "first_stage_model."
    # A full-size UNet's block widths (block_out_channels): with context_dim, what tells which family
    # a ControlNet (a copy of the UNet's down half) was trained for.
    unet_block_widths: tuple[int, ...] = ()

    @property
    def component_names(self) -> tuple[str, ...]:
        """The components text-to-image needs, in load order."""
        return tuple(t.component for t in self.text_encoders) + ("unet", "vae_decoder")

    @property
    def layout_key(self) -> tuple:
        """What a single file's key layout shows of the family (variants share it)."""
        return tuple((t.layout, t.prefix) for t in self.text_encoders)

    def text_encoder(self, component: str) -> TextEncoderSpec:
        for spec in self.text_encoders:
            if spec.component == component:
                return spec
        raise ModelError(f"family {self.name} has no {component}; it has "
                         f"{choices_text(t.component for t in self.text_encoders)}")

    @property
    def pooled_encoder(self) -> TextEncoderSpec | None:
        return next((t for t in self.text_encoders if t.pooled), None)


_REGISTRY: dict[str, Family] = {}


def register_family(family: Family, *, override: bool = False) -> Family:
    """Add `family` to the registry; registering a known name again must say `override`."""
    if family.name in _REGISTRY and not override:
        raise ValueError(f"family {family.name!r} is already registered")
    if family.variant_of is not None and family.variant_of not in _REGISTRY:
        raise ValueError(f"family {family.name!r} is a variant of unknown family {family.variant_of!r}")
    _REGISTRY[family.name] = family
    return family


def unregister_family(name: str) -> None:
    """Remove a family (tests that register their own clean up with this)."""
    _REGISTRY.pop(name, None)


def family_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_family(name: str | Family) -> Family:
    if isinstance(name, Family):
        return name
    if name not in _REGISTRY:
        raise ModelError(f"unknown model family {name!r}; known: {choices_text(_REGISTRY)}")
    return _REGISTRY[name]


def shipped_configs() -> tuple[str, ...]:
    return tuple(f.config for f in _REGISTRY.values() if f.config)


def family_of_config(config_name: str) -> Family:
    for family in _REGISTRY.values():
        if family.config == config_name:
            return family
    raise ModelError(f"no shipped config {config_name!r}; shipped: {choices_text(shipped_configs())}")


def layout_base(family: Family) -> Family:
    """The family whose single-file layout `family` shares (itself unless it is a variant)."""
    return get_family(family.variant_of) if family.variant_of else family


def families_with_layout(layout_key: tuple, *, in_channels: int | None = None) -> list[Family]:
    """Registered families whose text encoders sit at exactly these (layout, prefix) pairs."""
    return [f for f in _REGISTRY.values() if f.layout_key == layout_key
            and (in_channels is None or f.unet_in_channels == in_channels)]


def match_single_file(text_prefixes: Iterable[str], context_dim: int | None,
                      in_channels: int | None) -> tuple[Family | None, bool]:
    """(family, standard) for a single file: its text-encoder key prefixes present, the UNet's
    context width and input channels. `standard`: the width is the family's full size, so its
    shipped config fits. Variants (sd2-v) are not told apart here (see `variants_of`)."""
    present = set(text_prefixes)
    best = None
    for f in _REGISTRY.values():
        if f.variant_of is not None:
            continue
        prefixes = {t.prefix for t in f.text_encoders}
        if prefixes and prefixes == present and (in_channels is None or f.unet_in_channels == in_channels):
            if best is None or (context_dim == f.context_dim and context_dim != best.context_dim):
                best = f
    if best is None:
        return None, False
    return best, context_dim == best.context_dim


def variants_of(family: Family, *, in_channels: int | None = None) -> list[Family]:
    """`family` and the registered variants that share its layout (sd2 -> sd2, sd2-v, sd2-inpainting),
    those whose UNet takes `in_channels` where given."""
    found = [family] + [f for f in _REGISTRY.values() if f.variant_of == family.name]
    return [f for f in found if in_channels is None or f.unet_in_channels == in_channels]


def match_controlnet(context_dim: int | None, block_widths: Iterable[int]) -> Family | None:
    """The family a ControlNet of this cross-attention width and these block widths was made for
    (a base family, not a variant: an sd2 ControlNet fits sd2-v too), or None (a non-standard size)."""
    widths = tuple(int(w) for w in block_widths)
    for f in _REGISTRY.values():
        if f.variant_of is None and f.context_dim == context_dim and f.unet_block_widths == widths:
            return f
    return None


def same_layout(a: Family | str, b: Family | str) -> bool:
    """Whether two families share one UNet layout (a family and its variants do)."""
    return layout_base(get_family(a)) is layout_base(get_family(b))


def match_diffusers(num_text_encoders: int, unet_config: Mapping[str, Any]) -> Family:
    """The family of a diffusers folder, from its text encoders and UNet config.

    Families whose declared `unet_config` entries all hold win over those without; among equals,
    the one whose full-size context width equals the UNet's, else the first registered (a tiny
    test model of SD 1.x layout is "sd1").
    """
    ctx = unet_config.get("cross_attention_dim")
    channels = int(unet_config.get("in_channels", 4))
    candidates = []
    for f in _REGISTRY.values():
        if len(f.text_encoders) != num_text_encoders or f.unet_in_channels != channels:
            continue
        if any(unet_config.get(k) != v for k, v in f.unet_config.items()):
            continue
        candidates.append(f)
    if not candidates:
        raise ModelError(f"no known model family has {num_text_encoders} text encoder(s) and a UNet with "
                         f"{channels} input channels and this config; known: {choices_text(_REGISTRY)}")
    # A folder's scheduler config says its prediction type: among equals, the base family, not a
    # variant that differs only in defaults (sd2, not sd2-v).
    candidates.sort(key=lambda f: (-len(f.unet_config), f.context_dim != ctx, f.variant_of is not None))
    return candidates[0]


def match_packages(text_encoders: Iterable[str], context_dim: int | None = None,
                   extra_inputs: Mapping[str, int] | None = None, *, in_channels: int | None = None,
                   prediction_type: str | None = None) -> tuple[Family, bool]:
    """(family, standard) of Core ML packages, which carry no config: the text-encoder components
    present, the UNet's context width, its extra inputs (name -> width; None: no UNet to read) and
    input channels. Families whose text encoders include those present and whose extra inputs are
    exactly these (with the provider's width) qualify; a family with all of those encoders, then
    one whose full-size context width is the UNet's, wins; among equals the first registered (a
    tiny test model of SD 1.x layout is "sd1"). `prediction_type` picks among a family's variants
    (sd2 -> sd2-v for v_prediction). `standard`: the width is the family's full size."""
    present = set(text_encoders)
    candidates = []
    for f in _REGISTRY.values():
        encoders = {t.component for t in f.text_encoders}
        if f.variant_of is not None or not present <= encoders:
            continue
        if in_channels is not None and f.unet_in_channels != in_channels:
            continue
        if extra_inputs is not None and not _same_extras(f, extra_inputs):
            continue
        candidates.append(f)
    if not candidates:
        extras = "unknown" if extra_inputs is None else choices_text(extra_inputs) or "none"
        raise ModelError(f"no known model family has text encoder(s) {choices_text(sorted(present)) or 'none'}, "
                         f"UNet inputs beyond the text: {extras}, and {in_channels or 4} input channels; known: "
                         f"{choices_text(_REGISTRY)}")
    candidates.sort(key=lambda f: ({t.component for t in f.text_encoders} != present, f.context_dim != context_dim))
    base = candidates[0]
    family = base
    if prediction_type is not None and base.prediction_type != prediction_type:
        family = next((v for v in variants_of(base) if v.prediction_type == prediction_type), base)
    return family, context_dim == base.context_dim


def _same_extras(family: Family, extra_inputs: Mapping[str, int]) -> bool:
    if {e.name for e in family.extra_inputs} != set(extra_inputs):
        return False
    return all(extra_inputs[e.name] == PROVIDER_WIDTHS[e.provider] for e in family.extra_inputs
               if e.provider in PROVIDER_WIDTHS)


# -- the families -------------------------------------------------------------------------------
SD1 = register_family(Family(
    "sd1", "Stable Diffusion 1.x (CLIP ViT-L text encoder, 512x512)",
    (TextEncoderSpec("text_encoder", "clip", 768, prefix="cond_stage_model.transformer."),),
    context_dim=768, config="sd1", unet_block_widths=(320, 640, 1280, 1280)))
SD2 = register_family(Family(
    "sd2", "Stable Diffusion 2.x base (OpenCLIP ViT-H text encoder up to its penultimate layer, 512x512)",
    (TextEncoderSpec("text_encoder", "openclip", 1024, prefix="cond_stage_model.model.", pad_token="!"),),
    context_dim=1024, config="sd2", unet_block_widths=(320, 640, 1280, 1280)))
SD2_V = register_family(Family(
    "sd2-v", "Stable Diffusion 2.x 768-v (v-prediction, 768x768)", SD2.text_encoders, context_dim=1024,
    default_size=768, prediction_type="v_prediction", config="sd2-v", variant_of="sd2"))
# Inpainting models: the same layouts with a 9-channel UNet input (latents, mask, masked-image latents).
SD1_INPAINTING = register_family(Family(
    "sd1-inpainting", "Stable Diffusion 1.x inpainting (9-channel UNet)", SD1.text_encoders, context_dim=768,
    unet_in_channels=9, config="sd1-inpainting", variant_of="sd1"))
SD2_INPAINTING = register_family(Family(
    "sd2-inpainting", "Stable Diffusion 2.x inpainting (9-channel UNet)", SD2.text_encoders, context_dim=1024,
    unet_in_channels=9, config="sd2-inpainting", variant_of="sd2"))
# SDXL: CLIP ViT-L and OpenCLIP ViT-bigG side by side (768 + 1280 = 2048), both at their
# penultimate layer without the final norm; bigG's projected pooled output and the size
# micro-conditioning enter through the UNet's text_time embedding.
SDXL = register_family(Family(
    "sdxl", "Stable Diffusion XL base (CLIP ViT-L + OpenCLIP ViT-bigG, 1024x1024)",
    (TextEncoderSpec("text_encoder", "clip", 768, prefix="conditioner.embedders.0.transformer.",
                     hidden_layer=-2, final_norm=False, lora_prefix="lora_te1_", embedding_key="clip_l"),
     TextEncoderSpec("text_encoder_2", "openclip", 1280, prefix="conditioner.embedders.1.model.", pad_token="!",
                     hidden_layer=-2, final_norm=False, pooled=True, lora_prefix="lora_te2_", embedding_key="clip_g")),
    context_dim=2048, extra_inputs=(ExtraInput("text_embeds", "pooled"), ExtraInput("time_ids", "time_ids")),
    unet_config={"addition_embed_type": "text_time"}, scaling_factor=0.13025, default_size=1024, config="sdxl",
    zero_empty_negative=True, align_your_steps="sdxl", unet_block_widths=(320, 640, 1280)))
# The refiner: bigG alone (diffusers and Apple name it the second text encoder), and an
# aesthetic score in place of the target size.
SDXL_REFINER = register_family(Family(
    "sdxl-refiner", "Stable Diffusion XL refiner (OpenCLIP ViT-bigG, aesthetic-score conditioning)",
    (TextEncoderSpec("text_encoder_2", "openclip", 1280, prefix="conditioner.embedders.0.model.", pad_token="!",
                     hidden_layer=-2, final_norm=False, pooled=True, lora_prefix="lora_te2_", embedding_key="clip_g"),),
    context_dim=1280, extra_inputs=(ExtraInput("text_embeds", "pooled"), ExtraInput("time_ids", "aesthetic_time_ids")),
    unet_config={"addition_embed_type": "text_time"}, scaling_factor=0.13025, default_size=1024,
    config="sdxl-refiner", align_your_steps="sdxl", unet_block_widths=(384, 768, 1536, 1536)))
