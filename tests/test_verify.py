"""`coreml-sd verify`: a fresh conversion passes with the conversion's own figures; a tampered
weight, or the wrong source, fails with exit status 1 naming what failed."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner
from helpers_runtime import copy_model, shared_tiny_model

from coreml_sd.cli import main
from coreml_sd.model_folder import Manifest

SENTINEL = 0xDEADBEEF  # MIL weight-blob metadata: sentinel u32, dtype u32, size u64, data offset u64
FP16 = 1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return shared_tiny_model(tmp_path_factory)


def verify(*args):
    result = CliRunner().invoke(main, ["verify", *map(str, args)])
    return result, (json.loads(result.stdout) if "--json" in args and result.stdout.startswith("{") else None)


def tamper_largest_fp16_weight(weight_file) -> int:
    """Negate the first half of the largest fp16 weight in a package's weight file, in place (not a
    uniform scale: a norm layer after it would undo that); returns its size in bytes."""
    raw = np.fromfile(weight_file, dtype=np.uint8)
    blobs = []
    for start in range(64, len(raw) - 64 + 1, 64):
        meta = raw[start:start + 64]
        if meta[:4].view(np.uint32)[0] == SENTINEL and meta[4:8].view(np.uint32)[0] == FP16:
            blobs.append((int(meta[8:16].view(np.uint64)[0]), int(meta[16:24].view(np.uint64)[0])))
    size, offset = max(blobs)
    values = raw[offset:offset + size].view(np.float16).copy()
    values[: values.size // 2] *= -1
    raw[offset:offset + size] = values.view(np.uint8)
    raw.tofile(weight_file)
    return size


def test_fresh_conversion_verifies_with_the_conversions_figures(tiny):
    source, folder = tiny
    result, report = verify(folder, "--json")
    assert result.exit_code == 0, result.output
    assert report["passed"] and report["failed"] == [] and report["source"] == str(source)
    assert report["executor"] == "mil cpu exact (fp32 compute, fp16 rounding)"
    m = Manifest.read(folder)
    for component in ("text_encoder", "unet", "vae_decoder"):
        r = report["results"][component]
        assert r["passed"] and r["min_psnr_db"] >= 35 and r["threshold_db"] == 35
        # the same inputs, references and executor as the conversion's gate: the same figure
        assert r["min_psnr_db"] == pytest.approx(m.parity["components"][component]["min_psnr_db"], abs=0.01)
    image = report["results"]["image"]
    assert image["passed"] and image["min_psnr_db"] >= 35
    assert report["results"]["image"]["package"] == "8 euler steps, seed 0, guidance 7.5"
    text, _ = verify(folder, "--steps", "2")
    assert text.exit_code == 0
    assert re.search(r"^unet\s+Unet\.mlpackage\s+\d+\.\d\s+>= 35\s+ok$", text.output, re.M), text.output
    assert re.search(r"^image\s+2 euler steps, seed 0, guidance 7\.5\s+\d+\.\d\s+>= 35\s+ok$", text.output, re.M)


def test_tampered_weight_fails_naming_the_component(tiny, tmp_path):
    folder = copy_model(tiny[1], tmp_path / "tampered")
    assert tamper_largest_fp16_weight(folder / "Unet.mlpackage/Data/com.apple.CoreML/weights/weight.bin") > 1000
    result, report = verify(folder, "--json", "--steps", "2")
    assert result.exit_code == 1
    assert "unet" in report["failed"] and report["results"]["unet"]["min_psnr_db"] < 35
    assert report["results"]["text_encoder"]["passed"] and report["results"]["vae_decoder"]["passed"]
    text, _ = verify(folder, "--steps", "0")
    assert text.exit_code == 1
    assert re.search(r"^unet\s+Unet\.mlpackage\s+-?\d+\.\d\s+>= 35\s+FAILED$", text.output, re.M), text.output
    assert re.search(r"FAILED: unet -?\d+\.\d dB \(under the threshold\)", text.output)
    assert re.search(r"^image\s+skipped: --steps 0$", text.output, re.M)


def test_source_elsewhere_wrong_source_and_threshold(tiny, tmp_path, tiny_vpred_dir):
    source, original = tiny
    folder = copy_model(original, tmp_path / "moved")
    data = json.loads((folder / "manifest.json").read_text())
    data["source"]["path"] = str(tmp_path / "gone")
    (folder / "manifest.json").write_text(json.dumps(data))
    missing, _ = verify(folder, "--steps", "0")
    assert missing.exit_code == 1
    assert f"the manifest's source model {tmp_path / 'gone'} is not there; pass the source" in missing.output
    assert verify(folder, "--steps", "0", "--against", source)[0].exit_code == 0
    # another model's weights (a tiny model of another seed): every package fails
    wrong, report = verify(folder, "--steps", "0", "--against", tiny_vpred_dir, "--json")
    assert wrong.exit_code == 1 and report["failed"] == ["text_encoder", "unet", "vae_decoder"]
    strict, report = verify(folder, "--steps", "0", "--against", source, "--threshold", "90", "--json")
    assert strict.exit_code == 1 and report["failed"] == ["text_encoder", "unet", "vae_decoder"]
    assert report["skipped"] == {"image": "--steps 0"}


def test_compressed_chunked_partial_conversion(tiny, tmp_path):
    """A UNet-only conversion, chunked and 4-bit palettized: the chunks run as one; the pass mark is
    what the conversion measured against the source (less 1 dB; under 35 dB at 4 bits, ~28.5 dB on the
    tiny model); no image without a text encoder."""
    source, _ = tiny
    out = tmp_path / "unet-p4"
    made = CliRunner().invoke(main, ["convert", str(source), "-o", str(out), "--components", "unet", "--chunk-unet",
                                     "--weights", "palettize-4", "-q"])
    assert made.exit_code == 0, made.output
    result, report = verify(out, "--json")
    assert result.exit_code == 0, result.output
    unet = report["results"]["unet"]
    recorded = Manifest.read(out).parity["components"]["unet"]["psnr_vs_source_db"]["noise_pred"]
    assert unet["package"] == "UnetChunk1.mlpackage, UnetChunk2.mlpackage"
    assert recorded < 35 and unet["threshold_db"] == pytest.approx(recorded - 1.0)
    assert unet["min_psnr_db"] == pytest.approx(recorded, abs=0.01)
    assert set(report["results"]) == {"unet"}
    assert report["skipped"] == {"image": "a partial conversion (no text_encoder, vae_decoder package) cannot generate"}
