"""The three backends: coreml (Core ML, macOS), mil (packages run with torch kernels), torch (diffusers).

Each answers, without loading weights, whether it can run a component of a model here and where it
would run; and loads one component. Package backends read the source's `packages` (a converted
folder); the torch backend its `torch_modules`. Engines are imported only inside `load` (and
torch's device check), so asking about Core ML on a Mac without torch, or about torch on Linux,
imports nothing heavy.
"""

from __future__ import annotations

import importlib.util

from coreml_sd.backends import LoadOptions, Loaded
from coreml_sd.backends.interop import NUMPY, torch_kind
from coreml_sd.components import role


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _package_reason(source, component: str, backend: str) -> str | None:
    """Why `source` has no package of `component` for a package backend (None: it has one)."""
    if source.packages is None:
        return (f"{source.info.name} is a {source.info.kind} model and the {backend} backend runs converted "
                f"Core ML model folders (convert it with `coreml-sd convert`)")
    if not source.packages.has(component):
        return f"{source.info.name} has no {component} package"
    return None


def _paths(source, component: str, options: LoadOptions):
    """The component's packages, checked against the manifest's hashes unless the options say not to."""
    if options.check_hashes:
        return source.packages.checked_package_paths(component)
    return source.packages.package_paths(component)


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
        return _package_reason(source, component, self.name) or runtime_unavailable_reason()

    def describe(self, source, component: str, options: LoadOptions) -> str:
        from coreml_sd.backends.compiled_cache import CompiledModelCache, cache_root
        from coreml_sd.backends.coreml_backend import SHORT_NAMES, compute_units_name

        units = compute_units_name(options.compute_units)
        where = f"coreml {SHORT_NAMES[units]} ({units})"
        if any(source.packages.compiled_paths(component)):
            return f"{where}; compiled at conversion"
        cache = CompiledModelCache(cache_root())
        if all(cache.lookup(p) for p in source.packages.package_paths(component)):
            return f"{where}; compiled model cached in {cache.root}"
        return f"{where}; first load compiles it into {cache.root}"

    def load(self, source, component: str, options: LoadOptions, shared: dict) -> Loaded:
        from coreml_sd.backends.coreml_backend import load_coreml_component

        part = load_coreml_component(_paths(source, component, options), role(component),
                                     compute_units=options.compute_units,
                                     compiled=source.packages.compiled_paths(component))
        return Loaded(part, part.runs_on, NUMPY)


class MilBackend:
    name = "mil"

    def unavailable_reason(self, source, component: str, options: LoadOptions) -> str | None:
        reason = _package_reason(source, component, self.name)
        if reason is None and not _has_module("torch"):
            reason = "the mil executor runs on torch, which is not installed (pip install torch)"
        return reason

    def describe(self, source, component: str, options: LoadOptions) -> str:
        device, precision = _resolved_torch(options)  # the executor's fast dtype follows the same rule
        return f"mil {device} fast ({precision} for fp16 ops)"

    def load(self, source, component: str, options: LoadOptions, shared: dict) -> Loaded:
        from coreml_sd.backends.mil_backend import load_mil_component

        fast_dtype = None if options.precision == "auto" else options.precision
        part = load_mil_component(_paths(source, component, options), role(component), device=options.device,
                                  precision_mode=options.mil_mode, fast_dtype=fast_dtype)
        return Loaded(part, part.runs_on, torch_kind(part.package.runners[0].device))


class TorchBackend:
    name = "torch"

    def unavailable_reason(self, source, component: str, options: LoadOptions) -> str | None:
        if not _has_module("torch"):
            return "torch is not installed (pip install torch diffusers transformers)"
        return source.torch_unavailable()

    def describe(self, source, component: str, options: LoadOptions) -> str:
        device, precision = _resolved_torch(options)
        where = f"torch {device} {precision}"
        if source.packages is not None:
            where += f" (weights from the source model {source.origin.path})"
        return where

    def load(self, source, component: str, options: LoadOptions, shared: dict) -> Loaded:
        from coreml_sd.backends.torch_backend import load_component

        device, precision = _resolved_torch(options)
        # Load the source's modules once per load; again if a module this component needs was freed
        # (e.g. the UNet, when only the ControlledUnet falls back to torch later).
        if "torch_modules" not in shared or shared["torch_modules"].module(component) is None:
            from coreml_sd.devices import torch_dtype

            shared["torch_modules"] = source.torch_modules(device=device, dtype=torch_dtype(precision))
        part, runs_on, device = load_component(source, component, device=device, precision=precision,
                                               compile=options.compile, modules=shared["torch_modules"])
        return Loaded(part, runs_on, torch_kind(device))


COREML = CoreMLBackend()
MIL = MilBackend()
TORCH = TorchBackend()
