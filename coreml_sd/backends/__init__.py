"""The contract every backend implements, one small interface per component role.

A backend turns a model source into components (`coreml_sd.components`: text encoders, UNet,
VAE decoder and encoder). Arrays crossing the contract use diffusers' conventions whatever the
engine wants inside (a Core ML package's (B, C, 1, S) text layout, fp16 inputs, fixed batch ...):
adapting is the component's job, so the pipeline and the samplers never know which engine runs.

    TextEncoder.encode(input_ids int64 (B, 77))    -> TextEncoding(hidden (B, 77, C), pooled (B, P) | None)
    UNet.predict(sample (B, 4, h, w), timestep (B,) float32, cond: Conditioning)
                                                   -> model output (B, 4, h, w), float32
    ControlNet.residuals(sample (B, 4, h, w), timestep (B,), cond: Conditioning, image (B, 3, H, W) in [0, 1])
                                                   -> residuals, down blocks then middle block, float32
    VAEDecoder.decode(z (B, 4, h, w), already / scaling_factor) -> image (B, 3, H, W) in [-1, 1], float32
    VAEEncoder.encode(x (B, 3, H, W) in [-1, 1])   -> mean and log-variance (B, 8, h, w), float32

Arrays are numpy (coreml) or torch tensors (torch, mil); `Components.asarray` turns the runtime's
numpy arrays (noise, token ids) into the sampling loop's kind (the UNet's).

A backend is registered by name as a `Backend`: a cheap check of whether it can run a component of
a model here (no weights loaded), a description of where it would run, and a loader of one
component. `coreml_sd.backends.selection` resolves `--backend` (one name, a fallback order, or
per component) over them and is the one route that loads components, with fallback and
just-in-time loading (`--reduce-memory`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from coreml_sd.components import KINDS
from coreml_sd.conditioning import Conditioning, TextEncoding
from coreml_sd.errors import BackendUnavailable, InputError, choices_text


class TextEncoder(Protocol):
    def encode(self, input_ids) -> TextEncoding: ...


class UNet(Protocol):
    # Fixed batch a compiled component accepts (Core ML packages: 2 for guidance, 1 without);
    # None when any batch works.
    batch_size: int | None

    def predict(self, sample, timestep, cond: Conditioning) -> Any: ...


class ControlNet(Protocol):
    batch_size: int | None

    def residuals(self, sample, timestep, cond: Conditioning, image) -> tuple: ...


class VAEDecoder(Protocol):
    def decode(self, z) -> Any: ...


class VAEEncoder(Protocol):
    def encode(self, x) -> Any: ...


@dataclass(frozen=True)
class LoadOptions:
    """How to load components; each backend reads the options that concern it."""

    device: str = "auto"  # torch, mil: auto | cpu | cuda | mps
    precision: str = "auto"  # torch, mil: auto | fp32 | fp16 | bf16
    compute_units: str = "all"  # coreml: ane | gpu | cpu | all (or Core ML's names)
    compile: str | None = None  # torch: a torch.compile mode for the UNet (torch_compile.COMPILE_MODES)
    mil_mode: str = "fast"  # mil: fast, or exact (Core ML's fp16 rounding, to verify packages)
    check_hashes: bool = True  # packages must match the hashes their manifest recorded (verify measures any)


@dataclass
class Loaded:
    """One component as a backend loaded it."""

    component: Any
    runs_on: str  # e.g. "coreml ane (CPU_AND_NE)", "mil cpu fast (bf16)", "torch cpu fp32"
    array: Any  # interop.ArrayKind the component computes on


@dataclass
class Fallback:
    """A backend a component did not run on, and why (data for logs, `info` and the bench)."""

    backend: str
    reason: str

    def to_dict(self) -> dict:
        return {"backend": self.backend, "reason": self.reason}


@dataclass
class Components:
    """The components of one load, by name, and how they run.

    Components the load was asked for are loaded (or, with --reduce-memory, load at first use);
    others the model has (a VAE encoder for an init image) load through `load_more` when first
    asked for, on the same backend route.
    """

    parts: dict[str, Any]
    asarray: Callable[[Any], Any]
    # component -> human-readable "where and how" (e.g. "torch cpu bf16"), for logs and `info`.
    runs_on: dict[str, str] = field(default_factory=dict)
    fallbacks: dict[str, list[Fallback]] = field(default_factory=dict)  # component -> what it fell back from
    backends: dict[str, str] = field(default_factory=dict)  # component -> backend name that runs it
    load_more: Callable[[str], Any] | None = None
    # (source, component, key) -> a component of another model source (a ControlNet file) loaded on
    # this load's route, request and array kind, kept under `key`
    load_other: Callable[[Any, str, str], Any] | None = None
    origins: dict[str, str] = field(default_factory=dict)  # key -> where a load_other component came from

    def __getitem__(self, name: str):
        if name not in self.parts and ":" in name:
            raise BackendUnavailable(f"the {name} was not loaded; loaded: {choices_text(self.parts)}")
        if name not in self.parts:
            if name not in KINDS:
                raise InputError(f"unknown component {name!r}; valid: {choices_text(KINDS)}")
            if self.load_more is None:
                raise BackendUnavailable(f"the {name} was not loaded; loaded: {choices_text(self.parts)}")
            self.parts[name] = self.load_more(name)
        return self.parts[name]

    def __contains__(self, name: str) -> bool:
        return name in self.parts

    def __getattr__(self, name: str):
        if name in KINDS and name != "parts":
            return self[name]
        raise AttributeError(name)

    def release(self, name: str) -> None:
        """Done with `name` for now: a just-in-time component (--reduce-memory) frees its model."""
        release = getattr(self.parts.get(name), "release", None)
        if callable(release):
            release()


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


def backend_names() -> tuple[str, ...]:
    return tuple(_BACKENDS)


def get_backend(name: str) -> Backend:
    if name not in _BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r}; valid backends: {choices_text(_BACKENDS)}")
    import importlib

    module, attr = _BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), attr)
