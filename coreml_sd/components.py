"""Components as data: the parts a model is made of, their roles, and their Core ML package names.

A component kind has a role (what contract it implements: text_encoder, unet, vae_decoder,
vae_encoder) and the resource name Apple's Swift `StableDiffusion` package gives its Core ML
package, so folders we write load in Swift apps and folders they wrote load here. Which
components a request needs follows from the family (its text encoders) and the request (an init
image needs the VAE encoder): `required_components`. `TensorSpec` describes one package input or
output, wherever packages are described (manifests, package runners, the converter).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from coreml_sd.errors import InputError, ModelError, choices_text

ROLES = ("text_encoder", "unet", "vae_decoder", "vae_encoder")


@dataclass(frozen=True)
class ComponentKind:
    name: str
    role: str
    package: str  # Apple's Swift resource name (<package>.mlpackage / .mlmodelc)
    chunks: tuple[str, ...] = ()  # package names when split in chunks (UnetChunk1/2)


KINDS: dict[str, ComponentKind] = {k.name: k for k in (
    ComponentKind("text_encoder", "text_encoder", "TextEncoder"),
    ComponentKind("text_encoder_2", "text_encoder", "TextEncoder2"),
    ComponentKind("unet", "unet", "Unet", chunks=("UnetChunk1", "UnetChunk2")),
    ComponentKind("vae_decoder", "vae_decoder", "VAEDecoder"),
    ComponentKind("vae_encoder", "vae_encoder", "VAEEncoder"),
)}
# What a converted folder may hold beyond the runtime kinds: SDXL's refiner UNet beside the base's
# (Apple's layout; it shares TextEncoder2), loaded as the "unet" of the folder's refiner source.
FOLDER_KINDS: dict[str, ComponentKind] = {**KINDS, "unet_refiner": ComponentKind(
    "unet_refiner", "unet", "UnetRefiner", chunks=("UnetRefinerChunk1", "UnetRefinerChunk2"))}
# Manifest entries of chunked components: unet_chunk1, unet_chunk2 -> UnetChunk1, UnetChunk2 (and the refiner's).
CHUNKS: dict[str, dict[str, str]] = {k.name: {f"{k.name}_chunk{i + 1}": name for i, name in enumerate(k.chunks)}
                                     for k in FOLDER_KINDS.values() if k.chunks}
CHUNK_ENTRIES = CHUNKS["unet"]
PACKAGE_NAMES: dict[str, str] = {**{k.name: k.package for k in FOLDER_KINDS.values()},
                                 **{e: n for entries in CHUNKS.values() for e, n in entries.items()}}


def kind(name: str) -> ComponentKind:
    if name not in KINDS:
        raise InputError(f"unknown component {name!r}; valid: {choices_text(KINDS)}")
    return KINDS[name]


def role(name: str) -> str:
    return kind(name).role


def entry_component(entry: str) -> str:
    """The component a manifest entry belongs to (unet_chunk1 -> unet, unet_refiner_chunk2 -> unet_refiner)."""
    return next((c for c, entries in CHUNKS.items() if entry in entries), entry)


def required_components(family, *, image_input: bool = False) -> tuple[str, ...]:
    """What a request needs: the family's text encoders, the UNet and the VAE decoder, and the VAE
    encoder when it starts from an image."""
    return family.component_names + (("vae_encoder",) if image_input else ())


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a package: name, shape (None: a flexible dimension), element type."""

    name: str
    shape: tuple
    dtype: str  # "fp32", "fp16", "int32", "bool" ...

    def describe(self) -> str:
        return f"{self.name} {format_shape(self.shape)} {self.dtype}"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str, dtypes: tuple[str, ...] | None = None) -> "TensorSpec":
        if not isinstance(d, Mapping) or not {"name", "shape", "dtype"} <= set(d):
            raise ModelError(f"{where}: expected an object with name, shape and dtype; found {d!r}")
        if dtypes is not None and d["dtype"] not in dtypes:
            raise ModelError(f"{where}: dtype {d['dtype']!r} is not one of {choices_text(dtypes)}")
        try:
            shape = tuple(None if s is None else int(s) for s in d["shape"])
        except (TypeError, ValueError):
            raise ModelError(f"{where}: shape must be a list of integers; found {d['shape']!r}") from None
        return cls(str(d["name"]), shape, str(d["dtype"]))

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


def format_shape(shape) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"
