"""The contract every backend implements, one small interface per component.

A backend turns a model source into three components. Arrays crossing the contract use the
diffusers conventions whatever the engine wants inside (a Core ML package's (B, C, 1, S) text
embedding layout, fp16 inputs, fixed batch ...): adapting is the component's job, so the pipeline
and the samplers never know which engine runs.

    TextEncoder.encode(input_ids int64 (B, 77))               -> last_hidden_state (B, 77, C)
    UNet.predict(sample (B, 4, h, w), timestep (B,) float32,
                 encoder_hidden_states (B, 77, C))             -> model output (B, 4, h, w), float32
    VAEDecoder.decode(z (B, 4, h, w), already / scaling_factor) -> image (B, 3, H, W) in [-1, 1], float32

Arrays are numpy (coreml) or torch tensors (torch, mil); `Components.asarray` turns the runtime's
numpy arrays (noise, token ids) into the backend's kind.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from coreml_sd.errors import BackendUnavailable, choices_text

COMPONENTS = ("text_encoder", "unet", "vae_decoder")


class TextEncoder(Protocol):
    def encode(self, input_ids) -> Any: ...


class UNet(Protocol):
    # Fixed batch a compiled component accepts (Core ML packages: 2 for guidance, 1 without);
    # None when any batch works.
    batch_size: int | None

    def predict(self, sample, timestep, encoder_hidden_states) -> Any: ...


class VAEDecoder(Protocol):
    def decode(self, z) -> Any: ...


@dataclass
class Components:
    """What a backend built from a model source: the three components and how they run."""

    text_encoder: TextEncoder
    unet: UNet
    vae_decoder: VAEDecoder
    asarray: Callable[[Any], Any]
    # component -> human-readable "where and how" (e.g. "torch cpu bf16"), for logs and `info`.
    runs_on: dict[str, str] = field(default_factory=dict)


# name -> "module:function" building Components from (source, device=..., precision=...).
# Imported lazily so that choosing one backend never imports another's engine.
_BACKENDS: dict[str, str] = {
    "torch": "coreml_sd.backends.torch_backend:load_components",
    "mil": "coreml_sd.backends.folder:load_mil",
}


def register_backend(name: str, target: str, *, override: bool = False) -> None:
    """Register a backend loader ("module:function"); a second registration must say override."""
    if name in _BACKENDS and not override:
        raise ValueError(f"backend {name!r} is already registered as {_BACKENDS[name]!r}")
    _BACKENDS[name] = target


def backend_names() -> tuple[str, ...]:
    return tuple(_BACKENDS)


def get_loader(name: str) -> Callable[..., Components]:
    if name not in _BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r}; valid backends: {choices_text(_BACKENDS)}")
    import importlib

    module, func = _BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), func)
