"""Import k-diffusion's `sampling` module, the reference AUTOMATIC1111 runs, without its package __init__.

k-diffusion's `__init__` imports every submodule (training utilities needing torchvision, wandb,
clip...), none of which is installed here. The sampling functions need only torch, scipy,
torchsde, torchdiffeq and `k_diffusion.utils`; `utils` imports `torchvision.transforms.functional`
at module level for its image helpers, which the sampling functions never call. So: register an
empty `k_diffusion` package pointing at the installed folder, and a stub
`torchvision.transforms.functional` (only if torchvision is absent), then import
`k_diffusion.sampling` (and `external`, the model wrappers) normally.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest


def _stub_torchvision() -> None:
    if importlib.util.find_spec("torchvision") is not None:
        return
    # Never called by the sampling functions: k_diffusion.utils uses it for PIL conversions only.
    for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    sys.modules["torchvision.transforms"].functional = sys.modules["torchvision.transforms.functional"]


def load():
    """(k_diffusion.sampling, k_diffusion.external), or skip the test where k-diffusion is not installed."""
    pytest.importorskip("torch")
    pytest.importorskip("torchsde")
    pytest.importorskip("torchdiffeq")
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("k-diffusion is not installed (a test dependency)")
    if "k_diffusion" not in sys.modules:
        package = types.ModuleType("k_diffusion")
        package.__path__ = list(spec.submodule_search_locations)  # submodules load from the real folder
        package.__spec__ = spec
        sys.modules["k_diffusion"] = package
    _stub_torchvision()
    return importlib.import_module("k_diffusion.sampling"), importlib.import_module("k_diffusion.external")
