"""manifest.json: one writer and one reader (coreml_sd.model_folder), strict about what it reads."""

from __future__ import annotations

import json
import sys

import pytest

from coreml_sd.config import SchedulerConfig
from coreml_sd.errors import ModelError
from coreml_sd.model_folder import ConvertedModel, Manifest, PackageInfo, TensorSpec


def _manifest(**overrides) -> Manifest:
    io = (TensorSpec("z", (1, 4, 8, 8), "fp32"),)
    components = {name: PackageInfo(f"{stem}.mlpackage", io, io, "fp16", 10, 60.0)
                  for name, stem in (("text_encoder", "TextEncoder"), ("unet", "Unet"), ("vae_decoder", "VAEDecoder"))}
    fields = dict(name="m", family="sd1", scheduler=SchedulerConfig(prediction_type="v_prediction"), width=64,
                  height=48, batch=2, latent_channels=4, vae_scale_factor=8, scaling_factor=0.18215,
                  text_hidden_size=768, attention="split_einsum_v2", weights="palettize-6", min_target="iOS17",
                  components=components, trigger_words={"shiny": [49408, 49409]},
                  source={"path": "/nowhere/model.safetensors", "sha256": "ab" * 32})
    fields.update(overrides)
    return Manifest(**fields)


def test_round_trip(tmp_path):
    m = _manifest()
    m.write(tmp_path)
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["format"] == "coreml-sd.model" and data["prediction_type"] == "v_prediction"
    assert Manifest.read(tmp_path) == m


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.update(format="other"), "not a coreml-sd model manifest"),
    (lambda d: d.update(format_version=99), "format version 99 is not supported"),
    (lambda d: d.update(surprise=1), "unknown key.*surprise"),
    (lambda d: d.pop("width"), "missing key.*width"),
    (lambda d: d.update(family="sd9"), "family 'sd9'"),
    (lambda d: d.update(prediction_type="epsilon"), "disagrees with the scheduler"),
    (lambda d: d["components"].update(unet_chunk1=d["components"]["unet"]), "needs both unet_chunk1 and unet_chunk2"),
    (lambda d: d["components"]["unet"]["inputs"][0].update(dtype="int64"), "dtype 'int64'"),
])
def test_bad_manifests_are_named(tmp_path, edit, message):
    data = _manifest().to_dict()
    edit(data)
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match=message):
        Manifest.read(tmp_path)


def test_converted_model_needs_its_files_and_the_generation_components(tmp_path):
    _manifest().write(tmp_path)
    with pytest.raises(ModelError, match="missing vocab.json, merges.txt, TextEncoder.mlpackage"):
        ConvertedModel(tmp_path)
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_text("{}")
    for stem in ("TextEncoder", "Unet", "VAEDecoder"):
        (tmp_path / f"{stem}.mlpackage").mkdir()
    partial = _manifest(components={k: v for k, v in _manifest().components.items() if k != "vae_decoder"})
    partial.write(tmp_path)
    with pytest.raises(ModelError, match="missing a vae_decoder package"):
        ConvertedModel(tmp_path)


def test_torch_weights_need_the_recorded_source(tmp_path):
    from coreml_sd.errors import BackendUnavailable
    from coreml_sd.tokenizer import bundled_files
    import shutil

    _manifest().write(tmp_path)
    shutil.copy(bundled_files().vocab, tmp_path / "vocab.json")
    shutil.copy(bundled_files().merges, tmp_path / "merges.txt")
    for stem in ("TextEncoder", "Unet", "VAEDecoder"):
        (tmp_path / f"{stem}.mlpackage").mkdir()
    model = ConvertedModel(tmp_path)
    assert model.info.sizes == ((64, 48),) and model.info.prediction_type == "v_prediction"
    assert model.tokenizer()("a shiny cat")[1:4] == [320, 49408, 49409]  # the trigger word's vectors
    with pytest.raises(BackendUnavailable, match="/nowhere/model.safetensors is not there"):
        model.torch_modules(device="cpu", dtype=None)


@pytest.mark.macos
@pytest.mark.skipif(sys.platform != "darwin", reason="needs macOS: Core ML's compiler")
def test_compile_writes_mlmodelc_beside_the_packages(tiny_diffusers_dir, tmp_path):
    from coreml_sd.sources import open_model
    from conversion.convert import ConvertOptions, convert_model

    out = convert_model(open_model(tiny_diffusers_dir), tmp_path / "c",
                        ConvertOptions(components=("vae_decoder",), compile=True)).path
    assert (out / "VAEDecoder.mlmodelc").is_dir()
    assert Manifest.read(out).components["vae_decoder"].compiled == "VAEDecoder.mlmodelc"
