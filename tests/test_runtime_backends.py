"""Backend selection: --backend syntax, fallback chains with their log line, explicit backends that
cannot run, per-component mixes whose arrays cross engines, and the coreml backend's path on numpy."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
from click.testing import CliRunner
from helpers_runtime import MilCoreML, as_macos, copy_model, image_psnr, shared_tiny_model

from coreml_sd.backends import LoadOptions
from coreml_sd.components import KINDS
from coreml_sd.conditioning import Conditioning
from coreml_sd.backends.selection import BACKEND_HELP, parse_backend, plan_components
from coreml_sd.cli import main
from coreml_sd.errors import BackendUnavailable, InputError
from coreml_sd.pipeline import Pipeline
from coreml_sd.sources import open_model

GEN = dict(seed=7, steps=3, sampler="euler", guidance_scale=5.0)
PROMPT = "a red apple on a table"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return shared_tiny_model(tmp_path_factory)


@pytest.fixture(scope="module")
def orphan(tiny, tmp_path_factory):
    """The converted folder with its manifest's source model gone (no torch fallback possible)."""
    folder = copy_model(tiny[1], tmp_path_factory.mktemp("orphan") / "model")
    data = json.loads((folder / "manifest.json").read_text())
    data["source"]["path"] = str(folder.parent / "deleted-source")
    (folder / "manifest.json").write_text(json.dumps(data))
    return folder


SD1_COMPONENTS = ("text_encoder", "unet", "vae_decoder")


def _fallbacks(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "coreml_sd" and r.levelno == logging.WARNING]


# -- syntax ---------------------------------------------------------------------------------------
def test_backend_syntax():
    auto = parse_backend("auto")
    assert auto.chains == {c: ("auto",) for c in KINDS} and not auto.strict("unet")
    assert parse_backend("mil").strict("unet")
    assert parse_backend("coreml,mil,torch").chains["vae_decoder"] == ("coreml", "mil", "torch")
    mixed = parse_backend("mil,unet=coreml/mil,text_encoder=torch")
    assert mixed.chains == {"text_encoder": ("torch",), "text_encoder_2": ("mil",), "unet": ("coreml", "mil"),
                            "vae_decoder": ("mil",), "vae_encoder": ("mil",), "controlled_unet": ("mil",),
                            "controlnet": ("mil",)}
    assert parse_backend("unet=coreml").chains["text_encoder"] == ("auto",)
    for text, needle in [("gpu", "unknown backend 'gpu'; valid: auto, coreml, mil, torch"),
                         ("vae=mil", "unknown component 'vae'; valid: text_encoder, text_encoder_2, unet, "
                                     "vae_decoder, vae_encoder, controlled_unet, controlnet"),
                         ("unet=mil,unet=torch", "unet is given twice"), ("auto,mil", "auto stands alone"),
                         ("mil,,torch", "empty entry"), ("mil,mil", "named twice")]:
        with pytest.raises(InputError, match=re.escape(needle)):
            parse_backend(text)
    example = "unet=coreml/mil,text_encoder=torch"  # the help's example parses as it says
    assert example in BACKEND_HELP
    assert parse_backend(example).chains == {"text_encoder": ("torch",), "text_encoder_2": ("auto",),
                                             "unet": ("coreml", "mil"), "vae_decoder": ("auto",),
                                             "vae_encoder": ("auto",), "controlled_unet": ("auto",),
                                             "controlnet": ("auto",)}


def test_cli_backend_errors_are_usage_errors(tiny):
    result = CliRunner().invoke(main, ["generate", "x", "--model", str(tiny[1]), "--backend", "unet=gpu"])
    assert result.exit_code == 2 and "unknown backend 'gpu'" in result.output
    help_text = CliRunner().invoke(main, ["generate", "--help"]).output
    for needle in ("--backend", "--compute-units", "[ane|gpu|cpu|all]", "--reduce-memory", "unet=coreml/mil"):
        assert needle in "".join(help_text.split()), needle


