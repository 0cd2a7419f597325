"""Tiny SDXL-architecture models built from small configs (no download), for tests.

Every structural feature of SDXL 1.0 is kept at a size that samples in well under a second:

* two text encoders side by side: CLIP (transformers' CLIPTextModel, quick_gelu) and an
  OpenCLIP-style CLIPTextModelWithProjection (gelu) whose projected pooled output feeds the
  UNet; both with three layers, so the penultimate hidden state SDXL uses is not the last, and
  SDXL's published legacy token ids (eos_token_id 2: the pooled row is the argmax token);
* a UNet with `addition_embed_type="text_time"` (pooled text + sinusoidal time ids), a first
  level without attention as SDXL's, two transformer layers in the second level and the middle
  block (`transformer_layers_per_block`), linear projections, per-level head counts;
* a KL VAE with SDXL's scaling factor and `force_upcast`;
* SDXL's scheduler config (EulerDiscreteScheduler, "leading" spacing, offset 1).

The refiner has the second text encoder alone (the same weights as the base's, as in SDXL 1.0)
and a UNet conditioned on the aesthetic score instead of the target size (time ids of 5).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tiny_models import CLIP_FILES, VAE_CONFIG

TIME_DIM = 8  # addition_time_embed_dim (256 in SDXL)
TEXT_CONFIG_1 = dict(  # CLIP ViT-L's kind, tiny; SDXL's published ids (bos 0, eos 2, pad 1)
    hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=3, max_position_embeddings=77,
    vocab_size=49408, hidden_act="quick_gelu", projection_dim=32, bos_token_id=0, eos_token_id=2, pad_token_id=1)
TEXT_CONFIG_2 = dict(  # OpenCLIP bigG's kind, tiny: another width, a projection of another width
    hidden_size=48, intermediate_size=96, num_attention_heads=4, num_hidden_layers=3, max_position_embeddings=77,
    vocab_size=49408, hidden_act="gelu", projection_dim=40, bos_token_id=0, eos_token_id=2, pad_token_id=1)
CONTEXT = TEXT_CONFIG_1["hidden_size"] + TEXT_CONFIG_2["hidden_size"]
POOLED = TEXT_CONFIG_2["projection_dim"]
UNET_CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=CONTEXT, attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2),
    use_linear_projection=True, norm_num_groups=8, addition_embed_type="text_time",
    addition_time_embed_dim=TIME_DIM, projection_class_embeddings_input_dim=POOLED + 6 * TIME_DIM)
REFINER_UNET_CONFIG = dict(
    UNET_CONFIG, cross_attention_dim=TEXT_CONFIG_2["hidden_size"], attention_head_dim=(2, 2),
    transformer_layers_per_block=2, projection_class_embeddings_input_dim=POOLED + 5 * TIME_DIM)
SDXL_VAE_CONFIG = dict(VAE_CONFIG, scaling_factor=0.13025, force_upcast=True)
# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json (values as published).
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}


def _jitter_norms(*modules) -> None:
    """Fresh norm weights are exactly 1/0: randomise them so a dropped or swapped norm is noticed."""
    import torch

    with torch.no_grad():
        for module in modules:
            for name, p in module.named_parameters():
                if "norm" in name:
                    p.add_(0.05 * torch.randn_like(p))


def build_text_encoders(seed: int = 0):
    """(CLIPTextModel, CLIPTextModelWithProjection), seeded, fp32, eval mode."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    te1 = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG_1))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_CONFIG_2))
    _jitter_norms(te1, te2)
    return te1.eval().requires_grad_(False), te2.eval().requires_grad_(False)


def build_unet(seed: int, config: dict):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**config)
    _jitter_norms(unet)
    with torch.no_grad():  # make the pooled text and the time ids matter as much as in a trained model
        unet.add_embedding.linear_1.weight.mul_(8)
    return unet.eval().requires_grad_(False)


def build_vae(seed: int):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**SDXL_VAE_CONFIG)
    _jitter_norms(vae)
    return vae.eval().requires_grad_(False)


def build_tiny_sdxl(seed: int = 0) -> dict:
    """Base modules by component name: text_encoder, text_encoder_2, unet, vae."""
    te1, te2 = build_text_encoders(seed)
    return {"text_encoder": te1, "text_encoder_2": te2, "unet": build_unet(seed + 1, UNET_CONFIG),
            "vae": build_vae(seed + 2)}


def build_tiny_refiner(base: dict, seed: int = 10) -> dict:
    """Refiner modules: the base's second text encoder and VAE, its own UNet."""
    return {"text_encoder_2": base["text_encoder_2"], "unet": build_unet(seed, REFINER_UNET_CONFIG),
            "vae": base["vae"]}


def tokenizers():
    """(tokenizer, tokenizer_2) as SDXL's: the same vocabulary, the second pads with "!"."""
    from transformers import CLIPTokenizer

    files = (str(CLIP_FILES / "vocab.json"), str(CLIP_FILES / "merges.txt"))
    return CLIPTokenizer(*files, model_max_length=77), CLIPTokenizer(*files, model_max_length=77, pad_token="!")


def scheduler():
    from diffusers import EulerDiscreteScheduler

    cfg = {k: v for k, v in SDXL_SCHEDULER.items() if k != "_class_name"}
    return EulerDiscreteScheduler.from_config(cfg)


def diffusers_pipeline(mods: dict):
    from diffusers import StableDiffusionXLPipeline

    tok1, tok2 = tokenizers()
    return StableDiffusionXLPipeline(
        vae=mods["vae"], text_encoder=mods["text_encoder"], text_encoder_2=mods["text_encoder_2"], tokenizer=tok1,
        tokenizer_2=tok2, unet=mods["unet"], scheduler=scheduler(), force_zeros_for_empty_prompt=True)


def diffusers_refiner_pipeline(mods: dict):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    _, tok2 = tokenizers()
    return StableDiffusionXLImg2ImgPipeline(
        vae=mods["vae"], text_encoder=None, text_encoder_2=mods["text_encoder_2"], tokenizer=None, tokenizer_2=tok2,
        unet=mods["unet"], scheduler=scheduler(), requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)


def save_folder(pipe, path: Path) -> Path:
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    pipe.save_pretrained(path, safe_serialization=True)
    for folder in ("tokenizer", "tokenizer_2"):  # vocab + merges, as community folders have them
        if (path / folder).is_dir():
            for name in ("vocab.json", "merges.txt"):
                shutil.copy(CLIP_FILES / name, path / folder / name)
    return path


def write_single_file(mods: dict, path: Path, *, family: str, dtype: str = "fp32", fmt: str = "safetensors",
                      with_vae: bool = True) -> Path:
    """The modules as one original-layout (SDXL / refiner) file, with its config next to it."""
    from coreml_sd.checkpoint.config import sidecar_path
    from coreml_sd.checkpoint.writer import config_from_modules, write_original_checkpoint
    from coreml_sd.config import SchedulerConfig

    sched = SchedulerConfig.from_dict(SDXL_SCHEDULER)
    write_original_checkpoint(mods.get("text_encoder"), mods["unet"], mods["vae"], path, dtype=dtype, fmt=fmt,
                              family=family, text_encoder_2=mods["text_encoder_2"], with_vae=with_vae)
    config_from_modules(mods.get("text_encoder"), mods["unet"], mods["vae"], family=family, scheduler=sched,
                        text_encoder_2=mods["text_encoder_2"]).write(sidecar_path(Path(path)))
    return Path(path)
