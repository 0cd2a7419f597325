"""The coreml backend: a converted model's packages run by Core ML (macOS) on the chosen compute units.

The components are the shared package adapters of `coreml_sd.backends.packages` over a
`CoreMLRunner`, whose call is Core ML's `predict`; arrays are numpy throughout, so this path needs
no torch. Packages are compiled once into the user's cache (`compiled_cache.py`) and later
launches load the cached `.mlmodelc`.

The only calls that need macOS are behind `CoreMLOpener` (compile, load, predict): tests on other
systems pass an opener whose models run the `mil` executor, and so exercise everything else.

A compiled model (`.mlmodelc` folder, e.g. from Apple's converter) is loaded as it is, without the
cache; its specs come from its metadata.json (`coreml_sd.compiled_model`, any OS).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from coreml_sd import arrays
from coreml_sd.backends.compiled_cache import CompiledModelCache, cache_root
from coreml_sd.backends.packages import PackageChain, adapt, check_role, fixed_batch
from coreml_sd.components import TensorSpec
from coreml_sd.compiled_model import is_compiled_model
from coreml_sd.errors import BackendUnavailable, InputError, ModelError, choices_text

log = logging.getLogger(__name__)

# --compute-units -> Core ML's MLComputeUnits
COMPUTE_UNITS = {"ane": "CPU_AND_NE", "gpu": "CPU_AND_GPU", "cpu": "CPU_ONLY", "all": "ALL"}
SHORT_NAMES = {v: k for k, v in COMPUTE_UNITS.items()}
_NUMPY = {"fp16": np.float16, "fp32": np.float32, "fp64": np.float64, "int32": np.int32, "bool": np.bool_}
# FeatureTypes.proto ArrayDataType values


def compute_units_name(value: str) -> str:
    """`ane|gpu|cpu|all` (or Core ML's own names, e.g. CPU_AND_NE) -> Core ML's name."""
    text = str(value)
    if text.lower() in COMPUTE_UNITS:
        return COMPUTE_UNITS[text.lower()]
    if text.upper() in SHORT_NAMES:
        return text.upper()
    raise InputError(f"unknown compute units {value!r}; valid: {choices_text(COMPUTE_UNITS)} "
                     f"({', '.join(f'{k}={v}' for k, v in COMPUTE_UNITS.items())})")


def runtime_unavailable_reason(platform: str | None = None) -> str | None:
    """Why Core ML cannot predict here (None where it can), known without loading any model."""
    platform = sys.platform if platform is None else platform
    if platform != "darwin":
        name = {"linux": "Linux", "win32": "Windows", "cygwin": "Windows"}.get(platform, platform)
        return f"coremltools runtime not available on {name} (Core ML predicts only on macOS)"
    import importlib.util

    if importlib.util.find_spec("coremltools") is None:
        return "coremltools is not installed (pip install coremltools)"
    try:
        _coremltools()
        import coremltools.libcoremlpython  # noqa: F401
    except ImportError as exc:
        return f"coremltools' Core ML runtime (libcoremlpython) did not load: {exc}"
    return None


def _coremltools():
    """coremltools, imported without its chatter about optional converters."""
    from coreml_sd.quiet_imports import import_coremltools

    return import_coremltools()


def read_specs(package: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """(inputs, outputs) from the package's model description (coremltools' proto), or from a
    compiled model's metadata.json; any OS. A flexible size (enumerated or ranged shapes) is None."""
    from coreml_sd.model_description import describe_model

    description = describe_model(Path(package))
    return description.inputs, description.outputs


