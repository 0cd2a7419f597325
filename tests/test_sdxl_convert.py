"""A tiny SDXL base + refiner converted with `coreml-sd convert`: Apple's SDXL layout and tensor contract,
generation on mil (and on the coreml backend's code path, with a stand-in for Core ML's predict) equal to
torch, `verify` passing."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("coremltools")

import tiny_sdxl as T  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from coreml_sd.cli import main  # noqa: E402
from coreml_sd.metrics import image_psnr  # noqa: E402
from coreml_sd.pipeline import Pipeline  # noqa: E402

pytestmark = pytest.mark.slow  # one conversion of base + refiner (~40 s), shared by the tests here
PROMPT = "a castle on a hill, sunset"
KW = dict(seed=2, steps=6, sampler="euler", guidance_scale=5.0)


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl-convert")
    base = T.build_tiny_sdxl(0)
    refiner = T.build_tiny_refiner(base)
    files = {"base": T.write_single_file(base, root / "base.safetensors", family="sdxl"),
             "refiner": T.write_single_file(refiner, root / "refiner.safetensors", family="sdxl-refiner")}
    out = root / "xl-coreml"
    result = CliRunner().invoke(main, ["convert", str(files["base"]), "--refiner", str(files["refiner"]), "-o",
                                       str(out), "-q", "--json"])
    assert result.exit_code == 0, result.output
    return {**files, "root": root, "folder": out, "summary": json.loads(result.stdout)}


def test_packages_have_apples_sdxl_names_and_tensors(xl):
    manifest = json.loads((xl["folder"] / "manifest.json").read_text())
    assert manifest["family"] == "sdxl" and manifest["text_hidden_size"] == T.CONTEXT
    comps = manifest["components"]
    assert {k: v["package"] for k, v in comps.items()} == {
        "text_encoder": "TextEncoder.mlpackage", "text_encoder_2": "TextEncoder2.mlpackage",
        "unet": "Unet.mlpackage", "unet_refiner": "UnetRefiner.mlpackage", "vae_decoder": "VAEDecoder.mlpackage"}

    def tensors(entry, side):
        return {t["name"]: tuple(t["shape"]) for t in comps[entry][side]}

    c1, c2, p = T.TEXT_CONFIG_1["hidden_size"], T.TEXT_CONFIG_2["hidden_size"], T.POOLED
    assert tensors("text_encoder", "inputs") == {"input_ids": (1, 77)}
    assert tensors("text_encoder", "outputs") == {"hidden_embeds": (1, 77, c1), "pooled_outputs": (1, c1)}
    assert tensors("text_encoder_2", "outputs") == {"hidden_embeds": (1, 77, c2), "pooled_outputs": (1, p)}
    assert tensors("unet", "inputs") == {"sample": (2, 4, 8, 8), "timestep": (2,),
                                         "encoder_hidden_states": (2, T.CONTEXT, 1, 77),
                                         "text_embeds": (2, p), "time_ids": (2, 6)}
    assert tensors("unet_refiner", "inputs") == {"sample": (2, 4, 8, 8), "timestep": (2,),
                                                 "encoder_hidden_states": (2, c2, 1, 77),
                                                 "text_embeds": (2, p), "time_ids": (2, 5)}
    assert tensors("unet", "outputs") == {"noise_pred": (2, 4, 8, 8)}
    assert tensors("vae_decoder", "inputs") == {"z": (1, 4, 8, 8)}
    assert manifest["refiner"]["family"] == "sdxl-refiner" and manifest["refiner"]["text_hidden_size"] == c2
    assert all(p["passed"] for p in xl["summary"]["parity"].values())


def test_mil_images_equal_torch(xl):
    torch_image = Pipeline.load(xl["base"], backend="torch", device="cpu", precision="fp32")(PROMPT, **KW)[0]
    pipe = Pipeline.load(xl["folder"], backend="mil", device="cpu")
    assert pipe.refiner is not None  # the folder's UnetRefiner, used as Apple's pipeline uses it
    mil_image = pipe(PROMPT, refiner_switch=1.0, **KW)[0]
    assert image_psnr(mil_image.image, torch_image.image) >= 30
    assert "Refiner" not in mil_image.params.extras


def test_mil_base_and_refiner_equal_torch(xl):
    torch_image = Pipeline.load(xl["base"], backend="torch", device="cpu", precision="fp32",
                                refiner=xl["refiner"])(PROMPT, **KW)[0]
    mil_image = Pipeline.load(xl["folder"], backend="mil", device="cpu")(PROMPT, **KW)[0]
    assert image_psnr(mil_image.image, torch_image.image) >= 30
    assert mil_image.params.extras["Refiner"].startswith("refiner [")
    assert mil_image.params.extras["Refiner switch at"] == "0.8"


def test_coreml_backend_code_path(xl, tmp_path, monkeypatch):
    """The coreml backend (numpy arrays, compiled cache, extra inputs by name) with Core ML's predict
    stood in for by the mil executor in exact mode."""
    from helpers_runtime import MilCoreML, as_macos

    opener = as_macos(monkeypatch, MilCoreML(tmp_path / "cache"))
    torch_image = Pipeline.load(xl["base"], backend="torch", device="cpu", precision="fp32")(PROMPT, **KW)[0]
    pipe = Pipeline.load(xl["folder"], backend="coreml")
    image = pipe(PROMPT, refiner_switch=1.0, **KW)[0]
    assert image_psnr(image.image, torch_image.image) >= 30
    loaded = {name for name, _ in opener.loaded}
    assert {"TextEncoder.mlmodelc", "TextEncoder2.mlmodelc", "Unet.mlmodelc", "VAEDecoder.mlmodelc"} <= loaded


def test_verify_passes(xl):
    result = CliRunner().invoke(main, ["verify", str(xl["folder"]), "--json", "--steps", "4"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["passed"] and set(report["results"]) == {
        "text_encoder", "text_encoder_2", "unet", "unet_refiner", "vae_decoder", "image"}


def test_a_refiner_folder_of_its_own(xl):
    """A refiner converted alone: TextEncoder2, Unet (time ids of 5), VAEDecoder; used with --refiner FOLDER."""
    out = xl["root"] / "refiner-coreml"
    result = CliRunner().invoke(main, ["convert", str(xl["refiner"]), "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["family"] == "sdxl-refiner" and set(manifest["components"]) == {
        "text_encoder_2", "unet", "vae_decoder"}
    assert {t["name"]: t["shape"] for t in manifest["components"]["unet"]["inputs"]}["time_ids"] == [2, 5]
    torch_image = Pipeline.load(xl["base"], backend="torch", device="cpu", precision="fp32",
                                refiner=xl["refiner"])(PROMPT, **KW)[0]
    mil_image = Pipeline.load(xl["folder"], backend="mil", device="cpu", refiner=out)(PROMPT, **KW)[0]
    assert image_psnr(mil_image.image, torch_image.image) >= 30


def test_a_refiner_with_another_text_encoder_is_refused(xl, tmp_path):
    from conversion.convert import ConvertOptions, convert_model
    from conversion.export import ConversionError

    from coreml_sd.sources import open_model

    other = T.build_tiny_refiner(T.build_tiny_sdxl(5))
    path = T.write_single_file(other, tmp_path / "other-refiner.safetensors", family="sdxl-refiner")
    with pytest.raises(ConversionError, match="the refiner's text_encoder_2 differs .* --refiner FOLDER"):
        convert_model(open_model(xl["base"]), tmp_path / "x", ConvertOptions(components=("unet_refiner",)),
                      refiner=open_model(path))
    assert not (tmp_path / "x").exists()
    with pytest.raises(ConversionError, match="has no text_encoder to convert"):
        convert_model(open_model(xl["refiner"]), tmp_path / "y", ConvertOptions(components=("text_encoder",)))
