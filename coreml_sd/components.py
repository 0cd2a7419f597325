"""Components as data: the parts a model is made of, their roles, and their Core ML package names.

A component kind has a role (what contract it implements: text_encoder, unet, vae_decoder,
vae_encoder, controlnet) and the resource name Apple's Swift `StableDiffusion` package gives its
Core ML package, so folders we write load in Swift apps and folders they wrote load here. Two
kinds serve ControlNet: `controlled_unet`, the UNet that also takes the ControlNet residuals
(Apple's `ControlledUnet`; with torch the same module as `unet`), and `controlnet`, of which a
request may use several (one per ControlNet file), each packaged as `controlnet/<Name>` with the
name Apple's converter derives from the model's name (`controlnet_package_name`). Which
components a request needs follows from the family (its text encoders) and the request (an init
image needs the VAE encoder): `required_components`. `TensorSpec` describes one package input or
output, wherever packages are described (manifests, package runners, the converter).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from coreml_sd.errors import InputError, ModelError, choices_text

ROLES = ("text_encoder", "unet", "vae_decoder", "vae_encoder", "controlnet")


@dataclass(frozen=True)
class ComponentKind:
    name: str
    role: str
    package: str  # Apple's Swift resource name (<package>.mlpackage / .mlmodelc)
    chunks: tuple[str, ...] = ()  # package names when split in chunks (UnetChunk1/2)
    multiple: bool = False  # one per model file of this kind (ControlNets), packaged as <package>/<Name>
    torch_module: str = ""  # the TorchModules attribute that holds its weights (default: its name)


KINDS: dict[str, ComponentKind] = {k.name: k for k in (
    ComponentKind("text_encoder", "text_encoder", "TextEncoder"),
    ComponentKind("text_encoder_2", "text_encoder", "TextEncoder2"),
    ComponentKind("unet", "unet", "Unet", chunks=("UnetChunk1", "UnetChunk2")),
    ComponentKind("vae_decoder", "vae_decoder", "VAEDecoder"),
    ComponentKind("vae_encoder", "vae_encoder", "VAEEncoder"),
    ComponentKind("controlled_unet", "unet", "ControlledUnet", chunks=("ControlledUnetChunk1", "ControlledUnetChunk2"),
                  torch_module="unet"),
    ComponentKind("controlnet", "controlnet", "controlnet", multiple=True),
)}
# Manifest entries of a chunked UNet: unet_chunk1, unet_chunk2 -> UnetChunk1, UnetChunk2 (and the
# ControlledUnet's controlled_unet_chunk1/2 -> ControlledUnetChunk1/2).
CHUNKS_OF: dict[str, dict[str, str]] = {
    k.name: {f"{k.name}_chunk{i + 1}": name for i, name in enumerate(k.chunks)} for k in KINDS.values() if k.chunks}
CHUNK_ENTRIES = {entry: name for chunks in CHUNKS_OF.values() for entry, name in chunks.items()}
# One package per model, in the folder's top level (ControlNets are listed separately in manifests).
PACKAGE_NAMES: dict[str, str] = {**{k.name: k.package for k in KINDS.values() if not k.multiple}, **CHUNK_ENTRIES}


def kind(name: str) -> ComponentKind:
    if name not in KINDS:
        raise InputError(f"unknown component {name!r}; valid: {choices_text(KINDS)}")
    return KINDS[name]


def role(name: str) -> str:
    return kind(name).role


def entry_component(entry: str) -> str:
    """The component a manifest entry belongs to (unet_chunk1 -> unet, controlled_unet_chunk2 -> controlled_unet)."""
    for component, chunks in CHUNKS_OF.items():
        if entry in chunks:
            return component
    return entry


def controlnet_package_name(model_name: str) -> str:
    """The resource name Apple's converter gives a ControlNet: "/" made "_", the name split at "_"
    and "-", each word title-cased (Python's str.title, as Apple's torch2coreml) and joined, e.g.
    control_v11p_sd15_canny -> ControlV11PSd15Canny, lllyasviel/sd-controlnet-canny ->
    LllyasvielSdControlnetCanny."""
    words = [w for w in re.split(r"[_-]", model_name.replace("/", "_")) if w]
    if not words or any(c in model_name for c in '\\:*?"<>|'):
        raise InputError(f"a ControlNet needs a name of letters, digits, '_' and '-'; got {model_name!r}")
    return "".join(w.title() for w in words)


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
