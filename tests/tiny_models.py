"""Tiny Stable-Diffusion-architecture models built from small configs (no download), for tests.

The configs keep every structural feature of SD 1.x — down/up blocks with cross-attention,
a KL autoencoder, a CLIP text encoder with the real tokenizer vocabulary — at a size that runs a
full sampling loop in well under a second.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(16, 32),
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=16,
)
TEXT_CONFIG = dict(
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_hidden_layers=2,
    max_position_embeddings=77,
    vocab_size=49408,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
    projection_dim=32,
)
# Stable Diffusion 1.5's scheduler_config.json (values as published).
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

CLIP_FILES = Path(__file__).resolve().parents[1] / "coreml_sd" / "data" / "clip"


def build_tiny_modules(seed: int = 0, *, unet_config: dict | None = None, text_config: dict | None = None):
    """(text_encoder, unet, vae) with seeded random weights, fp32, eval mode (SD 1.x-shaped unless
    other UNet / text-encoder configs are given)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**(unet_config or UNET_CONFIG))
    vae = AutoencoderKL(**VAE_CONFIG)
    text_encoder = CLIPTextModel(CLIPTextConfig(**(text_config or TEXT_CONFIG)))
    # Fresh GroupNorm/LayerNorm weights are exactly 1/0; randomise them a little so tests notice
    # when a norm's affine parameters are dropped or swapped.
    with torch.no_grad():
        for module in (unet, vae, text_encoder):
            for name, p in module.named_parameters():
                if "norm" in name:
                    p.add_(0.05 * torch.randn_like(p))
    return tuple(m.eval().requires_grad_(False) for m in (text_encoder, unet, vae))


def write_tiny_diffusers_folder(path: Path, *, seed: int = 0, prediction_type: str = "epsilon",
                                scheduler: dict | None = None, unet_config: dict | None = None) -> Path:
    """Save a tiny SD1-architecture model as a diffusers folder with the bundled tokenizer files."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    text_encoder, unet, vae = build_tiny_modules(seed, unet_config=unet_config)
    sched_cfg = dict(scheduler or SD15_SCHEDULER)
    sched_cfg["prediction_type"] = prediction_type
    sched_cfg.pop("_class_name", None)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer(str(CLIP_FILES / "vocab.json"), str(CLIP_FILES / "merges.txt"), model_max_length=77),
        unet=unet,
        scheduler=PNDMScheduler.from_config(sched_cfg),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    pipe.save_pretrained(path, safe_serialization=True)
    # Keep the tokenizer folder minimal and explicit (vocab + merges), as community folders have it.
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(CLIP_FILES / name, path / "tokenizer" / name)
    return path


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
