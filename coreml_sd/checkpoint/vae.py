"""A replacement VAE (`--vae FILE`): original layout (`vae-ft-mse-840000-ema-pruned.safetensors`,
A1111 `.vae.pt`) or diffusers layout (a `diffusion_pytorch_model.safetensors`, or its folder).

The VAE's shapes come from the model it is used with (every SD 1.x/2.x VAE has the same
architecture); its scaling factor stays the model's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from coreml_sd.checkpoint import detect, keymap
from coreml_sd.checkpoint.safeload import flat_state_dict, load_tensor_file, sha256_file, tensor_shapes
from coreml_sd.errors import ModelError

_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# Attention names of diffusers VAEs saved before diffusers 0.14.
_OLD_ATTENTION = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


class VaeFile:
    def __init__(self, path: str | Path):
        path = Path(path).expanduser()
        if path.is_dir():
            found = [path / n for n in _DIFFUSERS_WEIGHTS if (path / n).is_file()]
            if not found:
                raise ModelError(f"VAE folder {path} has no {' or '.join(_DIFFUSERS_WEIGHTS)}")
            path = found[0]
        if not path.is_file():
            raise ModelError(f"VAE not found: {path} (expected a .safetensors/.pt file or a diffusers VAE folder)")
        self.path = path
        shapes, _ = tensor_shapes(path)
        det = detect.classify(shapes)
        if det.kind != "vae":
            what = {"model": f"a full {det.family or ''} checkpoint".replace("  ", " "), "lora": "a LoRA",
                    "embedding": "an embedding"}.get(det.kind, f"not a VAE ({det.found})")
            raise ModelError(f"{path} is {what}; --vae expects a VAE file (encoder.*/decoder.* keys)")
        self.diffusers_layout = any(".down_blocks." in k or ".up_blocks." in k for k in shapes)
        self.hash = sha256_file(path)[:10]

    def state(self, config: Mapping) -> dict[str, Any]:
        sd = flat_state_dict(load_tensor_file(self.path)[0], self.path)
        if self.diffusers_layout:
            return {_rename_old(k): v for k, v in sd.items()}
        return keymap.vae_from_original(sd, config, keymap.vae_prefix(sd))

    def module(self, config: Mapping, *, dtype=None, device: str = "cpu"):
        from coreml_sd.checkpoint.loader import fill, new_vae

        return fill(new_vae(config), self.state(config), f"VAE {self.path.name}", dtype=dtype, device=device)


def _rename_old(key: str) -> str:
    for old, new in _OLD_ATTENTION.items():
        if old in key:
            return key.replace(old, new)
    return key