class CoreMLRunner:
    """Package runner over one loaded Core ML model: numpy feeds in the package's dtypes."""

    def __init__(self, model, *, name: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 compute_units: str):
        self.model = model  # anything with predict(dict of numpy) -> dict of arrays
        self.name = name
        self.inputs, self.outputs = tuple(inputs), tuple(outputs)
        self.compute_units = compute_units

    @property
    def batch_size(self) -> int | None:
        return fixed_batch(self.inputs)

    def native(self, value, dtype: str) -> np.ndarray:
        if dtype not in _NUMPY:
            raise InputError(f"{self.name}: inputs of type {dtype} are not supported; valid: {choices_text(_NUMPY)}")
        return np.ascontiguousarray(arrays.to_numpy(value), dtype=_NUMPY[dtype])

    def run(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        out = self.model.predict({k: np.ascontiguousarray(v) for k, v in feeds.items()})
        missing = [s.name for s in self.outputs if s.name not in out]
        if missing:
            raise ModelError(f"{self.name}: Core ML returned no {', '.join(missing)} (it returned {choices_text(out)})")
        return {s.name: np.asarray(out[s.name], dtype=np.float32 if s.dtype.startswith("fp") else None)
                for s in self.outputs}

    def describe(self) -> str:
        return f"coreml {SHORT_NAMES.get(self.compute_units, self.compute_units)} ({self.compute_units})"


class CoreMLOpener:
    """The macOS seam: compile a package (once, into the cache) and load it on the compute units."""

    def __init__(self, cache: CompiledModelCache | None = None):
        self.cache = cache or CompiledModelCache(cache_root(), compile_fn=compile_with_coremltools)

    def open(self, package: Path, compute_units: str, compiled: Path | None = None):
        """A model with `predict`: `package` itself if it is compiled, the folder's own .mlmodelc if
        given and it loads, else the cache's."""
        if is_compiled_model(package):
            return self.load_compiled(package, compute_units)
        if compiled is not None and compiled.is_dir():
            try:
                return self.load_compiled(compiled, compute_units)
            except Exception as exc:  # e.g. compiled by a newer OS than this one: compile here instead
                log.info("%s did not load (%s); using the compiled-model cache", compiled.name, exc)
        return self.load_compiled(self.cache.compiled_path(package, compute_units).path, compute_units)

    def load_compiled(self, path: Path, compute_units: str):
        ct = _coremltools()
        return ct.models.CompiledMLModel(str(path), compute_units=ct.ComputeUnit[compute_units])


def compile_with_coremltools(package: Path, destination: Path) -> None:
    _coremltools().utils.compile_model(str(package), str(destination))


def make_opener() -> CoreMLOpener:
    """Core ML itself (macOS). Tests elsewhere replace this function to run the rest of the path."""
    reason = runtime_unavailable_reason()
    if reason:
        raise BackendUnavailable(reason)
    return CoreMLOpener()


def load_coreml_runner(package_path, *, compute_units: str = "all", opener: Any = None,
                       compiled: Sequence[Path | None] | None = None) -> PackageChain:
    """The package(s) at `package_path` (a path, or UNet chunk paths in order) loaded by Core ML.

    `compiled`: per package, an already compiled `.mlmodelc` to use instead of the cache (a
    folder converted with --compile). A package Core ML cannot load raises BackendUnavailable.
    """
    units = compute_units_name(compute_units)
    paths = [Path(package_path)] if isinstance(package_path, (str, Path)) else [Path(p) for p in package_path]
    compiled = list(compiled or [None] * len(paths))
    opener = opener if opener is not None else make_opener()
    runners = []
    for path, precompiled in zip(paths, compiled):
        inputs, outputs = read_specs(path)
        try:
            model = opener.open(path, units, precompiled)
        except (ModelError, BackendUnavailable):
            raise
        except Exception as exc:  # Core ML reports load failures as RuntimeError/Exception with its text
            raise BackendUnavailable(f"Core ML could not load {path.name} on {units}: {type(exc).__name__}: {exc}") \
                from exc
        runners.append(CoreMLRunner(model, name=path.name, inputs=inputs, outputs=outputs, compute_units=units))
    return PackageChain(runners)


def load_coreml_component(package_path, role: str, *, compute_units: str = "all", opener: Any = None,
                          compiled: Sequence[Path | None] | None = None):
    """A backend component running the package(s) at `package_path` in Core ML (see load_coreml_runner)."""
    check_role(role)
    return adapt(load_coreml_runner(package_path, compute_units=compute_units, opener=opener, compiled=compiled),
                 role)

