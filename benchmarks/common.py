"""Shared pieces of the benchmark scripts: machine facts, peak memory, SD1.5-size random models.

Every result file records the machine it came from and library versions: a latency without them
misleads. Full-size models are built from SD 1.5's published configs with random weights —
latency and memory do not depend on weight values.
"""

from __future__ import annotations

import json
from pathlib import Path

# Machine facts, memory and timing summaries live in the package (`coreml-sd bench` uses them too);
# re-exported here so every script records the same facts.
from coreml_sd.bench.machine import RSSSampler, machine_info, peak_rss_gib  # noqa: F401
from coreml_sd.bench.stats import summarize  # noqa: F401

RESULTS = Path(__file__).resolve().parent / "results"

# Stable Diffusion 1.5 (runwayml/stable-diffusion-v1-5) configs, as published.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
SD15_TEXT = dict(
    hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
    max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=768,
    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)


def sd15_unet(seed: int = 0):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**SD15_UNET).eval().requires_grad_(False)


def sd15_vae(seed: int = 0):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**SD15_VAE).eval().requires_grad_(False)


def sd15_text_encoder(seed: int = 0):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(**SD15_TEXT)).eval().requires_grad_(False)


def write_result(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
