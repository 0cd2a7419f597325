"""Neural-Engine rewrites of the Stable Diffusion modules, built from the upstream modules.

Each builder takes a loaded diffusers/transformers module and returns the rewrite holding the
same weight tensors (no copy). Modules compute through an `ops` argument (see `ops.py`): with
the default they are plain torch modules; with `MilOps` they emit a Core ML program.
"""

from __future__ import annotations

from coreml_sd.errors import ModelError, choices_text
from conversion.ane.attention import ATTENTION_IMPLEMENTATIONS
from conversion.ane.config import ControlNetConfig, TextEncoderConfig, UNetConfig, VAEConfig
from conversion.ane.loading import load_rewrite, strip_prefix, with_prefix

# Buffers that upstream modules register but that are not weights (recomputed here).
_NON_WEIGHTS = ("embeddings.position_ids",)


def check_attention(attention: str) -> str:
    if attention not in ATTENTION_IMPLEMENTATIONS:
        raise ModelError(f"unknown attention implementation {attention!r}; valid: "
                         f"{choices_text(ATTENTION_IMPLEMENTATIONS)}")
    return attention


def unet_from_diffusers(unet, *, attention: str = "split_einsum_v2"):
    from conversion.ane.unet import UNet

    config = UNetConfig.from_diffusers(unet.config)
    return load_rewrite(lambda: UNet(config, attention=check_attention(attention)), unet.state_dict(),
                        what="UNet")


def controlnet_from_diffusers(controlnet, *, attention: str = "split_einsum_v2"):
    from conversion.ane.controlnet import ControlNet

    config = ControlNetConfig.from_diffusers(controlnet.config)
    return load_rewrite(lambda: ControlNet(config, attention=check_attention(attention)), controlnet.state_dict(),
                        what="ControlNet")


def vae_decoder_from_diffusers(vae, *, attention: str = "split_einsum_v2"):
    from conversion.ane.vae import VAEDecoder

    config = VAEConfig.from_diffusers(vae.config)
    state = with_prefix(vae.state_dict(), ("decoder.", "post_quant_conv."))
    return load_rewrite(lambda: VAEDecoder(config, attention=check_attention(attention)), state,
                        what="VAE decoder")


def vae_encoder_from_diffusers(vae, *, attention: str = "split_einsum_v2"):
    from conversion.ane.vae import VAEEncoder

    config = VAEConfig.from_diffusers(vae.config)
    state = with_prefix(vae.state_dict(), ("encoder.", "quant_conv."))
    return load_rewrite(lambda: VAEEncoder(config, attention=check_attention(attention)), state,
                        what="VAE encoder")


def text_encoder_from_transformers(text_encoder, *, attention: str = "split_einsum_v2"):
    from conversion.ane.text_encoder import TextEncoder

    config = TextEncoderConfig.from_transformers(text_encoder.config)
    state = strip_prefix(text_encoder.state_dict(), "text_model.")
    state = {k: v for k, v in state.items() if k not in _NON_WEIGHTS}
    return load_rewrite(lambda: TextEncoder(config, attention=check_attention(attention)), state,
                        what="text encoder")