# -- fallback on Linux ----------------------------------------------------------------------------
@pytest.mark.skipif(__import__("sys").platform == "darwin", reason="Core ML is available on macOS")
def test_auto_falls_back_from_coreml_to_mil_with_one_line(tiny, caplog):
    caplog.set_level(logging.WARNING, logger="coreml_sd")
    pipe = Pipeline.load(tiny[1], device="cpu", precision="fp32")
    assert all(v.startswith("mil cpu") for v in pipe.components.runs_on.values())
    lines = _fallbacks(caplog)
    assert lines == ["text_encoder, unet, vae_decoder fell back from coreml to mil: coremltools runtime not "
                     "available on Linux (Core ML predicts only on macOS)"]


@pytest.mark.skipif(__import__("sys").platform == "darwin", reason="Core ML is available on macOS")
def test_explicit_coreml_off_macos_is_an_error(tiny, tmp_path):
    with pytest.raises(BackendUnavailable, match="coreml cannot run the text_encoder here: coremltools runtime "
                                                 "not available on Linux"):
        Pipeline.load(tiny[1], backend="coreml")
    result = CliRunner().invoke(main, ["generate", "a cat", "--model", str(tiny[1]), "--backend", "coreml",
                                       "-o", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "Error: --backend coreml: coreml cannot run the text_encoder here: coremltools runtime not available on " \
           "Linux" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_chain_ends_at_torch_only_where_the_source_exists(tiny, orphan, caplog, monkeypatch):
    # mil unable to run (simulated) -> torch, with the weights of the manifest's source model
    from coreml_sd.backends import standard

    monkeypatch.setattr(standard.MilBackend, "unavailable_reason", lambda self, *a: "simulated: no mil here")
    caplog.set_level(logging.WARNING, logger="coreml_sd")
    pipe = Pipeline.load(tiny[1], backend="mil,torch", device="cpu", precision="fp32")
    assert pipe.components.runs_on == {c: "torch cpu fp32" for c in SD1_COMPONENTS}
    assert _fallbacks(caplog) == ["text_encoder, unet, vae_decoder fell back from mil to torch: simulated: no mil here"]
    with pytest.raises(BackendUnavailable, match="no backend can run the text_encoder: mil: simulated: no mil here; "
                                                 "torch: torch needs the source model, and the manifest's source"):
        Pipeline.load(orphan, backend="mil,torch")


def test_auto_chain_depends_on_the_model(tiny, orphan):
    plan = plan_components(open_model(tiny[1]), parse_backend("auto"), LoadOptions(device="cpu"))
    assert plan["unet"].chain == ("coreml", "mil", "torch")
    assert plan_components(open_model(orphan), parse_backend("auto"), LoadOptions())["unet"].chain == ("coreml", "mil")
    diffusers = plan_components(open_model(tiny[0]), parse_backend("auto"), LoadOptions(device="cpu"))
    assert {r.backend for r in diffusers.values()} == {"torch"} and diffusers["unet"].chain == ("torch",)
    with pytest.raises(BackendUnavailable, match="mil cannot run the text_encoder here: tiny-sd is a diffusers model "
                                                 "and the mil backend runs converted Core ML model folders"):
        Pipeline.load(tiny[0], backend="mil")


# -- mixed backends ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mil_image(tiny):
    return Pipeline.load(tiny[1], backend="mil", device="cpu", precision="fp32")(PROMPT, **GEN)[0]


def test_mixed_per_component_backends_match_single_backend_images(tiny, mil_image):
    torch_image = Pipeline.load(tiny[0], backend="torch", device="cpu", precision="fp32")(PROMPT, **GEN)[0]
    pipe = Pipeline.load(tiny[1], backend="text_encoder=torch,unet=mil,vae_decoder=torch", device="cpu",
                         precision="fp32")
    assert pipe.components.runs_on == {"text_encoder": "torch cpu fp32", "unet": "mil cpu fast (fp32 for fp16 ops)",
                                       "vae_decoder": "torch cpu fp32"}
    mixed = pipe(PROMPT, **GEN)[0]
    assert mixed.image.size == (16, 16)
    # fp16 packages vs fp32 torch: the same bound as the mil-vs-torch image test of the converter
    assert image_psnr(mixed.image, torch_image.image) >= 30
    assert image_psnr(mixed.image, mil_image.image) >= 30
    assert mixed.params.extras["Backend"] == ("text_encoder torch cpu fp32; unet mil cpu fast (fp32 for fp16 ops); "
                                              "vae_decoder torch cpu fp32")


def test_numpy_unet_between_torch_components(tiny, mil_image, tmp_path, monkeypatch, caplog):
    """A Core ML UNet (numpy arrays: simulated Mac) with torch text encoder and VAE: the sampling loop
    runs on numpy and the torch components' arrays are converted at the boundary."""
    opener = as_macos(monkeypatch, MilCoreML(tmp_path / "cache"))
    caplog.set_level(logging.WARNING, logger="coreml_sd")
    pipe = Pipeline.load(tiny[1], backend="unet=coreml,text_encoder=mil,vae_decoder=torch", device="cpu",
                         precision="fp32", compute_units="gpu")
    assert pipe.components.runs_on["unet"] == "coreml gpu (CPU_AND_GPU)"
    assert type(pipe.components.asarray(np.zeros(2, np.float32))) is np.ndarray
    assert type(pipe.components.text_encoder).__name__ == "Boundary"
    assert type(pipe.encode_prompt("x").hidden) is np.ndarray  # torch output converted for the numpy loop
    result = pipe(PROMPT, **GEN)[0]
    assert opener.loaded == [("Unet.mlmodelc", "CPU_AND_GPU")] and _fallbacks(caplog) == []
    unet_calls = opener_calls(pipe)
    assert unet_calls and all(c["sample"] == ((2, 4, 8, 8), np.float16) for c in unet_calls)
    assert all(c["encoder_hidden_states"] == ((2, 32, 1, 77), np.float16) for c in unet_calls)
    assert type(result.latents) is np.ndarray
    assert image_psnr(result.image, mil_image.image) >= 30


def opener_calls(pipe):
    return pipe.components.unet.package.runners[0].model.calls


def test_coreml_backend_on_numpy_equals_mil(tiny, tmp_path, monkeypatch):
    """Every component through the coreml backend's code path (Core ML's predict stood in for by the
    exact mil executor) gives the mil backend's exact-mode results: same adapters, numpy arrays."""
    from coreml_sd.backends.selection import load_components
    from coreml_sd.sources import open_model

    as_macos(monkeypatch, MilCoreML(tmp_path / "cache"))
    pipe = Pipeline.load(tiny[1], backend="coreml", compute_units="ane")
    assert set(pipe.components.runs_on.values()) == {"coreml ane (CPU_AND_NE)"}
    exact = load_components(open_model(tiny[1]), parse_backend("mil"), LoadOptions(device="cpu", mil_mode="exact"))
    ids = np.asarray([pipe.tokenizer(PROMPT)] * 2, dtype=np.int64)
    emb = pipe.components.text_encoder.encode(ids).hidden
    assert type(emb) is np.ndarray and emb.shape == (2, 77, 32) and emb.dtype == np.float32
    np.testing.assert_array_equal(emb, exact.text_encoder.encode(ids).hidden.numpy())
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 4, 8, 8)).astype(np.float32)
    ctx = rng.standard_normal((4, 77, 32)).astype(np.float32)
    out = pipe.components.unet.predict(x, np.float32(500.0), Conditioning(ctx))  # 2 calls of the batch-2 package
    assert type(out) is np.ndarray and out.shape == (4, 4, 8, 8)
    np.testing.assert_array_equal(out, exact.unet.predict(x, np.float32(500.0), Conditioning(ctx)).numpy())
    z = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(pipe.components.vae_decoder.decode(z), exact.vae_decoder.decode(z).numpy())


