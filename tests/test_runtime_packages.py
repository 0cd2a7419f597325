"""The shared package adapters under both engines: input checks that name the input, and results.

`mil` runs on torch tensors; `coreml` is the Core ML code path on numpy arrays, with Core ML's
predict stood in for by the exact mil executor off macOS (helpers_runtime.MilCoreML) and the real
Core ML on a Mac."""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest
from helpers_runtime import MilCoreML, shared_tiny_model

from coreml_sd.backends.coreml_backend import CoreMLOpener, load_coreml_component, read_specs
from coreml_sd.backends.mil_backend import load_mil_component
from coreml_sd.backends.packages import TensorSpec, check_feeds, fixed_batch
from coreml_sd.conditioning import Conditioning
from coreml_sd.errors import InputError, ModelError

ENGINES = ["mil", "coreml"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return shared_tiny_model(tmp_path_factory)[1]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("coreml-cache")


def load(engine: str, folder, name: str, kind: str, cache_dir):
    path = folder / f"{name}.mlpackage"
    if engine == "mil":
        return load_mil_component(path, kind, device="cpu", precision_mode="exact")
    opener = CoreMLOpener() if sys.platform == "darwin" else MilCoreML(cache_dir)
    return load_coreml_component(path, kind, compute_units="cpu", opener=opener)


def test_specs_read_without_core_ml(folder):
    inputs, outputs = read_specs(folder / "Unet.mlpackage")
    assert inputs == (TensorSpec("sample", (2, 4, 8, 8), "fp16"), TensorSpec("timestep", (2,), "fp16"),
                      TensorSpec("encoder_hidden_states", (2, 32, 1, 77), "fp16"))
    assert outputs == (TensorSpec("noise_pred", (2, 4, 8, 8), "fp32"),)
    assert fixed_batch(inputs) == 2
    with pytest.raises(ModelError, match="expected a Core ML package"):
        read_specs(folder / "manifest.json")


@pytest.mark.parametrize("engine", ENGINES)
def test_unet_input_errors_name_the_input(engine, folder, cache_dir):
    unet = load(engine, folder, "Unet", "unet", cache_dir)
    x, ctx = np.zeros((2, 4, 8, 8), np.float32), np.zeros((2, 77, 32), np.float32)
    valid = "valid inputs: sample (2, 4, 8, 8) fp16; timestep (2,) fp16; encoder_hidden_states (2, 32, 1, 77) fp16"
    cases = [
        ((np.zeros((2, 4, 16, 16), np.float32), 1.0, ctx),
         "Unet.mlpackage: input 'sample' expects shape (2, 4, 8, 8), found (2, 4, 16, 16); " + valid),
        ((x, 1.0, np.zeros((2, 77, 64), np.float32)),
         "input 'encoder_hidden_states' expects shape (2, 32, 1, 77), found (2, 64, 1, 77)"),
        ((x.astype(np.int64), 1.0, ctx), "input 'sample' expects float values (fp16), found integer values"),
        ((x, np.ones(3, np.float32), ctx), "expected one timestep or one per row (2); found 3"),
    ]
    for args, message in cases:
        with pytest.raises(InputError, match=re.escape(message)):
            unet.predict(args[0], args[1], Conditioning(args[2]))
    out = unet.predict(x, np.float32(10.0), Conditioning(ctx))
    assert tuple(out.shape) == (2, 4, 8, 8)
    assert (type(out) is np.ndarray) == (engine == "coreml")
    # one row (no guidance) on the batch-2 package: filled up to its batch, the extra output dropped
    one = unet.predict(x[:1], np.float32(10.0), Conditioning(ctx[:1]))
    assert tuple(one.shape) == (1, 4, 8, 8)


@pytest.mark.parametrize("engine", ENGINES)
def test_text_encoder_takes_integer_ids_only(engine, folder, cache_dir):
    te = load(engine, folder, "TextEncoder", "text_encoder", cache_dir)
    ids = np.full((1, 77), 49407, dtype=np.int64)
    assert tuple(te.encode(ids).hidden.shape) == (1, 77, 32)
    with pytest.raises(InputError, match="text encoder: expected integer token ids, found float32"):
        te.encode(ids.astype(np.float32))
    with pytest.raises(InputError, match=re.escape("TextEncoder.mlpackage: input 'input_ids' expects shape (1, 77), "
                                                   "found (1, 76)")):
        te.encode(ids[:, :76])


def test_check_feeds_reports_unknown_and_missing_inputs():
    class Runner:
        name = "Toy.mlpackage"
        inputs = (TensorSpec("a", (1, 3), "fp32"), TensorSpec("b", (1,), "int32"))
        batch_size = 1

    with pytest.raises(InputError, match=re.escape("Toy.mlpackage: unknown input(s) 'c'; missing input(s) 'b'; "
                                                   "valid inputs: a (1, 3) fp32; b (1,) int32")):
        check_feeds(Runner(), {"a": np.zeros((1, 3)), "c": np.zeros(1)})
    with pytest.raises(InputError, match="input 'b' expects integer values \\(int32\\), found float values"):
        check_feeds(Runner(), {"a": np.zeros((1, 3)), "b": np.zeros(1)})
    with pytest.raises(InputError, match="inputs disagree on the batch: 2 rows and 3 rows \\('b'\\)"):
        check_feeds(Runner(), {"a": np.zeros((2, 3)), "b": np.zeros(3, np.int32)})
    assert check_feeds(Runner(), {"a": np.zeros((2, 3)), "b": np.zeros(2, np.int32)}) == 2


NO_TORCH_SCRIPT = r'''
import importlib.abc, importlib.machinery, sys


class NoTorch(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """As if torch were not installed: any `import torch` fails (the Core ML path must not need it)."""
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "torch":
            return importlib.machinery.ModuleSpec(name, self)
    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {spec.name!r} (blocked)", name=spec.name)
    def exec_module(self, module):
        pass


sys.meta_path.insert(0, NoTorch())
import numpy as np
from coreml_sd.backends import coreml_backend

class NumpyModel:
    """Core ML's predict contract with a little numpy arithmetic instead of a network."""
    def __init__(self, path):
        self.name = path.name
    def predict(self, feeds):
        if "input_ids" in feeds:
            ids = feeds["input_ids"]
            return {"last_hidden_state": np.repeat((ids / 49408.0)[..., None], 32, -1).astype(np.float32),
                    "pooled_outputs": np.zeros((1, 32), np.float32)}
        if "sample" in feeds:
            assert feeds["sample"].dtype == np.float16 and feeds["encoder_hidden_states"].shape == (2, 32, 1, 77)
            return {"noise_pred": (0.1 * feeds["sample"]).astype(np.float32)}
        z = feeds["z"]
        return {"image": np.tanh(np.repeat(np.repeat(z[:, :3], 2, 2), 2, 3)).astype(np.float32)}

class Opener:
    def open(self, package, units, compiled=None):
        return NumpyModel(package)

coreml_backend.runtime_unavailable_reason = lambda platform=None: None
coreml_backend.make_opener = lambda: Opener()
from coreml_sd.pipeline import Pipeline
pipe = Pipeline.load(sys.argv[1], backend="coreml", compute_units="ane")
result = pipe("a cat", seed=1, steps=3, sampler="euler_a")[0]
assert type(result.latents) is np.ndarray and result.image.size == (16, 16)
print(sorted(set(pipe.components.runs_on.values())), "torch" in sys.modules)
'''


def test_core_ml_path_needs_no_torch(folder):
    """A whole generation through the coreml backend in a process where torch cannot be imported
    (Core ML's predict replaced by numpy arithmetic): adapters, sampler, noise and images are torch-free."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", NO_TORCH_SCRIPT, str(folder)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "['coreml ane (CPU_AND_NE)'] False"
