"""Core ML folders other tools wrote open without our manifest, and generate what ours do.

The tiny model, converted once by `coreml-sd convert`, is turned into what other tools' folders
look like: the manifest removed (Apple's Swift layout), its packages renamed to Apple's Python
pipeline names (no tokenizer files), and compiled models only (`.mlmodelc`, written by
`write_compiled_model`, as Mochi Diffusion downloads are). Each generates, on the mil executor,
the image the original folder generates: exactly, since the programs are the same and the facts
the folder lost are inferred (sizes, batch, family ...) or assumed as Apple's Swift pipeline does
(its PNDM schedule spacing equals the tiny source's saved config). Folders with the interface of
Apple's SD 1.5 and SDXL packages (helpers_interop) open with the facts those packages imply.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from helpers_interop import APPLE_SD15, APPLE_SDXL, interface_package
from helpers_runtime import shared_tiny_model

from coreml_sd.apple_layouts import (parse_python_name, python_name, swift_entry, swift_name, written_names)
from coreml_sd.cli import main
from coreml_sd.errors import ModelError
from coreml_sd.foreign_folder import ForeignFolder
from coreml_sd.model_folder import is_converted_folder, is_core_ml_folder
from coreml_sd.sources import open_model

VERSION = "org/tiny_model"  # a model version with "/" and "_", as Apple's names carry them
KW = dict(seed=3, steps=4, sampler="euler_a", guidance_scale=7.5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return shared_tiny_model(tmp_path_factory)


@pytest.fixture(scope="module")
def variants(tiny, tmp_path_factory):
    """kind -> folder: the original, without manifest, Apple Python names, compiled only."""
    from coreml_sd.mil.compiled import write_compiled_model

    _, original = tiny
    root = tmp_path_factory.mktemp("variants")
    bare = shutil.copytree(original, root / "no-manifest")
    (bare / "manifest.json").unlink()
    python, compiled = root / "python-names", root / "compiled-only"
    python.mkdir()
    compiled.mkdir()
    for child in original.iterdir():
        entry = swift_entry(child.name)
        if entry:
            shutil.copytree(child, python / python_name(VERSION, entry))
            write_compiled_model(child, compiled / swift_name(entry, ".mlmodelc"))
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(original / name, compiled / name)
    return {"original": original, "no-manifest": bare, "python-names": python, "compiled-only": compiled}


def _image(folder) -> np.ndarray:
    from coreml_sd.pipeline import Pipeline

    pipe = Pipeline.load(str(folder), backend="mil", device="cpu")
    return np.asarray(pipe("a handwritten digit seven", **KW)[0].image)


@pytest.mark.parametrize("kind", ["no-manifest", "python-names", "compiled-only"])
def test_other_layouts_generate_the_original_image(kind, variants):
    original, other = open_model(variants["original"]), open_model(variants[kind])
    assert isinstance(other, ForeignFolder) and not is_converted_folder(variants[kind])
    # What the folder lost is inferred or assumed to the values the conversion recorded:
    assert other.info.scheduler == original.info.scheduler
    assert (other.info.family, other.info.sizes, other.batch, other.info.scaling_factor) == \
        (original.info.family, original.info.sizes, original.batch, original.info.scaling_factor)
    # Same programs on the same executor, same schedule and noise: the same pixels.
    assert np.array_equal(_image(variants[kind]), _image(variants["original"]))


def test_inferred_and_assumed_facts(variants):
    folder = open_model(variants["python-names"])
    facts = folder.facts
    how = {k: f.how for k, f in facts.items()}
    assert (facts["family"].value, how["family"]) == ("sd1", "inferred")
    assert (facts["sizes"].value, facts["batch"].value, facts["vae_scale_factor"].value) == ([[16, 16]], 2, 2)
    assert (facts["text_hidden_size"].value, facts["max_length"].value, facts["precision"].value) == (32, 77, "fp16")
    assert facts["min_target"].value == "macOS13" and facts["latent_channels"].value == 4
    # our own packages carry their attention layout and weights in their metadata
    assert (facts["attention"].value, how["attention"]) == ("split_einsum_v2", "read")
    assert (facts["weights"].value, how["weights"]) == ("fp16", "read")
    assert {k for k, v in how.items() if v == "assumed"} == {"scheduler", "prediction_type", "scaling_factor",
                                                             "tokenizer"}
    assert folder.info.name == "org_tiny_model" and folder.manifest.layout == "python"
    assert folder.info.tokenizer_files.vocab.parent.name == "clip"  # no vocab.json: CLIP's, bundled
    assert folder.package_paths("unet")[0].name == python_name(VERSION, "unet")


def test_compiled_only_folder_uses_its_compiled_models(variants):
    folder = open_model(variants["compiled-only"])
    assert [p.name for p in folder.package_paths("unet")] == ["Unet.mlmodelc"]
    assert [p.name for p in folder.compiled_paths("unet")] == ["Unet.mlmodelc"]
    assert folder.facts["tokenizer"].how == "read"


def test_prediction_type_override_and_modifiers(variants):
    folder = open_model(variants["no-manifest"], prediction_type="v_prediction")
    assert folder.info.prediction_type == "v_prediction"
    assert (folder.facts["prediction_type"].how, folder.facts["prediction_type"].source) == \
        ("read", "given (--prediction-type)")
    with pytest.raises(ModelError, match="lora.*cannot be applied to it"):
        open_model(variants["no-manifest"], loras=["x.safetensors"])


def test_not_a_model_folder_names_every_kind(tmp_path):
    (tmp_path / "Notes.mlpackage").mkdir()  # an unknown model name is not a Stable Diffusion folder
    assert not is_core_ml_folder(tmp_path)
    with pytest.raises(ModelError, match=r"a folder of Core ML models \(TextEncoder, Unet, VAEDecoder"):
        open_model(tmp_path)


def test_python_names_of_several_models_are_refused(variants, tmp_path):
    for version in ("a/one", "b/two"):
        shutil.copytree(variants["python-names"] / python_name(VERSION, "unet"),
                        tmp_path / python_name(version, "unet"))
    with pytest.raises(ModelError, match="several Apple-converted models.*a_one, b_two"):
        open_model(tmp_path)


def test_verify_against_source(tiny, variants):
    source, _ = tiny
    runner = CliRunner()
    result = runner.invoke(main, ["verify", str(variants["compiled-only"]), "--against", str(source), "--steps", "2",
                                  "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["passed"] and set(report["results"]) == {"text_encoder", "unet", "vae_decoder", "image"}
    assert report["results"]["unet"]["package"] == "Unet.mlmodelc"
    refused = runner.invoke(main, ["verify", str(variants["compiled-only"])])
    assert refused.exit_code == 1 and "pass the checkpoint or diffusers folder it was converted from with --against" \
        in refused.output


def test_info_and_models_report_facts_and_contents(variants):
    runner = CliRunner()
    report = json.loads(runner.invoke(main, ["info", str(variants["python-names"]), "--json"]).output)
    assert report["facts"]["family"] == {"value": "sd1", "how": "inferred", "from": report["facts"]["family"]["from"]}
    assert report["contents"]["converted_by"] == "coreml-sd (its manifest.json is missing)"
    assert report["contents"]["sizes"] == ["16x16"] and not report["contents"]["chunked_unet"]
    text = runner.invoke(main, ["info", str(variants["no-manifest"])]).output
    assert "scaling_factor   0.18215" in text and "assumed: the sd1 family's" in text
    listing = runner.invoke(main, ["models", str(variants["compiled-only"].parent), str(variants["original"]),
                                   "--json"])
    assert listing.exit_code == 0, listing.output
    found = {e["name"]: e for e in json.loads(listing.output)}
    assert {"builtin", "tiny-sd", "compiled-only", "no-manifest", "org_tiny_model"} <= set(found)
    assert found["compiled-only"]["contents"]["components"]["unet"]["path"] == "Unet.mlmodelc"
    assert found["tiny-sd"]["contents"]["converted_by"].startswith("coreml-sd ")


# -- Apple's published interfaces -----------------------------------------------------------------
@pytest.fixture(scope="module")
def apple_sd15(tmp_path_factory):
    """SD 1.5 as torch2coreml names it for its Python pipeline, with a ControlNet-ready UNet and a
    ControlNet (split-einsum ops in the UNet, as Apple's Neural-Engine conversion has)."""
    root = tmp_path_factory.mktemp("apple-sd15")
    version = "runwayml/stable-diffusion-v1-5"
    for entry, (ins, outs) in APPLE_SD15.items():
        interface_package(root / python_name(version, entry), ins, outs, einsum=entry.endswith("unet"))
    unet_ins = APPLE_SD15["unet"][0]
    residuals = APPLE_SD15["controlled_unet"][0][len(unet_ins):]
    interface_package(root / "ControlNet_lllyasviel_sd-controlnet-canny.mlpackage",
                      unet_ins + [("controlnet_cond", (2, 3, 512, 512), "fp16")],
                      [(n.replace("additional_residual", "down_res"), s, "fp32") for n, s, _ in residuals])
    return root


@pytest.fixture(scope="module")
def apple_sdxl(tmp_path_factory):
    """SDXL base in Apple's Swift resources, compiled only (as Swift loads it), 4-bit palettized UNet."""
    from coreml_sd.mil.compiled import write_compiled_model

    root = tmp_path_factory.mktemp("apple-sdxl")
    packages = tmp_path_factory.mktemp("apple-sdxl-packages")
    for entry, (ins, outs) in APPLE_SDXL.items():
        package = interface_package(packages / swift_name(entry), ins, outs, einsum=entry == "unet",
                                    lut=entry == "unet")
        write_compiled_model(package, root / swift_name(entry, ".mlmodelc"))
    return root


def test_apple_sd15_interface_opens_with_its_facts(apple_sd15):
    folder = open_model(apple_sd15)
    facts = {k: f.value for k, f in folder.facts.items()}
    assert facts["family"] == "sd1" and folder.facts["family"].source.endswith("input channels")
    assert (facts["sizes"], facts["batch"], facts["vae_scale_factor"], facts["text_hidden_size"]) == \
        ([[512, 512]], 2, 8, 768)
    assert facts["attention"] == "split_einsum" and folder.facts["attention"].how == "inferred"
    assert (facts["weights"], facts["precision"], facts["scaling_factor"]) == ("fp16", "fp16", 0.18215)
    assert folder.info.name == "runwayml_stable-diffusion-v1-5"
    assert folder.info.scheduler.prediction_type == "epsilon" and folder.facts["prediction_type"].how == "assumed"
    assert folder.contents()["controlnets"] == {
        "lllyasviel_sd-controlnet-canny": "ControlNet_lllyasviel_sd-controlnet-canny.mlpackage"}
    assert set(folder.manifest.components) == {"text_encoder", "unet", "vae_decoder", "vae_encoder", "controlled_unet"}
    from coreml_sd.info import folder_contents

    control = folder_contents(folder)["controlnet"]
    assert control == {"unet_takes_residuals": 13, "controlnets": ["lllyasviel_sd-controlnet-canny"],
                       "controlled_unet": python_name("runwayml/stable-diffusion-v1-5", "controlled_unet")}


def test_apple_sdxl_interface_opens_with_its_facts(apple_sdxl):
    folder = open_model(apple_sdxl)
    facts = {k: f.value for k, f in folder.facts.items()}
    assert facts["family"] == "sdxl"
    assert (facts["sizes"], facts["text_hidden_size"], facts["vae_scale_factor"]) == ([[1024, 1024]], 2048, 8)
    assert (facts["scaling_factor"], facts["weights"], facts["attention"]) == (0.13025, "palettized", "split_einsum")
    assert folder.facts["weights"].how == "inferred" and facts["tokenizer"] == "bundled CLIP BPE"
    assert [p.name for p in folder.package_paths("text_encoder_2")] == ["TextEncoder2.mlmodelc"]
    assert folder.info.spec.pooled_encoder.component == "text_encoder_2"


def test_sdxl_refiner_and_sd2_by_their_inputs(tmp_path):
    """The family follows the registry: a lone second encoder and 5 time ids (refiner); 1024-wide
    context (SD 2.x), and --prediction-type v_prediction picks its 768-v variant."""
    refiner = tmp_path / "refiner"
    refiner.mkdir()
    ins, outs = APPLE_SDXL["unet"]
    ins = [("encoder_hidden_states", (2, 1280, 1, 77), "fp16") if n == "encoder_hidden_states" else
           ("time_ids", (2, 5), "fp16") if n == "time_ids" else (n, s, d) for n, s, d in ins]
    interface_package(refiner / "Unet.mlpackage", ins, outs)
    interface_package(refiner / "TextEncoder2.mlpackage", *APPLE_SDXL["text_encoder_2"])
    with pytest.raises(ModelError, match="incomplete Core ML model folder, missing a vae_decoder package$"):
        open_model(refiner)
    assert ForeignFolder(refiner, partial=True).info.family == "sdxl-refiner"
    sd2 = tmp_path / "sd2"
    sd2.mkdir()
    ins, outs = APPLE_SD15["unet"]
    interface_package(sd2 / "Unet.mlpackage", [(n, (2, 1024, 1, 77), d) if n == "encoder_hidden_states" else (n, s, d)
                                               for n, s, d in ins], outs)
    assert ForeignFolder(sd2, partial=True, prediction_type="v_prediction").info.family == "sd2-v"
    assert ForeignFolder(sd2, partial=True).info.family == "sd2"


# -- names ---------------------------------------------------------------------------------------
def test_apple_python_names_round_trip():
    for entry in ("text_encoder", "text_encoder_2", "unet", "unet_chunk1", "unet_chunk2", "vae_decoder",
                  "vae_encoder", "safety_checker", "unet_refiner", "unet_refiner_chunk2", "controlled_unet",
                  "controlled_unet_chunk1"):
        name = python_name("stabilityai/stable-diffusion-xl-base-1.0", entry)
        assert parse_python_name(name) == ("stabilityai_stable-diffusion-xl-base-1.0", entry), name
    assert python_name("runwayml/stable-diffusion-v1-5", "unet") == \
        "Stable_Diffusion_version_runwayml_stable-diffusion-v1-5_unet.mlpackage"  # torch2coreml's _get_out_path
    assert parse_python_name("Stable_Diffusion_version_x_unknown.mlpackage") is None
    assert swift_entry("UnetChunk1.mlmodelc") == "unet_chunk1" and swift_entry("Unet.bin") is None
    assert written_names("both", "a/b", "unet").aliases == ("Unet.mlpackage",)
    assert written_names("python", "a/b", "vae_decoder").compiled == "Resources/VAEDecoder.mlmodelc"
    assert written_names("swift", "a/b", "text_encoder").compiled == "TextEncoder.mlmodelc"