def test_coreml_load_failure_on_compute_units_falls_back(tiny, tmp_path, monkeypatch, caplog):
    as_macos(monkeypatch, MilCoreML(tmp_path / "cache", fail_on=("CPU_AND_NE",)))
    caplog.set_level(logging.WARNING, logger="coreml_sd")
    pipe = Pipeline.load(tiny[1], backend="auto", compute_units="ane", device="cpu")
    assert all(v.startswith("mil cpu") for v in pipe.components.runs_on.values())
    line = ("fell back from coreml to mil: loading failed: Core ML could not load {} on CPU_AND_NE: RuntimeError: "
            "Error in declaring network. (simulated Core ML load failure on CPU_AND_NE)")
    assert _fallbacks(caplog) == [f"{c} " + line.format(p) for c, p in
                                  [("text_encoder", "TextEncoder.mlpackage"), ("unet", "Unet.mlpackage"),
                                   ("vae_decoder", "VAEDecoder.mlpackage")]]
    with pytest.raises(BackendUnavailable, match="Core ML could not load TextEncoder.mlpackage on CPU_AND_NE"):
        Pipeline.load(tiny[1], backend="coreml", compute_units="ane")
    assert Pipeline.load(tiny[1], backend="coreml", compute_units="gpu").components.runs_on["unet"].startswith("coreml")


