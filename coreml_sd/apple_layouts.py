"""How Apple's tools name the Core ML models of a Stable Diffusion model, to write and to read them.

Two layouts, learned from apple/ml-stable-diffusion (e12202c):

* **Swift** (`swift/StableDiffusion/pipeline/StableDiffusionPipeline+Resources.swift`,
  `StableDiffusionXL+Resources.swift`): one folder holding `TextEncoder`, `TextEncoder2`, `Unet`
  or `UnetChunk1`/`UnetChunk2`, `UnetRefiner` (+ chunks), `ControlledUnet` (+ chunks),
  `VAEDecoder`, `VAEEncoder`, `SafetyChecker`, `MultilingualTextEncoderProjection` as `.mlmodelc`
  (Swift loads only compiled models), ControlNets in `controlnet/<Name>.mlmodelc`, and the
  tokenizer's `vocab.json` and `merges.txt`. Mochi Diffusion and GuernikaKit read the same names.
* **Python** (`python_coreml_stable_diffusion/torch2coreml.py` `_get_out_path`,
  `coreml_model.py` `_load_mlpackage`): `Stable_Diffusion_version_<model version>_<submodule>.mlpackage`
  with "/" in the model version replaced by "_"; submodules `text_encoder`, `text_encoder_2`,
  `unet`, `unet_chunk1`/`2`, `refiner` (+ `_chunk1`/`2`), `control-unet` (+ chunks),
  `vae_decoder`, `vae_encoder`, `safety_checker`, `mmdit`; ControlNets `ControlNet_<name>.mlpackage`.
  Its pipeline refuses a folder whose model folders have more than one extension
  (`get_resource_type`), so compiled models go to a `Resources/` folder in the Swift layout, as
  torch2coreml's `--bundle-resources-for-swift-cli` writes them.

Entries are our manifest's component names (`coreml_sd.components`), plus names for the models
we recognise but do not run (safety checker, refiner, ControlNet-ready UNet, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

from coreml_sd.components import PACKAGE_NAMES
from coreml_sd.errors import InputError, choices_text

LAYOUTS = ("swift", "python", "both")
PACKAGE = ".mlpackage"
COMPILED = ".mlmodelc"
SUFFIXES = (PACKAGE, COMPILED)
RESOURCES = "Resources"  # where compiled models go beside Python-named packages
CONTROLNET_DIR = "controlnet"  # Swift: ControlNets in their own folder
CONTROLNET_PREFIX = "ControlNet_"  # Python: ControlNet_<name>.mlpackage
PYTHON_PREFIX = "Stable_Diffusion_version_"

# Models of a Stable Diffusion folder that coreml-sd recognises but does not run.
EXTRA_SWIFT = {
    "safety_checker": "SafetyChecker",
    "unet_refiner": "UnetRefiner", "unet_refiner_chunk1": "UnetRefinerChunk1",
    "unet_refiner_chunk2": "UnetRefinerChunk2",
    "multilingual_projection": "MultilingualTextEncoderProjection",
    "mmdit": "MultiModalDiffusionTransformer",
}
SWIFT_NAMES = {**PACKAGE_NAMES, **EXTRA_SWIFT}  # entry -> Swift resource name
PYTHON_SUBMODULES = {  # entry -> Apple's Python submodule name
    "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2", "unet": "unet",
    "unet_chunk1": "unet_chunk1", "unet_chunk2": "unet_chunk2", "vae_decoder": "vae_decoder",
    "vae_encoder": "vae_encoder", "safety_checker": "safety_checker", "unet_refiner": "refiner",
    "unet_refiner_chunk1": "refiner_chunk1", "unet_refiner_chunk2": "refiner_chunk2",
    "controlled_unet": "control-unet", "controlled_unet_chunk1": "control-unet_chunk1",
    "controlled_unet_chunk2": "control-unet_chunk2", "mmdit": "mmdit",
}
_BY_SWIFT = {v: k for k, v in SWIFT_NAMES.items()}


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise InputError(f"unknown layout {layout!r}; valid: {choices_text(LAYOUTS)}")
    return layout


def model_version(name: str) -> str:
    """A model name as Apple's Python naming writes it ("runwayml/sd-v1-5" -> "runwayml_sd-v1-5")."""
    return str(name).replace("/", "_")


def python_name(version: str, entry: str) -> str:
    return f"{PYTHON_PREFIX}{model_version(version)}_{PYTHON_SUBMODULES[entry]}{PACKAGE}"


def swift_name(entry: str, suffix: str = PACKAGE) -> str:
    return SWIFT_NAMES[entry] + suffix


def swift_entry(filename: str) -> str | None:
    """The entry a Swift resource name stands for (`UnetChunk1.mlmodelc` -> unet_chunk1), or None."""
    for suffix in SUFFIXES:
        if filename.endswith(suffix):
            return _BY_SWIFT.get(filename[: -len(suffix)])
    return None


def parse_python_name(filename: str) -> tuple[str, str] | None:
    """(model version, entry) of an Apple Python package name, or None. The model version may hold
    underscores itself, so the submodule is the longest known name ending the stem."""
    if not filename.startswith(PYTHON_PREFIX) or not filename.endswith(PACKAGE):
        return None
    stem = filename[len(PYTHON_PREFIX): -len(PACKAGE)]
    for entry, sub in sorted(PYTHON_SUBMODULES.items(), key=lambda kv: -len(kv[1])):
        if stem.endswith("_" + sub) and len(stem) > len(sub) + 1:
            return stem[: -len(sub) - 1], entry
    return None


def controlnet_name(filename: str) -> str | None:
    """A ControlNet's name from `ControlNet_<name>.mlpackage` (Python naming), or None."""
    if filename.startswith(CONTROLNET_PREFIX) and filename.endswith(PACKAGE):
        return filename[len(CONTROLNET_PREFIX): -len(PACKAGE)]
    return None


@dataclass(frozen=True)
class WrittenNames:
    """Where a converter writes an entry's package (and its aliases), and its compiled model."""

    package: str
    aliases: tuple[str, ...]
    compiled: str  # relative path of the .mlmodelc


def written_names(layout: str, version: str, entry: str) -> WrittenNames:
    """Names for one entry in `layout`: swift (Swift names, compiled beside), python (Apple's Python
    names, compiled under Resources/), both (Python names and Swift names for the same package)."""
    check_layout(layout)
    swift = swift_name(entry)
    if layout == "swift":
        return WrittenNames(swift, (), swift_name(entry, COMPILED))
    python = python_name(version, entry)
    compiled = f"{RESOURCES}/{swift_name(entry, COMPILED)}"
    return WrittenNames(python, (swift,) if layout == "both" else (), compiled)


def controlnet_written_names(layout: str, name: str) -> WrittenNames:
    """A ControlNet `name` (Apple's resource name, e.g. LllyasvielSdControlnetCanny): Swift keeps it in
    controlnet/, Apple's Python pipeline looks for ControlNet_<name>.mlpackage beside the model."""
    check_layout(layout)
    swift = f"{CONTROLNET_DIR}/{name}{PACKAGE}"
    compiled = f"{CONTROLNET_DIR}/{name}{COMPILED}"
    if layout == "swift":
        return WrittenNames(swift, (), compiled)
    python = f"{CONTROLNET_PREFIX}{name}{PACKAGE}"
    return WrittenNames(python, (swift,) if layout == "both" else (), f"{RESOURCES}/{compiled}")
