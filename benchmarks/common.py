"""Shared pieces of the benchmark scripts: machine facts, peak memory, SD1.5-size random models.

Every result file records the machine it came from and library versions: a latency without them
misleads. Full-size models are built from SD 1.5's published configs (shipped in the package) with random weights —
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

def sd15_config():
    """Stable Diffusion 1.5's configs, as the package ships them (the family registry's sd1 config)."""
    from coreml_sd.checkpoint.config import shipped_config

    return shipped_config("sd1")


def sd15_unet(seed: int = 0):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**sd15_config().unet).eval().requires_grad_(False)


def sd15_vae(seed: int = 0):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**sd15_config().vae).eval().requires_grad_(False)


def sd15_text_encoder(seed: int = 0):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(**sd15_config().text_encoder)).eval().requires_grad_(False)


def write_result(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