def test_models_compiled_at_conversion_are_used(tiny, tmp_path, monkeypatch):
    """A folder converted with --compile carries .mlmodelc folders: used as they are, and one that does
    not load (compiled by a newer OS, say) is compiled into the cache instead."""
    import shutil

    folder = copy_model(tiny[1], tmp_path / "compiled")
    shutil.copytree(folder / "Unet.mlpackage", folder / "Unet.mlmodelc")  # stands in for a compiled model
    (folder / "VAEDecoder.mlmodelc").mkdir()  # one that does not load
    data = json.loads((folder / "manifest.json").read_text())
    data["components"]["unet"]["compiled"] = "Unet.mlmodelc"
    data["components"]["vae_decoder"]["compiled"] = "VAEDecoder.mlmodelc"
    (folder / "manifest.json").write_text(json.dumps(data))
    opener = as_macos(monkeypatch, MilCoreML(tmp_path / "cache"))
    Pipeline.load(folder, backend="coreml")
    assert opener.loaded == [("TextEncoder.mlmodelc", "ALL"), ("Unet.mlmodelc", "ALL"), ("VAEDecoder.mlmodelc", "ALL")]
    assert opener.cache.lookup(folder / "Unet.mlpackage") is None  # the folder's own: nothing compiled
    assert opener.cache.lookup(folder / "TextEncoder.mlpackage") is not None
    assert opener.cache.lookup(folder / "VAEDecoder.mlpackage") is not None


def test_compute_units_are_checked(tiny):
    with pytest.raises(InputError, match="unknown compute units 'npu'; valid: ane, gpu, cpu, all"):
        Pipeline.load(tiny[1], compute_units="npu")


@pytest.mark.macos
@pytest.mark.parametrize("units", ["cpu", "gpu", "ane", "all"])
def test_core_ml_on_macos(tiny, mil_image, tmp_path, monkeypatch, units):
    """macOS: the packages through Core ML itself on each compute units; compiled into the cache once."""
    from coreml_sd.backends.compiled_cache import CompiledModelCache

    monkeypatch.setenv("COREML_SD_CACHE", str(tmp_path / "cache"))
    pipe = Pipeline.load(tiny[1], backend="coreml", compute_units=units)
    assert set(pipe.components.runs_on.values()) == {f"coreml {units} ({_units(units)})"}
    assert image_psnr(pipe(PROMPT, **GEN)[0].image, mil_image.image) >= 30
    cache = CompiledModelCache(tmp_path / "cache")
    packages = [tiny[1] / f"{n}.mlpackage" for n in ("TextEncoder", "Unet", "VAEDecoder")]
    assert all(cache.lookup(p) for p in packages)
    assert not any(cache.compiled_path(p).compiled_now for p in packages)


def _units(short: str) -> str:
    from coreml_sd.backends.coreml_backend import COMPUTE_UNITS

    return COMPUTE_UNITS[short]


def test_a_changed_or_swapped_package_is_named_not_run(tiny, tmp_path):
    """The manifest records each package's hash; a package changed since (same size, other bytes),
    as one swapped in from another model would be, stops the load naming the package."""
    from coreml_sd.errors import ModelError

    folder = copy_model(tiny[1], tmp_path / "m")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert all(len(p["sha256"]) == 64 for p in manifest["components"].values())
    weights = next((folder / "TextEncoder.mlpackage").rglob("weight.bin"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="TextEncoder.mlpackage is not the package this folder was converted with"):
        Pipeline.load(folder, backend="mil", device="cpu")
