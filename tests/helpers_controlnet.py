"""Tiny ControlNets for tests: built from the tiny UNet as diffusers does, with output convolutions
that are NOT zero (a fresh ControlNet's are, and would change nothing), saved as a diffusers folder
or as a single file in the original `control_model.*` layout."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

# The tiny VAE halves the size once, so the ControlNet's hint block downsamples once (two widths).
HINT_CHANNELS = (8, 16)


def build_tiny_controlnet(unet, seed: int = 1, *, strength: float = 0.5):
    """ControlNetModel.from_unet(unet) with its zero convolutions (and the hint block's last) made
    random, so the control image matters."""
    import torch
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=HINT_CHANNELS)
    with torch.no_grad():
        zero_convs = [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]
        for conv in zero_convs:
            conv.weight.copy_(torch.randn_like(conv.weight) * strength / conv.weight[0].numel() ** 0.5)
            conv.bias.copy_(torch.randn_like(conv.bias) * 0.05)
    return net.eval().requires_grad_(False)


def write_controlnet_folder(path: Path, net) -> Path:
    net.save_pretrained(path, safe_serialization=True)
    return Path(path)


def original_state(net, prefix: str = "control_model.") -> dict:
    """The ControlNet's tensors under their original (cldm) names."""
    from coreml_sd.checkpoint.controlnet_keymap import controlnet_to_original
    from coreml_sd.checkpoint.keymap import apply_mapper

    return apply_mapper(controlnet_to_original(dict(net.config), prefix), net.state_dict())


def write_controlnet_file(path: Path, net, *, dtype: str = "fp32", prefix: str = "control_model.",
                          family: str | None = "sd1", sidecar: bool = True) -> Path:
    """The ControlNet as one original-layout file (.safetensors or a torch .pth), with its config
    beside it (<stem>.coreml-sd.json), as a non-standard-size file needs."""
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    state = {k: v.to(torch.float16 if dtype == "fp16" else torch.float32).contiguous().clone()
             for k, v in original_state(net, prefix).items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state} if prefix else state, path)
    if sidecar:
        config = {k: v for k, v in dict(net.config).items() if not k.startswith("_")}
        path.with_name(path.stem + ".coreml-sd.json").write_text(json.dumps({"family": family, "controlnet": config}))
    return path


def control_picture(width: int = 16, height: int = 16, seed: int = 3) -> Image.Image:
    """A blocky black-and-white map, like an edge or scribble map."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 2, (height // 4 + 1, width // 4 + 1), dtype=np.uint8) * 255
    big = np.kron(cells, np.ones((4, 4), np.uint8))[:height, :width]
    return Image.fromarray(np.stack([big] * 3, axis=2), "RGB")


@lru_cache(maxsize=None)
def diffusers_controlnet_pipeline(model_dir: str, *controlnet_dirs: str):
    """diffusers' StableDiffusionControlNetPipeline over the tiny model and ControlNet folder(s)."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline

    base = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False,
                                                   local_files_only=True)
    nets = [ControlNetModel.from_pretrained(d, local_files_only=True) for d in controlnet_dirs]
    pipe = StableDiffusionControlNetPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
        scheduler=base.scheduler, controlnet=nets[0] if len(nets) == 1 else nets, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def full_size_controlnet_shapes(family: str, prefix: str = "control_model.") -> dict:
    """key -> TensorInfo of a full-size ControlNet file for `family`'s UNet, built on the meta device."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    from coreml_sd.checkpoint.config import shipped_config
    from coreml_sd.checkpoint.safeload import TensorInfo

    with torch.device("meta"):
        net = ControlNetModel.from_unet(UNet2DConditionModel(**dict(shipped_config(family).unet)))
    return {k: TensorInfo("F16", tuple(t.shape)) for k, t in original_state(net, prefix).items()}
