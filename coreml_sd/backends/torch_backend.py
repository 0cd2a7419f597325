"""The torch backend: diffusers/transformers modules on cpu, cuda or mps."""

from __future__ import annotations

import numpy as np
import torch

from coreml_sd.backends import Components
from coreml_sd.devices import resolve_device, resolve_precision, torch_dtype
from coreml_sd.sources import ModelSource, TorchModules, require_torch_modules


class TorchTextEncoder:
    def __init__(self, module, device: str):
        self.module, self.device = module, device

    @torch.inference_mode()
    def encode(self, input_ids):
        ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long, device=self.device)
        return self.module(ids)[0].float()  # (B, 77, C) last_hidden_state


class TorchUNet:
    batch_size = None

    def __init__(self, module, dtype):
        self.module, self.dtype = module, dtype

    @torch.inference_mode()
    def predict(self, sample, timestep, encoder_hidden_states):
        out = self.module(
            sample.to(self.dtype), timestep, encoder_hidden_states=encoder_hidden_states.to(self.dtype)
        ).sample
        return out.float()


class TorchVAEDecoder:
    def __init__(self, module, dtype):
        self.module, self.dtype = module, dtype

    @torch.inference_mode()
    def decode(self, z):
        return self.module.decode(z.to(self.dtype)).sample.float()


def components_from_modules(mods: TorchModules, *, device: str, precision: str) -> Components:
    dtype = torch_dtype(precision)
    where = f"torch {device} {precision}"

    def asarray(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    return Components(
        text_encoder=TorchTextEncoder(mods.text_encoder, device),
        unet=TorchUNet(mods.unet, dtype),
        vae_decoder=TorchVAEDecoder(mods.vae, dtype),
        asarray=asarray,
        runs_on={"text_encoder": where, "unet": where, "vae_decoder": where},
    )


def load_components(source: ModelSource, *, device: str = "auto", precision: str = "auto") -> Components:
    require_torch_modules(source)
    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    mods = source.torch_modules(device=device, dtype=torch_dtype(precision))
    if device == "cpu":
        from coreml_sd.backends.cpu_prepack import prepack

        for module in (mods.text_encoder, mods.unet, mods.vae):
            prepack(module)
    return components_from_modules(mods, device=device, precision=precision)
