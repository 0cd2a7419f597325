"""`coreml-sd serve` driven by webuiapi, a real AUTOMATIC1111 API client, on the built-in model.

The server runs in this process (tests/helpers_serve.py), so its generation thread uses the same
torch thread count as the CLI run in this process: the same code on the same inputs with the same
reductions, so the decoded pixels are compared for exact equality.
"""

from __future__ import annotations

import inspect
import json
import threading
import weakref

import numpy as np
import pytest
import requests
from click.testing import CliRunner
from helpers_serve import running_server, wait_until
from PIL import Image

webuiapi = pytest.importorskip("webuiapi")

from coreml_sd.cli import main
from coreml_sd.images import GenerationParams, read_parameters
from coreml_sd.serve.config import ServeConfig

PROMPT = "a handwritten digit seven"
SMALL = {"width": 32, "height": 32, "steps": 4, "cfg_scale": 7.5}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, tiny_diffusers_dir):
    root = tmp_path_factory.mktemp("models")
    (root / "tiny").symlink_to(tiny_diffusers_dir, target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory, models_dir):
    out = tmp_path_factory.mktemp("served")
    config = ServeConfig(port=0, output=out, models_dir=models_dir, device="cpu", precision="fp32")
    with running_server(config) as running:
        yield running


@pytest.fixture()
def api(server):
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port)


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def run_cli(tmp_path, *args) -> dict:
    result = CliRunner().invoke(main, ["generate", *map(str, args), "--format", "png", "-o", str(tmp_path),
                                       "--device", "cpu", "--precision", "fp32", "--json", "-q"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def long_request(api, results: list, **kwargs):
    """Start a txt2img in a thread; its WebUIApiResult (or exception) lands in `results`."""
    def go():
        try:
            results.append(api.txt2img(prompt=PROMPT, width=32, height=32, **kwargs))
        except Exception as exc:  # noqa: BLE001 - the test asserts on it
            results.append(exc)
    thread = threading.Thread(target=go)
    thread.start()
    return thread


def progress_when(api, results: list, condition) -> dict:
    """The first /progress answer that meets `condition` (fails at once if the request ended)."""
    def check():
        if results:
            raise AssertionError(f"the request ended early: {results[0]!r}")
        progress = api.get_progress()
        return progress if condition(progress) else None
    return wait_until(check)


def test_txt2img_equals_the_cli(api, server, tmp_path):
    result = api.txt2img(prompt=PROMPT, negative_prompt="blurry", seed=5, n_iter=2, sampler_name="Euler a", **SMALL)
    summary = run_cli(tmp_path, PROMPT, "--negative-prompt", "blurry", "--seed", 5, "--num-images", 2,
                      "--steps", 4, "--guidance-scale", 7.5, "--width", 32, "--height", 32)
    assert [img["seed"] for img in summary["images"]] == result.info["all_seeds"] == [5, 6]
    for got, made in zip(result.images, summary["images"]):
        with Image.open(made["path"]) as cli_image:
            assert np.array_equal(pixels(got), pixels(cli_image))
            # the PNG the API returns carries the same A1111 parameters text as the CLI's file
            assert got.info["parameters"] == cli_image.info["parameters"]
    params = GenerationParams.from_a1111(result.info["infotexts"][1])
    assert (params.seed, params.steps, params.sampler, params.width, params.negative_prompt) == (6, 4, "Euler a", 32, "blurry")
    saved = sorted(server.worker.config.output.glob("*.png"))
    assert {p.name for p in saved} >= set(result.info["images_saved"]) and len(result.info["images_saved"]) == 2
    for name, got in zip(result.info["images_saved"], result.images):
        assert read_parameters(server.worker.config.output / name) == got.info["parameters"]


def test_parameters_echo_and_info_shape(api):
    result = api.txt2img(prompt=PROMPT, seed=1, **SMALL)
    assert result.parameters["prompt"] == PROMPT and result.parameters["steps"] == 4
    for key in ("all_prompts", "all_seeds", "infotexts", "sd_model_name", "sampler_name", "cfg_scale"):
        assert key in result.info
    assert result.info["warnings"] == []  # webuiapi's default payload sets nothing coreml-sd ignores


def test_legacy_sampler_names_and_schedulers(api):
    result = api.txt2img(prompt=PROMPT, seed=2, sampler_name="DPM++ 2M Karras", **SMALL)
    params = GenerationParams.from_a1111(result.info["infotexts"][0])
    assert (params.sampler, params.schedule) == ("DPM++ 2M", "karras")
    same = api.txt2img(prompt=PROMPT, seed=2, sampler_name="DPM++ 2M", scheduler="karras", **SMALL)
    assert np.array_equal(pixels(result.image), pixels(same.image))


def test_sampler_and_scheduler_lists_are_read_at_request_time(api, monkeypatch):
    from coreml_sd import samplers

    names = [s["name"] for s in api.get_samplers()]
    assert names == [info.display_name for info in samplers.SAMPLERS.values()]
    monkeypatch.setitem(samplers.SAMPLERS, "euler_test", samplers.SAMPLERS["euler"].__class__(
        samplers.euler, "Euler Test", False, False, "euler", "EulerDiscreteScheduler"))
    assert "Euler Test" in [s["name"] for s in api.get_samplers()]
    from coreml_sd import schedules

    assert [s["name"] for s in api.get_schedulers()] == ["automatic"] + [s for s in schedules.SCHEDULES if s != "default"]


def test_invalid_values_are_422_naming_the_field(server):
    url = f"{server.url}/sdapi/v1/txt2img"
    cases = [({"steps": 0}, "steps"), ({"cfg_scale": "x"}, "cfg_scale"), ({"width": 33, "height": 32}, "width"),
             ({"sampler_name": "plms-turbo"}, "sampler_name"), ({"scheduler": "cosine-ish"}, "scheduler"),
             ({"seed": -2}, "seed"), ({"n_iter": 1000}, "n_iter"),
             ({"override_settings": {"sd_model_checkpoint": "../../etc/passwd"}}, "sd_model_checkpoint")]
    for body, field in cases:
        response = requests.post(url, json={"prompt": PROMPT, **body})
        assert response.status_code == 422, (body, response.text)
        locs = [d["loc"] for d in response.json()["detail"]]
        assert any(field in loc for loc in locs), (body, locs)
    detail = requests.post(url, json={"sampler_name": "plms-turbo"}).json()["detail"][0]["msg"]
    assert "Euler a" in detail and "DPM++ 2M" in detail  # the valid choices


def test_unknown_and_unsupported_fields_are_warned_about(server):
    body = {"prompt": PROMPT, "seed": 3, "steps": 2, "width": 32, "height": 32, "restore_faces": True,
            "made_up_field": 1, "enable_hr": False, "override_settings": {"CLIP_stop_at_last_layers": 2}}
    response = requests.post(f"{server.url}/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200
    warnings = json.loads(response.json()["info"])["warnings"]
    assert any("restore_faces" in w for w in warnings) and any("made_up_field" in w for w in warnings)
    assert any("CLIP_stop_at_last_layers" in w for w in warnings)
    assert not any("enable_hr" in w for w in warnings)  # set to its inactive value: nothing to warn about


def test_progress_and_interrupt_between_steps(api, server):
    results: list = []
    thread = long_request(api, results, seed=9, steps=1000, n_iter=8)  # a minute of work if nothing stopped it
    first = progress_when(api, results, lambda p: p["state"]["sampling_step"] > 2)
    later = progress_when(api, results, lambda p: p["state"]["sampling_step"] > first["state"]["sampling_step"])
    assert 0 < first["progress"] < later["progress"] < 1 and later["eta_relative"] > 0
    assert later["state"]["sampling_steps"] == 1000 and later["state"]["job_count"] == 8
    assert "step" in later["textinfo"]
    assert later["current_image"] is None  # the pipeline reports no latents yet: no preview
    before = set(server.worker.config.output.iterdir())
    api.interrupt()
    thread.join(20)
    assert not thread.is_alive()
    (result,) = results
    assert result.images == [] and result.info["interrupted"] is True  # image 1 of 8 was being sampled
    assert set(server.worker.config.output.iterdir()) == before  # nothing partial written
    assert api.get_progress()["progress"] == 0


def test_models_and_switching_frees_the_previous(api, server):
    titles = [m["title"] for m in api.get_sd_models()]
    assert titles == ["builtin", "tiny"]
    previous = weakref.ref(server.worker.pipe)
    api.set_options({"sd_model_checkpoint": "tiny"})
    assert api.get_options()["sd_model_checkpoint"] == "tiny"
    import gc

    gc.collect()
    assert previous() is None  # the built-in model's pipeline is gone, not kept beside the new one
    result = api.txt2img(prompt="a cat", seed=1, steps=2, width=16, height=16)
    assert GenerationParams.from_a1111(result.info["infotexts"][0]).model == "tiny"
    # a request may name another model for itself (A1111's override_settings)
    builtin = api.txt2img(prompt=PROMPT, seed=1, override_settings={"sd_model_checkpoint": "builtin"}, **SMALL)
    assert GenerationParams.from_a1111(builtin.info["infotexts"][0]).model == "digits"
    bad = requests.post(f"{server.url}/sdapi/v1/options", json={"sd_model_checkpoint": "../tiny"})
    assert bad.status_code == 422 and "valid models: builtin, tiny" in bad.text
    api.set_options({"sd_model_checkpoint": "builtin"})
    assert api.get_options()["sd_model_checkpoint"] == "builtin"


def test_png_info_reads_our_png_and_the_cli_jpeg(api, tmp_path):
    result = api.txt2img(prompt=PROMPT, seed=8, **SMALL)
    info = api.png_info(result.image).json
    assert info["info"] == result.image.info["parameters"]
    assert info["parameters"]["Seed"] == 8 and info["parameters"]["Size-1"] == 32
    summary = run_cli(tmp_path, "a blue 3", "--seed", 4, "--steps", 2)
    jpeg = tmp_path / "x.jpg"
    Image.open(summary["images"][0]["path"]).save(jpeg)  # a copy without metadata
    assert api.png_info(Image.open(jpeg)).json["info"] == ""


def pipeline_has_init_image() -> bool:
    from coreml_sd.pipeline import Pipeline

    return "init_image" in inspect.signature(Pipeline.generate).parameters


def test_img2img_fields_are_validated(server):
    bad = requests.post(f"{server.url}/sdapi/v1/img2img", json={"init_images": ["not base64!"], "steps": 2})
    assert bad.status_code == 422 and "init_images.0" in bad.text
    bad = requests.post(f"{server.url}/sdapi/v1/img2img", json={"init_images": [], "denoising_strength": 1.5})
    fields = {d["loc"][-1] for d in bad.json()["detail"]}
    assert bad.status_code == 422 and {"init_images", "denoising_strength"} <= fields


def test_a_pipeline_without_init_image_answers_501(monkeypatch):
    """A pipeline class whose generate lacks init_image (a plug-in, an older one) is a 501 naming it."""
    from coreml_sd.serve import runner

    class TextOnly:
        def generate(self, prompt, *, seed=None, steps=25):
            raise AssertionError("not called")

    request = type("R", (), {"kind": "img2img", "init_images": ("picture",), "image_options": {"strength": 0.5}})()
    with pytest.raises(runner.ApiError) as err:
        runner.check_supported(TextOnly(), request)
    assert err.value.status == 501 and "init_image" in str(err.value)


def test_img2img_matches_the_pipeline(api, server):
    assert pipeline_has_init_image()
    init = api.txt2img(prompt=PROMPT, seed=3, **SMALL).image.convert("RGB")
    result = api.img2img(images=[init], prompt="a handwritten digit one", seed=3, denoising_strength=0.5, **SMALL)
    direct = server.worker.pipe("a handwritten digit one", seed=3, steps=4, guidance_scale=7.5, width=32,
                                height=32, init_image=init, strength=0.5)
    assert np.array_equal(pixels(result.image), pixels(direct[0].image))
