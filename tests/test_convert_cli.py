"""`coreml-sd convert` end to end on tiny models: layout, tensor contract, parity gate, images,
chunking, compression, and the output folder's atomicity (errors, Ctrl-C, SIGTERM, SIGKILL)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from coreml_sd.cli import main
from coreml_sd.mil.package import load_program
from coreml_sd.model_folder import Manifest
from coreml_sd.sources import open_model
from conversion.convert import ConvertOptions, convert_model, source_sha256
from conversion.export import ConversionError

ALL = "text_encoder,unet,vae_decoder,vae_encoder"
# DESIGN's tensor contract at the tiny model's sizes (latent 8x8, 16x16 pixels, 32-wide text).
CONTRACT = {
    "TextEncoder": ({"input_ids": ((1, 77), "fp32")},
                    {"last_hidden_state": ((1, 77, 32), "fp32"), "pooled_outputs": ((1, 32), "fp32")}),
    "Unet": ({"sample": ((2, 4, 8, 8), "fp16"), "timestep": ((2,), "fp16"),
              "encoder_hidden_states": ((2, 32, 1, 77), "fp16")}, {"noise_pred": ((2, 4, 8, 8), "fp32")}),
    "VAEDecoder": ({"z": ((1, 4, 8, 8), "fp16")}, {"image": ((1, 3, 16, 16), "fp32")}),
    "VAEEncoder": ({"x": ((1, 3, 16, 16), "fp32")}, {"latent": ((1, 8, 8, 8), "fp32")}),
}


def _leftovers(parent: Path, name: str) -> list[Path]:
    return sorted(parent.glob(f".{name}.*"))


@pytest.fixture(scope="module")
def converted(tiny_diffusers_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "tiny-coreml"
    result = CliRunner().invoke(main, ["convert", str(tiny_diffusers_dir), "-o", str(out), "--components", ALL,
                                       "--json"])
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout[result.stdout.index("{"):])


@pytest.fixture(scope="module")
def unet_chunks(tiny_diffusers_dir, tmp_path_factory):
    """The UNet alone as two chunks, fp16 and 6-bit palettized."""
    base = tmp_path_factory.mktemp("chunks")
    source = open_model(tiny_diffusers_dir)
    return {w: convert_model(source, base / w, ConvertOptions(components=("unet",), chunk_unet=True, weights=w)).path
            for w in ("fp16", "palettize-6")}


def test_folder_layout_manifest_and_parity(converted, tiny_diffusers_dir):
    out, summary = converted
    names = sorted(p.name for p in out.iterdir())
    assert names == ["TextEncoder.mlpackage", "Unet.mlpackage", "VAEDecoder.mlpackage", "VAEEncoder.mlpackage",
                     "manifest.json", "merges.txt", "vocab.json"]
    assert _leftovers(out.parent, out.name) == []
    m = Manifest.read(out)
    assert (m.family, m.prediction_type, m.width, m.height, m.batch) == ("sd1", "epsilon", 16, 16, 2)
    assert (m.attention, m.weights, m.precision, m.min_target) == ("split_einsum_v2", "fp16", "fp16", "macOS13")
    assert m.scheduler == open_model(tiny_diffusers_dir).info.scheduler
    assert m.source["sha256"] == source_sha256(tiny_diffusers_dir) and len(m.source["sha256"]) == 64
    assert m.source["path"] == str(tiny_diffusers_dir.absolute())
    import coremltools

    assert m.tools["coremltools"] == coremltools.__version__
    assert (out / "vocab.json").read_bytes() == (tiny_diffusers_dir / "tokenizer" / "vocab.json").read_bytes()
    for component, info in m.components.items():
        figures = m.parity["components"][component]
        assert figures["passed"] and figures["min_psnr_db"] >= 35, component
        assert info.psnr_db == figures["min_psnr_db"] and info.weights == "fp16" and info.size_bytes > 0
    assert set(summary["parity"]) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    assert {s["stage"] for s in summary["stages"]} >= {"load", "reference", "trace", "convert", "verify"}


def test_packages_follow_the_tensor_contract(converted):
    out, _ = converted
    m = Manifest.read(out)
    for package, (inputs, outputs) in CONTRACT.items():
        program = load_program(out / f"{package}.mlpackage")
        got_in = {s.name: (tuple(s.shape), s.dtype) for s in program.inputs}
        got_out = {s.name: (tuple(s.shape), s.dtype) for s in program.outputs}
        assert (got_in, got_out) == (inputs, outputs), package
        info = next(i for i in m.components.values() if i.package == f"{package}.mlpackage")
        assert {s.name: (s.shape, s.dtype) for s in info.inputs} == inputs


def test_converted_folder_opens_as_a_model(converted, tiny_diffusers_dir):
    from coreml_sd.errors import ModelError
    from coreml_sd.model_folder import ConvertedModel

    out, _ = converted
    model = open_model(out)
    assert isinstance(model, ConvertedModel)
    assert (model.info.kind, model.info.sizes, model.batch, model.info.family) == ("coreml", ((16, 16),), 2, "sd1")
    assert model.info.tokenizer_files.vocab == out / "vocab.json"
    source = open_model(tiny_diffusers_dir)
    assert model.tokenizer()("a red apple") == source.tokenizer()("a red apple")
    assert model.package_paths("unet") == [out / "Unet.mlpackage"]
    with pytest.raises(ModelError, match="converted model: loras"):
        open_model(out, loras=[(out / "manifest.json", 1.0)])
    mods = model.torch_modules(device="cpu", dtype=__import__("torch").float32)  # the recorded source
    assert mods.unet.config.cross_attention_dim == 32


def _image_psnr(a, b) -> float:
    from coreml_sd.metrics import image_psnr

    return image_psnr(a, b)


@pytest.fixture(scope="module")
def torch_image(tiny_diffusers_dir):
    return _generate(tiny_diffusers_dir, "torch", "fp32")


def _generate(model, backend, precision):
    from coreml_sd.pipeline import Pipeline

    pipe = Pipeline.load(model, backend=backend, device="cpu", precision=precision)
    return pipe("a red apple on a table", seed=7, steps=3, sampler="euler", guidance_scale=5.0)[0].image


def test_mil_backend_image_matches_torch_fp16(converted, torch_image):
    out, _ = converted
    reference = torch_image
    image = _generate(out, "mil", "fp16")
    assert image.size == reference.size == (16, 16)
    assert _image_psnr(image, reference) >= 30


def test_fp32_conversion_image_matches_torch(tiny_diffusers_dir, torch_image, tmp_path):
    """fp32 programs (GPU-only use) with the GPU attention layout: near-exact images."""
    options = ConvertOptions(precision="fp32", attention="original")
    out = convert_model(open_model(tiny_diffusers_dir), tmp_path / "fp32", options).path
    m = Manifest.read(out)
    assert m.components["unet"].inputs[0].dtype == "fp32" and m.attention == "original"
    assert _image_psnr(_generate(out, "mil", "fp32"), torch_image) >= 50


def test_unet_chunks_chain_to_the_unchunked_unet(converted, unet_chunks):
    from coreml_sd.mil.executor import Executor

    out, _ = converted
    chunked = unet_chunks["fp16"]
    m = Manifest.read(chunked)
    assert set(m.components) == {"unet_chunk1", "unet_chunk2"} and m.chunked
    first, second = (load_program(chunked / f"UnetChunk{i}.mlpackage") for i in (1, 2))
    # Apple's Swift pipeline feeds chunk 2 from chunk 1's outputs and the original inputs, by name
    originals = {s.name for s in first.inputs}
    assert {s.name for s in second.inputs} <= {s.name for s in first.outputs} | originals
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((2, 4, 8, 8)).astype(np.float16),
             "timestep": np.array([999, 20], dtype=np.float16),
             "encoder_hidden_states": rng.standard_normal((2, 32, 1, 77)).astype(np.float16)}
    whole = Executor(load_program(out / "Unet.mlpackage"), precision_mode="exact")(feeds)["noise_pred"]
    values = dict(feeds)
    values.update({k: v.half() for k, v in Executor(first, precision_mode="exact")(feeds).items()})
    chained = Executor(second, precision_mode="exact")({s.name: values[s.name] for s in second.inputs})["noise_pred"]
    assert float((chained - whole).abs().max()) <= 1e-3 * float(whole.abs().max())


def test_chunks_are_compressed_when_asked(unet_chunks):
    sizes = {}
    for weights, folder in unet_chunks.items():
        m = Manifest.read(folder)
        for name in ("unet_chunk1", "unet_chunk2"):
            assert m.components[name].weights == weights
            kinds = {op.op_type for op in load_program(folder / m.components[name].package).function.operations}
            assert ("constexpr_lut_to_dense" in kinds) == (weights != "fp16"), (weights, name)
            sizes[weights, name] = m.components[name].size_bytes
        assert m.parity["components"]["unet"]["passed"]
    for name in ("unet_chunk1", "unet_chunk2"):
        assert sizes["palettize-6", name] < 0.6 * sizes["fp16", name]
    # compressed: the gate compares with the dequantized weights and reports the cost vs the source
    assert "psnr_vs_source_db" in Manifest.read(unet_chunks["palettize-6"]).parity["components"]["unet"]


def test_single_file_sd2_checkpoint_with_embedding(tmp_path):
    """Single-file source (SD 2.x shape: GELU text encoder, linear projections), a textual inversion
    baked in (its trigger word in the manifest), 6-bit palettized in iOS18's compression ops."""
    import torch

    from helpers_checkpoint import write_a1111_pt, write_tiny_checkpoint

    ckpt, _, _ = write_tiny_checkpoint(tmp_path / "tiny2.safetensors", family="sd2")
    emb = write_a1111_pt(tmp_path / "shiny.pt", torch.randn(2, 32)) or tmp_path / "shiny.pt"
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["convert", str(ckpt), "-o", str(out), "--components", "text_encoder,unet",
                                       "--embedding", str(emb), "--attention", "split_einsum", "-q",
                                       "--weights", "palettize-6", "--min-target", "iOS18"])
    assert result.exit_code == 0, result.output
    m = Manifest.read(out)
    assert m.source["kind"] == "checkpoint" and m.source["sha256"] == source_sha256(ckpt)
    assert m.source["modifiers"]["embeddings"] == [str(emb.absolute())]
    assert m.family == "sd2" and m.attention == "split_einsum"
    assert list(m.trigger_words) == ["shiny"] and len(m.trigger_words["shiny"]) == 2
    assert min(m.trigger_words["shiny"]) >= 49408  # past the vocabulary: the package's table grew
    for component in ("text_encoder", "unet"):
        figures = m.parity["components"][component]
        # the gate compares with the dequantized weights: only fp16 compute error remains
        assert figures["passed"] and figures["min_psnr_db"] >= 55, (component, figures)
        assert all(v < figures["min_psnr_db"] for v in figures["psnr_vs_source_db"].values())
        assert m.components[component].weights == "palettize-6"
    users = {}
    for package in ("TextEncoder", "Unet"):
        ops = list(load_program(out / f"{package}.mlpackage").function.operations)
        users[package] = {c.op_type for op in ops if op.op_type.startswith("constexpr_") for c in op.outputs[0].child_ops}
    # layer weights and the token table are compressed; masks, norms and positions are not
    assert "gather" in users["TextEncoder"] and "conv" in users["Unet"]
    assert users["TextEncoder"] | users["Unet"] <= {"conv", "gather"}


