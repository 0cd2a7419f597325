"""The torch backend: diffusers/transformers modules on cpu, cuda or mps, behind the component contract.

`load_component(source, component, ...)` builds one component from the source's modules (loaded
once per load and shared by its components). The text encoder returns the hidden state its family
feeds the UNet (`TextEncoderSpec.hidden_layer`/`final_norm`) and its pooled output; the UNet takes
the whole `Conditioning` and hands each field to diffusers where diffusers takes it.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import torch

from coreml_sd.components import role
from coreml_sd.conditioning import Conditioning, TextEncoding
from coreml_sd.devices import resolve_device, resolve_precision, torch_dtype
from coreml_sd.families import Family, TextEncoderSpec
from coreml_sd.model_source import ModelSource, TorchModules, require_torch

log = logging.getLogger("coreml_sd")


class TorchTextEncoder:
    def __init__(self, module, spec: TextEncoderSpec, device: str):
        self.module, self.spec, self.device = module, spec, device

    @torch.inference_mode()
    def encode(self, input_ids, clip_skip: int = 1) -> TextEncoding:
        """`clip_skip` N: the hidden state N - 1 layers before the family's (A1111's "Clip skip")."""
        ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long, device=self.device)
        spec = self.spec
        layer = spec.hidden_layer - (clip_skip - 1)
        hidden_states = layer != -1 or not spec.final_norm
        out = self.module(ids, output_hidden_states=hidden_states)
        if hidden_states:
            hidden = out.hidden_states[layer]
            if spec.final_norm:
                hidden = final_layer_norm(self.module)(hidden)
        else:
            hidden = out.last_hidden_state
        pooled = getattr(out, "text_embeds", None)  # CLIPTextModelWithProjection's projected pooled output
        if pooled is None:
            pooled = out.pooler_output
        return TextEncoding(hidden.float(), pooled.float())


def final_layer_norm(module):
    """A CLIP text model's final layer norm (transformers 5 keeps it on CLIPTextModel itself, and
    under `text_model` in CLIPTextModelWithProjection)."""
    return getattr(module, "final_layer_norm", None) or module.text_model.final_layer_norm


class TorchUNet:
    batch_size = None

    def __init__(self, module, dtype, family: Family, *, cuda_graphs: bool = False):
        self.module, self.dtype, self.family, self.cuda_graphs = module, dtype, family, cuda_graphs

    def _kwargs(self, cond: Conditioning) -> dict:
        """diffusers' UNet arguments for everything of `cond` beside the sample and the timestep."""
        cast = (lambda a: a.to(self.dtype))
        kwargs = {"encoder_hidden_states": cast(cond.context)}
        for extra in self.family.extra_inputs:
            value = cast(cond.extra[extra.name])
            if extra.diffusers_arg == "class_labels":
                kwargs["class_labels"] = value
            else:
                kwargs.setdefault("added_cond_kwargs", {})[extra.name] = value
        if cond.control is not None:
            *down, mid = (cast(c) for c in cond.control)
            kwargs["down_block_additional_residuals"] = tuple(down)
            kwargs["mid_block_additional_residual"] = mid
        return kwargs

    @torch.inference_mode()
    def predict(self, sample, timestep, cond: Conditioning):
        if self.cuda_graphs:  # each call is a new replay of the recorded graph
            torch.compiler.cudagraph_mark_step_begin()
        if cond.latent_extra is not None:  # inpainting UNets: latents, mask and masked-image latents
            sample = torch.cat([sample, cond.latent_extra], dim=1)
        out = self.module(sample.to(self.dtype), timestep, **self._kwargs(cond)).sample
        if self.cuda_graphs and out.dtype == torch.float32:
            return out.clone()  # the graph's output buffer is overwritten by the next replay
        return out.float()


