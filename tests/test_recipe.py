"""Recipes read back from images: ours round-trip exactly; AUTOMATIC1111 / Forge files written the way
those tools write them (PNG `parameters`, piexif UserComment); Easy Diffusion's embedded metadata
(PNG text chunks per field as sdkit's save_dicts writes them, JSON in EXIF) and sidecar files;
malformed metadata gives clean errors or warnings."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, PngImagePlugin

from coreml_sd.cli import main
from coreml_sd.errors import InputError
from coreml_sd.images import FORMATS, GenerationParams, save_image
from coreml_sd.recipe import (
    decode_user_comment,
    merge_options,
    parse_infotext,
    read_recipe,
    recipe_options,
    split_sampler,
)

piexif = pytest.importorskip("piexif")
piexif_helper = pytest.importorskip("piexif.helper")

A1111_TEXT = (
    "masterpiece, best quality, (ultra detailed:1.2), 1girl, <lora:add_detail:0.8>, [blurry]\n"
    "standing in a field of flowers\n"
    "Negative prompt: (worst quality, low quality:1.4), easynegative\n"
    "Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 3547911287, Size: 512x768, "
    "Model hash: 7f96a1a9ca, Model: cyberrealistic_v32, Denoising strength: 0.45, Clip skip: 2, ENSD: 31337, "
    "Hires upscale: 2, Hires steps: 15, Hires upscaler: R-ESRGAN 4x+, "
    'Lora hashes: "add_detail: 7c6bad76eb54", TI hashes: "easynegative: c74b4e810b03", '
    "ADetailer model: face_yolov8n.pt, Version: v1.6.0"
)
FORGE_TEXT = (
    "a cozy cabin in the woods, [snow:rain:0.4], (volumetric light:1.1)\n"
    "Negative prompt: lowres\n"
    "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 1, Distilled CFG Scale: 3.5, "
    "Seed: 1234, Size: 896x1152, Model hash: 0123456789, Model: flux1-dev-bnb-nf4-v2, RNG: CPU, "
    "Module 1: ae, Version: f2.0.1v1.10.1-previous-313-g8a042934"
)
# Easy Diffusion's "embed" metadata as sdkit's save_dicts writes it: str() of each field's value.
ED_FIELDS = {
    "prompt": "a photograph of an astronaut riding a horse", "negative_prompt": "blurry, lowres",
    "seed": "42", "use_stable_diffusion_model": "sd-v1-5", "clip_skip": "True", "use_vae_model": "None",
    "sampler_name": "dpmpp_2m", "width": "512", "height": "768", "num_inference_steps": "25",
    "guidance_scale": "7.5", "use_lora_model": "None", "tiling": "None",
    "use_face_correction": "GFPGANv1.4", "use_upscale": "None",
}


@pytest.fixture
def pixels():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (16, 24, 3), dtype=np.uint8))


def write_png(path, pixels, chunks: dict):
    info = PngImagePlugin.PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value)
    pixels.save(path, pnginfo=info)
    return path


def write_with_user_comment(path, pixels, text, fmt="JPEG"):
    """As AUTOMATIC1111 (and sdkit) do: piexif's UserComment in its "unicode" encoding."""
    comment = piexif_helper.UserComment.dump(text, encoding="unicode")
    pixels.save(path, format=fmt, exif=piexif.dump({"Exif": {piexif.ExifIFD.UserComment: comment}}))
    return path


# ---------------------------------------------------------------------------------------------
# Our own images


OURS = GenerationParams(
    prompt='a "quoted" (cat:1.2), sitting\non two lines: ünïcödé 東京 [dog:bird:0.5]', negative_prompt="blurry, lowres",
    steps=30, sampler="DPM++ 2M", schedule="karras", guidance_scale=6.5, seed=1234567890123, width=640, height=448,
    model="tiny-sd", model_hash="0123456789", extras={"Backend": "torch cpu fp32", "RNG": "CPU"},
)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_our_images_round_trip_exactly(tmp_path, pixels, fmt):
    path = save_image(pixels, tmp_path, "x", fmt, OURS)
    recipe = read_recipe(path, model_hash="0123456789abcdef", model_name="tiny-sd")
    assert recipe.options == {
        "prompt": OURS.prompt, "negative_prompt": OURS.negative_prompt, "steps": 30, "sampler": "DPM++ 2M",
        "schedule": "karras", "guidance_scale": 6.5, "seed": 1234567890123, "width": 640, "height": 448}
    assert recipe.warnings == () and recipe.source == "infotext"
    assert (recipe.model, recipe.model_hash) == ("tiny-sd", "0123456789")
    # The options make the same parameters again.
    again = GenerationParams(**recipe.options, model="tiny-sd", model_hash="0123456789", extras=OURS.extras)
    assert again == OURS


