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
