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
numpy arrays (noise, token ids) into the sampling loop's kind (the UNet's).

A backend is registered by name as a `Backend`: a cheap check of whether it can run a component of
a model here (no weights loaded), a description of where it would run, and a loader of one
component. `coreml_sd.backends.selection` resolves `--backend` (one name, a fallback order, or
per component) over them, with fallback and just-in-time loading (`--reduce-memory`).
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

    def release(self, name: str) -> None:
        """Done with `name` for now: a just-in-time component (--reduce-memory) frees its model."""
        release = getattr(getattr(self, name), "release", None)
        if callable(release):
            release()


@dataclass(frozen=True)
class LoadOptions:
    """How to load components; each backend reads the options that concern it."""

    device: str = "auto"  # torch, mil: auto | cpu | cuda | mps
    precision: str = "auto"  # torch, mil: auto | fp32 | fp16 | bf16
    compute_units: str = "all"  # coreml: ane | gpu | cpu | all (or Core ML's names)
    compile: str | None = None  # torch: a torch.compile mode for the UNet (torch_compile.COMPILE_MODES)


@dataclass
class Loaded:
    """One component as a backend loaded it."""

    component: Any
    runs_on: str  # e.g. "coreml ane (CPU_AND_NE)", "mil cpu fast (bf16)", "torch cpu fp32"
    array: Any  # interop.ArrayKind the component computes on


class Backend(Protocol):
    name: str

    def unavailable_reason(self, source, component: str, options: LoadOptions) -> str | None:
        """Why this backend cannot run `component` of `source` here, known without loading weights."""

    def describe(self, source, component: str, options: LoadOptions) -> str:
        """Where the component would run (for `coreml-sd info`), without loading weights."""

    def load(self, source, component: str, options: LoadOptions, shared: dict) -> Loaded:
        """Load the component (raises CoreMLSDError when it cannot). `shared`: state that the
        components of one load may share (e.g. torch modules loaded once)."""


# name -> "module:attribute" of a Backend. Imported lazily; the objects themselves import their
# engine only when loading, so choosing or describing one backend never imports another's engine.
_BACKENDS: dict[str, str] = {
    "coreml": "coreml_sd.backends.standard:COREML",
    "mil": "coreml_sd.backends.standard:MIL",
    "torch": "coreml_sd.backends.standard:TORCH",
}


def register_backend(name: str, target: str, *, override: bool = False) -> None:
    """Register a backend ("module:attribute" of a `Backend`); a second registration must say override."""
    if name in _BACKENDS and not override:
        raise ValueError(f"backend {name!r} is already registered as {_BACKENDS[name]!r}")
    _BACKENDS[name] = target


def backend_names() -> tuple[str, ...]:
    return tuple(_BACKENDS)


def get_backend(name: str) -> Backend:
    if name not in _BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r}; valid backends: {choices_text(_BACKENDS)}")
    import importlib

    module, attr = _BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), attr)


def get_loader(name: str) -> Callable[..., Components]:
    """A function (source, **LoadOptions fields) -> Components, all three on backend `name` (no fallback)."""
    get_backend(name)  # unknown names fail here

    def load(source, **options) -> Components:
        from coreml_sd.backends.selection import load_components, parse_backend

        return load_components(source, parse_backend(name), LoadOptions(**options))

    return load