def test_our_default_schedule_is_not_set(tmp_path, pixels):
    path = save_image(pixels, tmp_path, "x", "png", GenerationParams(prompt="a cat", extras={"RNG": "CPU"}))
    options, warnings = recipe_options(path)
    assert "schedule" not in options and options["sampler"] == "Euler a" and warnings == []


def test_another_model_hash_is_a_warning(tmp_path, pixels):
    path = save_image(pixels, tmp_path, "x", "png", OURS)
    warnings = read_recipe(path, model_hash="ffffffffff").warnings
    assert len(warnings) == 1 and "[0123456789], not the current model ? [ffffffffff]" in warnings[0]


# ---------------------------------------------------------------------------------------------
# AUTOMATIC1111 and Forge


def test_a1111_png(tmp_path, pixels):
    path = write_png(tmp_path / "a.png", pixels, {"parameters": A1111_TEXT})
    recipe = read_recipe(path, model_hash="7f96a1a9ca")
    assert recipe.options == {
        "prompt": "masterpiece, best quality, (ultra detailed:1.2), 1girl, , [blurry]\nstanding in a field of flowers",
        "negative_prompt": "(worst quality, low quality:1.4), easynegative",
        "steps": 28, "guidance_scale": 7.0, "seed": 3547911287, "clip_skip": 2, "eta_noise_seed_delta": 31337,
        "width": 512, "height": 768, "sampler": "DPM++ 2M", "schedule": "karras"}
    assert recipe.networks == (("lora", "add_detail", "0.8"),)
    text = "\n".join(recipe.warnings)
    assert "GPU noise" in text and "its default" in text  # no "RNG" field: AUTOMATIC1111's GPU default
    assert "hires fix (Hires upscale, Hires steps, Hires upscaler)" in text and "belongs to the hires pass" in text
    assert "lora 'add_detail' at 0.8" in text and "--lora FILE:0.8" in text
    assert "Lora hashes: add_detail: 7c6bad76eb54; TI hashes: easynegative: c74b4e810b03; " \
           "ADetailer model: face_yolov8n.pt" in text
    assert not any("not the current model" in w for w in recipe.warnings)  # same hash


def test_a1111_jpeg_and_webp_user_comment(tmp_path, pixels):
    for fmt, name in (("JPEG", "a.jpg"), ("WEBP", "a.webp")):
        path = write_with_user_comment(tmp_path / name, pixels, A1111_TEXT, fmt)
        recipe = read_recipe(path, model_name="cyberrealistic_v32")  # a model without a known hash
        assert recipe.fields == parse_infotext(A1111_TEXT)
        assert recipe.options["seed"] == 3547911287 and recipe.options["schedule"] == "karras"
        assert any("cannot be checked against the current model: the current model's hash is not known" in w
                   for w in recipe.warnings)
        assert not any("cannot be checked" in w for w in read_recipe(path).warnings)  # no model: no check


def test_forge_infotext(tmp_path, pixels):
    path = write_png(tmp_path / "f.png", pixels, {"parameters": FORGE_TEXT})
    recipe = read_recipe(path, model_hash="0123456789")
    assert recipe.options["sampler"] == "Euler a" and recipe.options["schedule"] == "automatic"
    assert recipe.options["guidance_scale"] == 1.0 and (recipe.options["width"], recipe.options["height"]) == (896, 1152)
    assert "old_timelines" not in recipe.options  # Forge on 1.10.1: the new timelines
    assert recipe.warnings == (("ignored (an extension's or a setting coreml-sd does not have): "
                                "Distilled CFG Scale: 3.5; Module 1: ae"),)


def test_quoted_values_with_commas_and_quotes():
    fields = parse_infotext('cat\nSteps: 5, Sampler: Euler, Seed: 1, Note: "a, \\"b\\": c", Size: 64x64')
    assert fields["Note"] == 'a, "b": c' and fields["Size"] == "64x64" and fields["Prompt"] == "cat"


def test_a_last_line_with_fewer_than_three_fields_is_prompt():
    fields = parse_infotext("a cat\nstyle: watercolor, mood: calm")
    assert fields == {"Prompt": "a cat\nstyle: watercolor, mood: calm", "Negative prompt": ""}


