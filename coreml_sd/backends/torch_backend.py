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

    def __init__(self, module, dtype, *, cuda_graphs: bool = False):
        self.module, self.dtype, self.cuda_graphs = module, dtype, cuda_graphs

    @torch.inference_mode()
    def predict(self, sample, timestep, encoder_hidden_states):
        if self.cuda_graphs:  # each call is a new replay of the recorded graph
            torch.compiler.cudagraph_mark_step_begin()
        out = self.module(
            sample.to(self.dtype), timestep, encoder_hidden_states=encoder_hidden_states.to(self.dtype)
        ).sample
        if self.cuda_graphs and out.dtype == torch.float32:
            return out.clone()  # the graph's output buffer is overwritten by the next replay
        return out.float()


class TorchVAEDecoder:
    def __init__(self, module, dtype):
        self.module, self.dtype = module, dtype

    @torch.inference_mode()
    def decode(self, z):
        return self.module.decode(z.to(self.dtype)).sample.float()


def components_from_modules(mods: TorchModules, *, device: str, precision: str,
                            compile: str | None = None) -> Components:
    """`compile`: a `torch_compile.COMPILE_MODES` mode for the UNet (None: eager)."""
    dtype = torch_dtype(precision)
    where = f"torch {device} {precision}"
    if compile:
        from coreml_sd.backends.torch_compile import compile_unet, uses_cuda_graphs

        unet = TorchUNet(compile_unet(mods.unet, compile, device=device), dtype,
                         cuda_graphs=uses_cuda_graphs(compile, device))
    else:
        unet = TorchUNet(mods.unet, dtype)

    def asarray(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    return Components(
        text_encoder=TorchTextEncoder(mods.text_encoder, device),
        unet=unet,
        vae_decoder=TorchVAEDecoder(mods.vae, dtype),
        asarray=asarray,
        runs_on={"text_encoder": where, "unet": where + (f" compiled ({compile})" if compile else ""),
                 "vae_decoder": where},
    )


def load_components(source: ModelSource, *, device: str = "auto", precision: str = "auto",
                    compile: str | None = None) -> Components:
    """`compile`: torch.compile the UNet in this mode (see `torch_compile.py`; for GPUs). None: eager."""
    if compile:
        from coreml_sd.backends.torch_compile import check_mode

        check_mode(compile)
    require_torch_modules(source)
    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    mods = source.torch_modules(device=device, dtype=torch_dtype(precision))
    return components_from_modules(mods, device=device, precision=precision, compile=compile)


def load_component(source: ModelSource, component: str, *, device: str = "auto", precision: str = "auto",
                   compile: str | None = None, modules: TorchModules | None = None):
    """One component on torch: (component, runs_on, device). `modules`: the source's modules when
    already loaded for another component of the same load (same device and precision)."""
    if compile and component == "unet":
        from coreml_sd.backends.torch_compile import check_mode

        check_mode(compile)
    require_torch_modules(source)
    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    mods = modules or source.torch_modules(device=device, dtype=torch_dtype(precision))
    compile = compile if component == "unet" else None
    built = components_from_modules(mods, device=device, precision=precision, compile=compile)
    return getattr(built, component), built.runs_on[component], device
