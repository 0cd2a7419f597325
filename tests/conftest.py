"""Shared fixtures: tiny models built once per session from configs (nothing is downloaded)."""

from __future__ import annotations

import os
import sys
import tempfile

import pytest

# Belt and braces: no test may reach a model hub, even where a network exists.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Caches (compiled models, file hashes, bench models) go to a folder of this run, never the user's.
os.environ["COREML_SD_CACHE"] = tempfile.mkdtemp(prefix="coreml-sd-test-cache-")

sys.path.insert(0, os.path.dirname(__file__))

# The suite runs as `pytest -n 2` on 2 cores: one torch thread per worker avoids oversubscription,
# which slows tiny-model tests by an order of magnitude on a busy machine.
try:
    import torch

    torch.set_num_threads(1)
except ImportError:
    pass

from tiny_models import write_tiny_diffusers_folder  # noqa: E402


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests (a test that applies --threads may have changed it): tiny
    models gain nothing from threads, and on a shared 2-core machine torch's spinning worker threads
    made a 25-step run 20x slower (35 s instead of 1.6 s)."""
    try:
        import torch
    except ImportError:  # numpy-only tests still run
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_diffusers_dir(tmp_path_factory):
    """A tiny SD1-architecture diffusers folder (epsilon prediction, SD1.5 scheduler config)."""
    return write_tiny_diffusers_folder(tmp_path_factory.mktemp("models") / "tiny-sd", seed=0)


@pytest.fixture(scope="session")
def tiny_vpred_dir(tmp_path_factory):
    """The same architecture with v-prediction, as SD 2.x 768 models."""
    return write_tiny_diffusers_folder(
        tmp_path_factory.mktemp("models") / "tiny-sd-v", seed=1, prediction_type="v_prediction"
    )


def pytest_collection_modifyitems(config, items):
    if sys.platform == "darwin":
        return
    skip = pytest.mark.skip(reason="needs macOS: Core ML prediction is only available there")
    for item in items:
        if "macos" in item.keywords:
            item.add_marker(skip)
