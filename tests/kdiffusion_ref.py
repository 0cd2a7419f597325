"""Import k-diffusion's `sampling` module, the reference AUTOMATIC1111 runs, without its package __init__.

k-diffusion's `__init__` imports every submodule (training utilities needing torchvision, wandb,
clip...), none of which is installed here. The sampling functions need only torch, scipy,
torchsde, torchdiffeq and `k_diffusion.utils`; `utils` imports `torchvision.transforms.functional`
at module level for its image helpers, which the sampling functions never call. So: register an
empty `k_diffusion` package pointing at the installed folder, and a stub
`torchvision.transforms.functional` (only if torchvision is absent, and only while k-diffusion
imports), then import `k_diffusion.sampling` (and `external`, the model wrappers) normally.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest


_TORCHVISION_STUB = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")


def _stub_torchvision() -> list[str]:
    """Empty torchvision modules for k_diffusion.utils' import; returns the names added."""
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return []
    # Never called by the sampling functions: k_diffusion.utils uses it for PIL conversions only.
    for name in _TORCHVISION_STUB:
        sys.modules[name] = types.ModuleType(name)
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    sys.modules["torchvision.transforms"].functional = sys.modules["torchvision.transforms.functional"]
    return list(_TORCHVISION_STUB)


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
    added = _stub_torchvision()
    try:
        return importlib.import_module("k_diffusion.sampling"), importlib.import_module("k_diffusion.external")
    finally:
        # Only k_diffusion.utils keeps the stub: other libraries (diffusers) must still see no torchvision.
        for name in added:
            sys.modules.pop(name, None)