class TorchVAEDecoder:
    """The VAE decoder; in fp16 it decodes in fp32 where fp16 overflows.

    SDXL's VAE overflows in fp16 (inf, then NaN: a black image). As diffusers, a VAE whose config
    says `force_upcast` decodes in fp32 from the start; any other whose fp16 decode is not finite
    decodes again in fp32, from then on (A1111's "automatically revert VAE to 32-bit floats").
    bf16 has fp32's range and never overflows here.
    """

    def __init__(self, module, dtype):
        self.module, self.dtype = module, dtype
        self.upcast = dtype == torch.float16 and bool(getattr(module.config, "force_upcast", False))
        self._fp32 = None

    @torch.inference_mode()
    def decode(self, z):
        if self.upcast:
            return self._decode_fp32(z)
        out = self.module.decode(z.to(self.dtype)).sample.float()
        if self.dtype == torch.float16 and not bool(torch.isfinite(out).all()):
            log.warning("the VAE decoder overflowed in fp16 (NaN/inf values); decoding in fp32 from now on")
            self.upcast = True
            return self._decode_fp32(z)
        return out

    def _decode_fp32(self, z):
        if self._fp32 is None:  # an fp32 copy, made once; the fp16 module stays for the VAE encoder
            self._fp32 = copy.deepcopy(self.module).float()
        return self._fp32.decode(z.float()).sample


class TorchVAEEncoder:
    def __init__(self, module, dtype):
        self.module, self.dtype = module, dtype

    @torch.inference_mode()
    def encode(self, x):
        """image (B, 3, H, W) in [-1, 1] -> mean and log-variance (B, 2C, h, w), as Core ML's VAEEncoder."""
        return self.module.encode(x.to(self.dtype)).latent_dist.parameters.float()


class TorchControlNet:
    """diffusers' ControlNetModel behind the ControlNet contract: the unscaled residuals (conditioning
    scale 1), down blocks then middle block; the control stage weights and sums them."""

    batch_size = None

    def __init__(self, module, dtype):
        self.module, self.dtype = module, dtype

    def _kwargs(self, cond: Conditioning) -> dict:
        config = self.module.config
        if config.get("class_embed_type") and "class_labels" in cond.extra:
            return {"class_labels": cond.extra["class_labels"].to(self.dtype)}
        if config.get("addition_embed_type"):  # SDXL ControlNets: text_embeds and time_ids
            return {"added_cond_kwargs": {k: v.to(self.dtype) for k, v in cond.extra.items()}}
        return {}

    @torch.inference_mode()
    def residuals(self, sample, timestep, cond: Conditioning, image) -> tuple:
        down, mid = self.module(sample.to(self.dtype), timestep, encoder_hidden_states=cond.context.to(self.dtype),
                                controlnet_cond=image.to(self.dtype), conditioning_scale=1.0, guess_mode=False,
                                return_dict=False, **self._kwargs(cond))
        return tuple(r.float() for r in (*down, mid))


def load_component(source: ModelSource, component: str, *, device: str = "auto", precision: str = "auto",
                   compile: str | None = None, modules: TorchModules | None = None):
    """One component on torch: (component, runs_on, device). `modules`: the source's modules when
    already loaded for another component of the same load (same device and precision); `compile`:
    torch.compile the UNet in this mode (see `torch_compile.py`)."""
    if compile and component == "unet":
        from coreml_sd.backends.torch_compile import check_mode

        check_mode(compile)
    require_torch(source)
    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    dtype = torch_dtype(precision)
    mods = modules or source.torch_modules(device=device, dtype=dtype)
    where = f"torch {device} {precision}"
    module = mods.module(component)
    kind = role(component)
    if kind == "text_encoder":
        return TorchTextEncoder(module, source.info.spec.text_encoder(component), device), where, device
    if kind == "vae_decoder":
        return TorchVAEDecoder(module, dtype), where, device
    if kind == "vae_encoder":
        return TorchVAEEncoder(module, dtype), where, device
    if kind == "controlnet":
        return TorchControlNet(module, dtype), where, device
    if compile:
        from coreml_sd.backends.torch_compile import compile_unet, resolve_mode, uses_cuda_graphs

        mode = resolve_mode(compile, device, dtype)
        if mode is None:  # `auto` where compiling was not measured to pay
            return TorchUNet(module, dtype, source.info.spec), f"{where} (compile auto: eager here)", device
        unet = TorchUNet(compile_unet(module, mode, device=device), dtype, source.info.spec,
                         cuda_graphs=uses_cuda_graphs(mode, device))
        return unet, f"{where} compiled ({mode})", device
    return TorchUNet(module, dtype, source.info.spec), where, device