def test_old_versions_get_old_timelines_and_schedule_suffixes():
    recipe = read_recipe_text("a [cat:dog:0.5]\nSteps: 20, Sampler: DPM++ SDE Karras, Seed: 5, RNG: CPU, Version: v1.5.1")
    assert recipe.options["old_timelines"] is True
    assert (recipe.options["sampler"], recipe.options["schedule"]) == ("DPM++ SDE", "karras")
    assert recipe.warnings == ()


@pytest.mark.parametrize("name, expected", [
    ("DPM++ 2M Karras", ("DPM++ 2M", "karras")), ("DPM++ 2M SDE Exponential", ("DPM++ 2M SDE", "exponential")),
    ("Euler a", ("Euler a", None)), ("DDIM", ("DDIM", None)), ("DPM2 a Karras", ("DPM2 a", "karras")),
    ("DPM++ 2M SGMUniform", ("DPM++ 2M", "sgm_uniform")), ("UniPC", ("UniPC", None)),
])
def test_split_sampler(name, expected):
    assert split_sampler(name) == expected


def test_schedule_type_field_and_suffix():
    assert split_sampler("DPM++ 2M", "Karras") == ("DPM++ 2M", "karras")
    assert split_sampler("Euler", "Align Your Steps") == ("Euler", "align_your_steps")
    assert split_sampler("Euler", "Some Fork Schedule") == ("Euler", "some_fork_schedule")


def read_recipe_text(text):
    from coreml_sd.recipe import recipe_from_infotext

    return recipe_from_infotext(text)


def test_malformed_fields_are_warnings_not_errors():
    recipe = read_recipe_text("a cat\nSteps: many, Sampler: Euler, CFG scale: high, Seed: 7.0, Size: big, RNG: CPU")
    assert recipe.options == {"prompt": "a cat", "negative_prompt": "", "seed": 7, "sampler": "Euler"}
    assert recipe.warnings == ("Steps: 'many' is not an integer; not taken", "CFG scale: 'high' is not a number; not taken",
                               "Size: 'big' is not WIDTHxHEIGHT; the size is not taken")


def test_composable_and_is_a_warning():
    warnings = read_recipe_text("a cat AND a dog:0.5\nSteps: 5, Seed: 1, RNG: CPU").warnings
    assert len(warnings) == 1 and "AND" in warnings[0]
    assert read_recipe_text("cats and dogs\nSteps: 5, Seed: 1, RNG: CPU").warnings == ()


def test_old_eight_digit_hash_cannot_be_checked():
    from coreml_sd.recipe import recipe_from_infotext

    text = "x\nSteps: 1, Seed: 1, Model hash: 45dee52b, RNG: CPU"
    warnings = recipe_from_infotext(text, model_hash="0123456789").warnings
    assert len(warnings) == 1 and "old 8-digit hash" in warnings[0]


# ---------------------------------------------------------------------------------------------
# Easy Diffusion


def test_easydiffusion_png_text_chunks(tmp_path, pixels):
    path = write_png(tmp_path / "ed.png", pixels, ED_FIELDS)
    recipe = read_recipe(path, model_name="cyberrealistic_v32")
    assert recipe.source == "easydiffusion"
    assert recipe.options == {"prompt": ED_FIELDS["prompt"], "negative_prompt": "blurry, lowres", "seed": 42,
                              "steps": 25, "guidance_scale": 7.5, "width": 512, "height": 768,
                              "sampler": "dpmpp_2m", "clip_skip": 2}
    assert recipe.warnings == ("the recipe was made with model 'sd-v1-5', not the current model 'cyberrealistic_v32'",
                               "made with face correction 'GFPGANv1.4': not loaded by the recipe")


def test_easydiffusion_display_names_and_jpeg_json(tmp_path, pixels):
    display = {"Prompt": "a red fox", "Negative Prompt": "", "Seed": "7", "Stable Diffusion model": "sd-v1-5",
               "Clip Skip": "False", "Sampler": "euler_a", "Width": "512", "Height": "512", "Steps": "20",
               "Guidance Scale": "7"}
    png = read_recipe(write_png(tmp_path / "d.png", pixels, display))
    metadata = {"prompt": "a red fox", "negative_prompt": "", "seed": 7, "use_stable_diffusion_model": "sd-v1-5",
                "clip_skip": False, "sampler_name": "euler_a", "width": 512, "height": 512,
                "num_inference_steps": 20, "guidance_scale": 7, "use_lora_model": None}
    jpeg = read_recipe(write_with_user_comment(tmp_path / "d.jpg", pixels, json.dumps(metadata)))
    expected = {"prompt": "a red fox", "negative_prompt": "", "seed": 7, "steps": 20, "guidance_scale": 7.0,
                "width": 512, "height": 512, "sampler": "euler_a", "clip_skip": 1}
    assert png.options == expected and jpeg.options == expected
    assert png.warnings == jpeg.warnings == ()


