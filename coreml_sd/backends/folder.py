"""Backends that run a converted model folder's Core ML packages (the `mil` executor for now)."""

from __future__ import annotations

from coreml_sd.backends import Components
from coreml_sd.errors import BackendUnavailable


def unet_packages(source):
    """The UNet package path, or the two chunk paths of a chunked UNet, in order."""
    if source.manifest.chunked:
        return [source.package_path("unet_chunk1"), source.package_path("unet_chunk2")]
    return source.package_path("unet")


def require_converted(source, backend: str):
    from coreml_sd.model_folder import ConvertedModel

    if not isinstance(source, ConvertedModel):
        raise BackendUnavailable(
            f"the {backend} backend runs converted Core ML model folders; {source.info.name} is a "
            f"{source.info.kind} model: convert it with `coreml-sd convert`, or use --backend torch"
        )
    return source


def load_mil(source, *, device: str = "auto", precision: str = "auto") -> Components:
    """Components executing the folder's packages with torch kernels (`fast` mode).

    `precision`: auto (bf16 on CPUs with native bf16, fp16 on GPUs, else fp32) or fp32/fp16/bf16.
    """
    from coreml_sd.backends.mil_backend import components_from_packages

    source = require_converted(source, "mil")
    return components_from_packages(
        source.package_path("text_encoder"), unet_packages(source), source.package_path("vae_decoder"),
        device=device, precision_mode="fast", fast_dtype=None if precision == "auto" else precision,
    )
