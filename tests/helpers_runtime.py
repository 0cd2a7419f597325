"""Runtime-driver test helpers: one tiny model converted once per test run, and a stand-in for Core ML.

`shared_tiny_model(tmp_path_factory)` writes the tiny diffusers model and converts it with
`coreml-sd convert` once per run: under pytest-xdist the workers share it (a file lock; the first
converts, the others wait and reuse). Tests that change a folder copy it first.

`MilCoreML` is a `CoreMLOpener` whose only difference from the real one is the final macOS call:
"compiling" copies the package into the cache's `.mlmodelc` folder, and "loading" returns a model
whose `predict(dict of numpy) -> dict of numpy` runs the `mil` executor in exact mode (Core ML's
fp16 rounding). Everything else in the coreml backend (cache, specs, adapters on numpy arrays,
compute units, errors) runs as on a Mac.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from coreml_sd.backends.compiled_cache import CompiledModelCache
from coreml_sd.outputs import file_lock
from coreml_sd.backends.coreml_backend import CoreMLOpener


def shared_root(tmp_path_factory) -> Path:
    base = tmp_path_factory.getbasetemp()
    # xdist workers have basetemp <run>/popen-gwN: share <run>; a plain run has its own basetemp.
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "runtime-shared"


def shared_tiny_model(tmp_path_factory) -> tuple[Path, Path]:
    """(tiny diffusers folder, its conversion with coreml-sd convert), made once per test run."""
    from click.testing import CliRunner
    from tiny_models import write_tiny_diffusers_folder

    from coreml_sd.cli import main

    root = shared_root(tmp_path_factory)
    source, converted = root / "tiny-sd", root / "tiny-coreml"
    with file_lock(root / ".lock"):
        if not (converted / "manifest.json").is_file():
            write_tiny_diffusers_folder(source, seed=0)
            result = CliRunner().invoke(main, ["convert", str(source), "-o", str(converted), "-q", "--force"])
            assert result.exit_code == 0, result.output
    return source, converted


def copy_model(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest)
    return dest


class MilPredictor:
    """A model with Core ML's `predict` contract, computed by the mil executor (exact mode)."""

    def __init__(self, path: Path, compute_units: str):
        from coreml_sd.mil import Executor, load_program

        self.path, self.compute_units = Path(path), compute_units
        self.executor = Executor(load_program(path), device="cpu", precision_mode="exact")
        self.calls = []

    def predict(self, feeds):
        for name, value in feeds.items():
            assert isinstance(value, np.ndarray), f"Core ML gets numpy arrays; {name} is {type(value)}"
        self.calls.append({k: (v.shape, v.dtype) for k, v in feeds.items()})
        return {k: v.numpy() for k, v in self.executor(feeds).items()}


def copy_compile(package: Path, destination: Path) -> None:
    shutil.copytree(package, destination)


class MilCoreML(CoreMLOpener):
    """`CoreMLOpener` with the macOS calls replaced (see the module docstring)."""

    def __init__(self, cache_dir: Path, *, fail_on: tuple[str, ...] = ()):
        super().__init__(CompiledModelCache(cache_dir, compile_fn=copy_compile))
        self.fail_on = fail_on  # compute units whose load fails, as Core ML's does on a bad package
        self.loaded: list[tuple[str, str]] = []

    def load_compiled(self, path: Path, compute_units: str):
        if compute_units in self.fail_on:
            raise RuntimeError(f"Error in declaring network. (simulated Core ML load failure on {compute_units})")
        model = MilPredictor(path, compute_units)
        self.loaded.append((Path(path).name, compute_units))
        return model


def as_macos(monkeypatch, opener: MilCoreML) -> MilCoreML:
    """Make this process look like a Mac with Core ML to the coreml backend, through `opener`."""
    from coreml_sd.backends import coreml_backend

    monkeypatch.setattr(coreml_backend, "runtime_unavailable_reason", lambda platform=None: None)
    monkeypatch.setattr(coreml_backend, "make_opener", lambda: opener)
    return opener


def image_psnr(a, b) -> float:
    from coreml_sd.metrics import image_psnr as _image_psnr

    return _image_psnr(a, b)
