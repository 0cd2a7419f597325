"""`coreml-sd info`: what a model is, its manifest, and what would run where, with nothing loaded."""

from __future__ import annotations

import json
import sys

import pytest
from click.testing import CliRunner
from helpers_runtime import shared_tiny_model

from coreml_sd.backends import standard
from coreml_sd.cli import main
from coreml_sd.model_folder import Manifest

LINUX_ONLY = pytest.mark.skipif(sys.platform == "darwin", reason="Core ML is available on macOS")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return shared_tiny_model(tmp_path_factory)


@pytest.fixture
def no_loading(monkeypatch):
    """Any component load during `info` fails the test."""
    for cls in (standard.CoreMLBackend, standard.MilBackend, standard.TorchBackend):
        monkeypatch.setattr(cls, "load", lambda *a, **k: pytest.fail("info loaded a component"))


def info(*args):
    result = CliRunner().invoke(main, ["info", *map(str, args)])
    return result


@LINUX_ONLY
def test_converted_folder_report(tiny, no_loading):
    diffusers, folder = tiny
    result = info(folder, "--device", "cpu", "--precision", "fp32")
    assert result.exit_code == 0, result.output
    text = result.output
    assert text.splitlines()[0] == f"tiny-sd  (coreml model, {folder})"  # named after its source
    assert "sd1, epsilon prediction" in text and "16x16 pixels, latents 4x8x8, text embedding 32" in text
    assert "split_einsum_v2 attention, fp16 weights, fp16 programs, UNet batch 2, min target macOS13" in text
    assert f"source       {diffusers}" in text
    m = Manifest.read(folder)
    assert f"unet {m.parity['components']['unet']['min_psnr_db']} dB" in text
    assert "runs (--backend auto, --compute-units all):" in text
    for component in ("text_encoder", "unet", "vae_decoder"):
        assert f"  {component:<13} mil cpu fast (fp32 for fp16 ops)\n" in text
    assert text.count("would fall back to mil: coremltools runtime not available on Linux") == 3


@LINUX_ONLY
def test_json_report_and_chains(tiny, no_loading):
    diffusers, folder = tiny
    result = info(folder, "--json", "--backend", "unet=coreml/torch,mil", "--device", "cpu", "--precision", "fp32",
                  "--compute-units", "ane")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["manifest"] == Manifest.read(folder).to_dict()
    assert (report["kind"], report["width"], report["latent_shape"], report["compute_units"]) == \
        ("coreml", 16, [4, 8, 8], "ane")
    unet = report["components"]["unet"]
    assert unet["backend"] == "torch" and unet["chain"] == ["coreml", "torch"]
    assert unet["runs_on"] == f"torch cpu fp32 (weights from the source model {diffusers})"
    assert unet["fell_back"] == [{"backend": "coreml", "reason": "coremltools runtime not available on Linux "
                                                                 "(Core ML predicts only on macOS)"}]
    assert report["components"]["vae_decoder"] == {"backend": "mil", "runs_on": "mil cpu fast (fp32 for fp16 ops)",
                                                    "chain": ["mil"], "fell_back": []}


def test_other_models_and_errors(tiny, no_loading):
    diffusers, folder = tiny
    report = json.loads(info(diffusers, "--json", "--device", "cpu").output)
    assert report["kind"] == "diffusers" and "manifest" not in report
    assert {c["backend"] for c in report["components"].values()} == {"torch"}
    builtin = info()  # the built-in model
    assert builtin.exit_code == 0 and "checkpoint model" in builtin.output.splitlines()[0]
    refused = info(diffusers, "--backend", "mil")
    assert refused.exit_code == 1
    assert "Error: --backend mil: mil cannot run the text_encoder here: tiny-sd is a diffusers model" in refused.output
    assert info(folder, "--backend", "npu").exit_code == 2