# -- refusing, failing and being interrupted without leaving anything behind -----------------------
def test_existing_output_is_refused_without_force(tiny_diffusers_dir, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = CliRunner().invoke(main, ["convert", str(tiny_diffusers_dir), "-o", str(out), "-q"])
    assert result.exit_code == 1 and "already exists; pass --force" in result.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_force_replaces_the_folder(tiny_diffusers_dir, tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    convert_model(open_model(tiny_diffusers_dir), out, ConvertOptions(components=("vae_decoder",)), force=True)
    assert sorted(p.name for p in out.iterdir()) == ["VAEDecoder.mlpackage", "manifest.json", "merges.txt",
                                                      "vocab.json"]
    assert _leftovers(tmp_path, "old") == []


@pytest.mark.skipif(sys.platform == "darwin", reason="--compile works on macOS")
def test_compile_off_macos_is_a_clear_error(tiny_diffusers_dir, tmp_path):
    result = CliRunner().invoke(main, ["convert", str(tiny_diffusers_dir), "-o", str(tmp_path / "c"), "--compile"])
    assert result.exit_code == 1 and "--compile needs macOS" in result.output
    assert list(tmp_path.iterdir()) == []


def test_parity_gate_failure_writes_nothing(tiny_diffusers_dir, tmp_path):
    options = ConvertOptions(components=("vae_decoder",), threshold_db=150.0)
    with pytest.raises(ConversionError, match=r"parity gate failed for vae_decoder: image \(test image and noise\) \d+\.\d dB, .*\(minimum 150 dB\)"):
        convert_model(open_model(tiny_diffusers_dir), tmp_path / "fail", options)
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_mid_conversion_leaves_nothing(tiny_diffusers_dir, tmp_path):
    def interrupt(record):
        if record.stage == "convert":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert_model(open_model(tiny_diffusers_dir), tmp_path / "int", ConvertOptions(components=("vae_decoder",)),
                      on_stage=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_sigterm_to_a_converting_process_leaves_nothing(tiny_diffusers_dir, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "coreml_sd", "convert", str(tiny_diffusers_dir), "-o", str(out)],
                            stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:  # wait until it is inside the conversion (a package being written)
        seen.append(line)
        if " trace " in line:
            break
    assert _leftovers(tmp_path, "killed"), "the partial folder should exist while converting"
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode != 0, "".join(seen)
    assert list(tmp_path.iterdir()) == []


def test_sigkill_leaves_no_model_folder_and_the_next_run_cleans_up(tmp_path):
    target = tmp_path / "model"
    child = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from conversion.atomic import atomic_folder
        with atomic_folder(Path({str(target)!r}), force=False) as tmp:
            (tmp / "half.bin").write_bytes(b"x" * 1000)
            print("ready", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.kill()
    proc.wait(timeout=30)
    assert not target.exists()
    partials = _leftovers(tmp_path, "model")
    assert len(partials) == 1 and partials[0].name.startswith(".model.partial-")
    from conversion.atomic import atomic_folder

    with atomic_folder(target, force=False) as tmp:
        (tmp / "done.txt").write_text("ok")
    assert _leftovers(tmp_path, "model") == [] and (target / "done.txt").is_file()


def test_hypernetworks_are_refused_before_any_work(tiny_diffusers_dir, tmp_path):
    from helpers_checkpoint import write_hypernetwork

    (tmp_path / "files").mkdir()
    path, _ = write_hypernetwork(tmp_path / "files" / "toon.pt")
    source = open_model(tiny_diffusers_dir, hypernetworks=[(path, 1.0)])
    with pytest.raises(ConversionError, match="hypernetworks .* cannot be baked"):
        convert_model(source, tmp_path / "out" / "h")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_sizes_must_fit_the_unet(tiny_diffusers_dir, tmp_path):
    with pytest.raises(ConversionError, match="width must be a positive multiple of 4"):
        convert_model(open_model(tiny_diffusers_dir), tmp_path / "s", ConvertOptions(width=70, components=("unet",)))
    assert list(tmp_path.iterdir()) == []


def test_cli_choices_match_the_library():
    from conversion import cli, convert, export
    from conversion.ane.attention import ATTENTION_IMPLEMENTATIONS

    assert cli.ATTENTIONS == ATTENTION_IMPLEMENTATIONS
    assert cli.WEIGHTS == export.WEIGHT_MODES and cli.MIN_TARGETS == export.MIN_TARGETS
    assert set(cli.COMPONENTS) <= set(convert.COMPONENTS)
    assert convert.ConvertOptions().components is None  # the model's own: its family's component names
