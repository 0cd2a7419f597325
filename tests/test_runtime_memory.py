"""--reduce-memory: each component is loaded when first used and freed after its phase, so no two
models are alive at once; the images are the eagerly loaded pipeline's."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
from click.testing import CliRunner
from helpers_runtime import shared_tiny_model

from coreml_sd.backends import standard
from coreml_sd.cli import main
from coreml_sd.pipeline import Pipeline

GEN = dict(seed=3, steps=2, sampler="euler", guidance_scale=4.0, num_images=2)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return shared_tiny_model(tmp_path_factory)[1]


@pytest.fixture
def lifetimes(monkeypatch):
    """Wraps the mil backend's loader: records, at each load, which earlier components are still alive."""
    events: list[tuple[str, list[str]]] = []
    refs: dict[str, list[weakref.ref]] = {}
    original = standard.MilBackend.load

    def load(self, source, component, options, shared):
        gc.collect()
        alive = sorted({c for c, rs in refs.items() for r in rs if r() is not None})
        events.append((component, alive))
        loaded = original(self, source, component, options, shared)
        refs.setdefault(component, []).append(weakref.ref(loaded.component))
        return loaded

    monkeypatch.setattr(standard.MilBackend, "load", load)

    def alive_now() -> list[str]:
        gc.collect()
        return sorted({c for c, rs in refs.items() for r in rs if r() is not None})

    return events, alive_now


def test_components_load_in_turn_and_are_released(folder, lifetimes):
    events, alive_now = lifetimes
    pipe = Pipeline.load(folder, backend="mil", device="cpu", precision="fp32", reduce_memory=True)
    assert events == [] and not any(getattr(pipe.components, c).is_loaded for c in pipe.components.runs_on)
    assert set(pipe.components.runs_on.values()) == {"mil (loaded when used)"}
    images = pipe("a lighthouse at dusk", **GEN)
    # text encoder -> UNet (once for both images) -> VAE decoder, each loaded after the previous was freed
    assert events == [("text_encoder", []), ("unet", []), ("vae_decoder", [])]
    assert alive_now() == []
    assert pipe.components.runs_on["unet"] == "mil cpu fast (fp32 for fp16 ops)"
    assert images[0].params.extras["Backend"] == "mil cpu fast (fp32 for fp16 ops)"
    eager_events = len(events)
    eager = Pipeline.load(folder, backend="mil", device="cpu", precision="fp32")(
        "a lighthouse at dusk", **GEN)
    assert [e[0] for e in events[eager_events:]] == ["text_encoder", "unet", "vae_decoder"]
    assert alive_now() == []  # the eager pipeline is gone too
    # Separately loaded programs may take other kernels: equal to float32 rounding, images to one level.
    for a, b in zip(images, eager):
        np.testing.assert_allclose(a.latents, b.latents, rtol=1e-5, atol=1e-5)
        assert np.abs(np.asarray(a.image, np.int16) - np.asarray(b.image, np.int16)).max() <= 1


def test_without_reduce_memory_everything_stays_loaded(folder, lifetimes):
    events, alive_now = lifetimes
    pipe = Pipeline.load(folder, backend="mil", device="cpu", precision="fp32")
    pipe("a lighthouse", seed=1, steps=1, sampler="euler")
    assert [e[0] for e in events] == ["text_encoder", "unet", "vae_decoder"]
    assert alive_now() == ["text_encoder", "unet", "vae_decoder"]  # the test above is not vacuous
    del pipe


def test_reduce_memory_from_the_command_line(folder, tmp_path, lifetimes):
    events, _ = lifetimes
    result = CliRunner().invoke(main, ["generate", "a boat", "--model", str(folder), "--backend", "mil",
                                       "--reduce-memory", "--steps", "2", "--num-images", "2", "-o",
                                       str(tmp_path), "--json", "-q"])
    assert result.exit_code == 0, result.output
    assert [e[0] for e in events] == ["text_encoder", "unet", "vae_decoder"]
    assert len(list(tmp_path.glob("*.jpg"))) == 2
