"""The three backends: coreml (Core ML, macOS), mil (packages run with torch kernels), torch (diffusers).

Each answers, without loading weights, whether it can run a component of a model here and where it
would run; and loads one component. Engines are imported only inside `load` (and torch's device
check), so asking about Core ML on a Mac without torch, or about torch on Linux, imports nothing heavy.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from coreml_sd.backends import LoadOptions, Loaded
from coreml_sd.backends.interop import NUMPY, torch_kind

PACKAGE_COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _converted(source):
    from coreml_sd.model_folder import ConvertedModel

    return source if isinstance(source, ConvertedModel) else None


def _not_converted_reason(source, backend: str) -> str | None:
    if _converted(source) is None:
        return (f"{source.info.name} is a {source.info.kind} model and the {backend} backend runs converted "
                f"Core ML model folders (convert it with `coreml-sd convert`)")
    return None


def package_paths(source, component: str) -> list[Path]:
    """The package(s) of `component` in a converted folder (a chunked UNet: both chunks, in order)."""
    if component == "unet" and source.manifest.chunked:
        return [source.package_path("unet_chunk1"), source.package_path("unet_chunk2")]
    return [source.package_path(component)]


def _manifest_names(source, component: str) -> list[str]:
    return ["unet_chunk1", "unet_chunk2"] if component == "unet" and source.manifest.chunked else [component]


def _missing_package_reason(source, component: str) -> str | None:
    missing = [n for n in _manifest_names(source, component) if n not in source.manifest.components]
    if missing:
        return f"{source.path.name} has no {component} package"
    return None


def _resolved_torch(options: LoadOptions) -> tuple[str, str]:
    """(device, precision) as torch would choose them here (imports torch, loads no weights)."""
    from coreml_sd.devices import resolve_device, resolve_precision

    device = resolve_device(options.device)
    return device, resolve_precision(options.precision, device)


class CoreMLBackend:
    name = "coreml"

    def unavailable_reason(self, source, component: str, options: LoadOptions) -> str | None:
        from coreml_sd.backends.coreml_backend import compute_units_name, runtime_unavailable_reason

        compute_units_name(options.compute_units)  # an unknown name is an input error, not a fallback
        return (_not_converted_reason(source, self.name) or _missing_package_reason(source, component)
                or runtime_unavailable_reason())

    def describe(self, source, component: str, options: LoadOptions) -> str:
        from coreml_sd.backends.compiled_cache import CompiledModelCache, cache_root
        from coreml_sd.backends.coreml_backend import SHORT_NAMES, compute_units_name

        units = compute_units_name(options.compute_units)
        where = f"coreml {SHORT_NAMES[units]} ({units})"
        if any(self._precompiled(source, component)):
            return f"{where}; compiled at conversion"
        cache = CompiledModelCache(cache_root())
        if all(cache.lookup(p) for p in package_paths(source, component)):
            return f"{where}; compiled model cached in {cache.root}"
        return f"{where}; first load compiles it into {cache.root}"

    @staticmethod
    def _precompiled(source, component: str) -> list[Path | None]:
        out = []
        for name in _manifest_names(source, component):
            compiled = source.manifest.components[name].compiled
            out.append(source.path / compiled if compiled and (source.path / compiled).is_dir() else None)
        return out

    def load(self, source, component: str, options: LoadOptions, shared: dict) -> Loaded:
        from coreml_sd.backends.coreml_backend import load_coreml_component

        part = load_coreml_component(package_paths(source, component), component,
                                     compute_units=options.compute_units,
                                     compiled=self._precompiled(source, component))
        return Loaded(part, part.runs_on, NUMPY)


class MilBackend:
    name = "mil"

    def unavailable_reason(self, source, component: str, options: LoadOptions) -> str | None:
        reason = _not_converted_reason(source, self.name) or _missing_package_reason(source, component)
        if reason is None and not _has_module("torch"):
            reason = "the mil executor runs on torch, which is not installed (pip install torch)"
        return reason

    def describe(self, source, component: str, options: LoadOptions) -> str:
        device, precision = _resolved_torch(options)  # the executor's fast dtype follows the same rule
        return f"mil {device} fast ({precision} for fp16 ops)"

    def load(self, source, component: str, options: LoadOptions, shared: dict) -> Loaded:
        from coreml_sd.backends.mil_backend import load_mil_component

        fast_dtype = None if options.precision == "auto" else options.precision
        part = load_mil_component(package_paths(source, component), component, device=options.device,
                                  precision_mode="fast", fast_dtype=fast_dtype)
        return Loaded(part, part.runs_on, torch_kind(part.package.runners[0].device))


class TorchBackend:
    name = "torch"

    def unavailable_reason(self, source, component: str, options: LoadOptions) -> str | None:
        if not _has_module("torch"):
            return "torch is not installed (pip install torch diffusers transformers)"
        if not hasattr(source, "torch_modules"):
            return f"{source.info.name}: no torch weights are available for this model"
        converted = _converted(source)
        if converted is not None:
            path = converted.manifest.source.get("path")
            if not path or not Path(path).exists():
                return (f"torch needs the source model, and the manifest's source {path or '(none recorded)'} "
                        f"is not there")
        return None

    def describe(self, source, component: str, options: LoadOptions) -> str:
        device, precision = _resolved_torch(options)
        where = f"torch {device} {precision}"
        converted = _converted(source)
        if converted is not None:
            where += f" (weights from the source model {converted.manifest.source.get('path')})"
        return where

    def load(self, source, component: str, options: LoadOptions, shared: dict) -> Loaded:
        from coreml_sd.backends.torch_backend import load_component

        device, precision = _resolved_torch(options)
        if "torch_modules" not in shared:
            from coreml_sd.devices import torch_dtype
            from coreml_sd.sources import require_torch_modules

            require_torch_modules(source)
            shared["torch_modules"] = source.torch_modules(device=device, dtype=torch_dtype(precision))
        part, runs_on, device = load_component(source, component, device=device, precision=precision,
                                               compile=options.compile, modules=shared["torch_modules"])
        return Loaded(part, runs_on, torch_kind(device))


COREML = CoreMLBackend()
MIL = MilBackend()
TORCH = TorchBackend()