def test_easydiffusion_sidecar_files(tmp_path):
    txt = tmp_path / "img.txt"
    txt.write_text("Prompt: a lighthouse at dusk\nNegative Prompt: fog\nSeed: 99\nStable Diffusion model: sd-v1-5\n"
                   "Sampler: ddim\nWidth: 768\nHeight: 512\nSteps: 30\nGuidance Scale: 8.5\n", encoding="utf-8")
    assert recipe_options(txt)[0] == {"prompt": "a lighthouse at dusk", "negative_prompt": "fog", "seed": 99,
                                      "steps": 30, "guidance_scale": 8.5, "width": 768, "height": 512,
                                      "sampler": "ddim"}
    js = tmp_path / "img.json"
    js.write_text(json.dumps({"prompt": "x", "seed": "oops", "num_inference_steps": 10}), encoding="utf-8")
    options, warnings = recipe_options(js)
    assert options == {"prompt": "x", "steps": 10} and warnings == ["seed: 'oops' is not an integer; not taken"]


def test_infotext_sidecar(tmp_path):
    txt = tmp_path / "params.txt"
    txt.write_text(A1111_TEXT, encoding="utf-8")
    assert read_recipe(txt).options["sampler"] == "DPM++ 2M"


# ---------------------------------------------------------------------------------------------
# Bad input


def test_not_an_image(tmp_path):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(InputError, match="cannot read .* as an image"):
        read_recipe(bad)
    with pytest.raises(InputError, match="no such file"):
        read_recipe(tmp_path / "missing.png")


def test_image_without_parameters(tmp_path, pixels):
    pixels.save(tmp_path / "plain.png")
    with pytest.raises(InputError, match="holds no generation parameters"):
        read_recipe(tmp_path / "plain.png")


def test_bad_json(tmp_path, pixels):
    path = write_with_user_comment(tmp_path / "j.jpg", pixels, '{"prompt": "x", ')
    with pytest.raises(InputError, match="does not parse"):
        read_recipe(path)
    path = write_with_user_comment(tmp_path / "l.jpg", pixels, "[1, 2]")  # not an object: read as a prompt
    assert read_recipe(path).options["prompt"] == "[1, 2]"
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="is a list, expected an object"):
        read_recipe(tmp_path / "list.json")


def test_user_comment_encodings():
    text = "a cat, Steps: 5"
    assert decode_user_comment(b"UNICODE\x00" + text.encode("utf-16-be")) == text
    assert decode_user_comment(b"UNICODE\x00" + text.encode("utf-16-le")) == text  # no BOM, little-endian
    assert decode_user_comment(b"UNICODE\x00" + text.encode("utf-16")) == text  # with a BOM
    assert decode_user_comment(b"ASCII\x00\x00\x00" + text.encode() + b"\x00") == text
    assert decode_user_comment(text.encode()) == text  # no prefix at all
    assert "\ufffd" in decode_user_comment(b"UNICODE\x00\xd8\x00\x00")  # broken UTF-16: replaced, no error


def test_command_line_overrides_the_recipe():
    merged = merge_options({"seed": 1, "steps": 20, "prompt": "a"}, {"seed": 5, "steps": None, "sampler": "Euler"})
    assert merged == {"seed": 5, "steps": 20, "prompt": "a", "sampler": "Euler"}


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_recipe(tmp_path, pixels):
    path = write_png(tmp_path / "a.png", pixels, {"parameters": A1111_TEXT})
    result = CliRunner().invoke(main, ["recipe", str(path), "--json"])
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["options"]["sampler"] == "DPM++ 2M" and data["model_hash"] == "7f96a1a9ca"
    assert data["networks"] == [{"kind": "lora", "name": "add_detail", "multiplier": "0.8"}]
    text = CliRunner().invoke(main, ["recipe", str(path)])
    assert text.exit_code == 0 and "sampler: DPM++ 2M" in text.stdout and "warning: made with hires fix" in text.stderr


def test_cli_recipe_errors(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    result = CliRunner().invoke(main, ["recipe", str(bad)])
    assert result.exit_code == 1 and result.stderr.startswith("Error: cannot read") and "Traceback" not in result.output
    assert CliRunner().invoke(main, ["recipe", str(tmp_path / "missing.png")]).exit_code == 2
