"""ControlNets converted to Core ML: Apple's layout and tensor names, the parity gate, generation on the
mil and coreml backends against torch, per-component fallback, and adding one to a converted folder."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from coreml_sd import Pipeline
from coreml_sd.errors import CoreMLSDError
from coreml_sd.metrics import psnr
from coreml_sd.model_folder import Manifest

torch = pytest.importorskip("torch")
pytest.importorskip("coremltools")

from helpers_controlnet import build_tiny_controlnet, control_picture, write_controlnet_file  # noqa: E402
from helpers_runtime import MilCoreML, as_macos, copy_model, shared_tiny_model  # noqa: E402

IMAGE = control_picture()
GEN = dict(seed=11, steps=6, guidance_scale=5.0)
RESIDUALS = [(2, 32, 8, 8), (2, 32, 8, 8), (2, 32, 4, 4), (2, 64, 4, 4), (2, 64, 4, 4)]


@pytest.fixture(scope="module")
def files(tiny_diffusers_dir, tmp_path_factory):
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("cn-convert")
    unet = UNet2DConditionModel.from_pretrained(tiny_diffusers_dir / "unet", local_files_only=True)
    out = {f"net_{k}": write_controlnet_file(root / f"control_tiny_{k}.safetensors", build_tiny_controlnet(unet, seed))
           for k, seed in (("a", 1), ("b", 2))}
    wide = UNet2DConditionModel(**{**dict(unet.config), "cross_attention_dim": 64})
    out["wide"] = write_controlnet_file(root / "control_wide.safetensors", build_tiny_controlnet(wide), family=None)
    return out


@pytest.fixture(scope="module")
def converted(tiny_diffusers_dir, files, tmp_path_factory):
    """The tiny model converted with `coreml-sd convert --controlnet control_tiny_a.safetensors`."""
    from conversion.cli import convert

    out = tmp_path_factory.mktemp("cn-converted") / "tiny-cn"
    result = CliRunner().invoke(convert, [str(tiny_diffusers_dir), "-o", str(out), "-q",
                                          "--controlnet", str(files["net_a"])])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def torch_pipe(tiny_diffusers_dir):
    return Pipeline.load(tiny_diffusers_dir, backend="torch", precision="fp32")


def _specs(package: Path):
    from coreml_sd.backends.coreml_backend import read_specs

    inputs, outputs = read_specs(package)
    return [(s.name, tuple(s.shape), s.dtype) for s in inputs], [(s.name, tuple(s.shape), s.dtype) for s in outputs]


@pytest.mark.slow
def test_layout_and_tensors_are_apples(converted):
    m = Manifest.read(converted)
    assert set(m.controlnets) == {"ControlTinyA"} and "controlled_unet" in m.components
    entry = m.controlnets["ControlTinyA"]
    assert entry.info.package == "controlnet/ControlTinyA.mlpackage" and (converted / entry.info.package).is_dir()
    assert entry.source["name"] == "control_tiny_a" and entry.info.psnr_db >= 35
    inputs, outputs = _specs(converted / "controlnet" / "ControlTinyA.mlpackage")
    assert inputs == [("sample", (2, 4, 8, 8), "fp16"), ("timestep", (2,), "fp16"),
                      ("encoder_hidden_states", (2, 32, 1, 77), "fp16"), ("controlnet_cond", (2, 3, 16, 16), "fp16")]
    assert outputs == [(f"additional_residual_{i}", s, "fp32") for i, s in enumerate(RESIDUALS)]
    unet_in, unet_out = _specs(converted / "ControlledUnet.mlpackage")
    plain_in, plain_out = _specs(converted / "Unet.mlpackage")
    assert unet_in == plain_in + [(f"additional_residual_{i}", s, "fp16") for i, s in enumerate(RESIDUALS)]
    assert unet_out == plain_out == [("noise_pred", (2, 4, 8, 8), "fp32")]
    assert m.components["controlled_unet"].psnr_db >= 35


def _mil_pipe(folder):
    return Pipeline.load(folder, backend="mil", device="cpu", precision="fp16")


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["name", "file"])
def test_mil_matches_torch(converted, files, torch_pipe, spec):
    """Converted (fp16 programs, run in fp16 by the mil executor) against torch fp32 from the source files."""
    pipe = _mil_pipe(converted)
    model = "ControlTinyA" if spec == "name" else files["net_a"]
    got = pipe("a red cat", controlnets=[(model, IMAGE, 0.8, 0.0, 1.0)], **GEN)[0]
    assert pipe.components.runs_on["controlnet:ControlTinyA"].startswith("mil")
    assert pipe.components.runs_on["controlled_unet"].startswith("mil")
    expected = torch_pipe("a red cat", controlnets=[(files["net_a"], IMAGE, 0.8, 0.0, 1.0)], **GEN)[0]
    plain = torch_pipe("a red cat", **GEN)[0]
    assert psnr(expected.latents, got.latents) >= 30
    assert psnr(expected.latents, plain.latents) < 30  # the ControlNet's part is what is compared
    assert got.params.extras["ControlNet 0"] == expected.params.extras["ControlNet 0"]


@pytest.mark.slow
def test_a_controlnet_the_folder_lacks_falls_back_to_torch(converted, files, torch_pipe, caplog):
    pipe = Pipeline.load(converted, backend="mil,torch", device="cpu", precision="fp16")
    caplog.set_level(logging.WARNING, logger="coreml_sd")
    got = pipe("a red cat", controlnets=[(files["net_b"], IMAGE)], **GEN)[0]
    assert pipe.components.runs_on["controlnet:ControlTinyB"].startswith("torch")
    assert pipe.components.runs_on["controlled_unet"].startswith("mil")
    assert any("controlnet:ControlTinyB fell back from mil to torch" in r.message for r in caplog.records)
    expected = torch_pipe("a red cat", controlnets=[(files["net_b"], IMAGE)], **GEN)[0]
    assert psnr(expected.latents, got.latents) >= 30


@pytest.mark.slow
def test_coreml_backend_runs_controlnet_packages(converted, files, torch_pipe, tmp_path, monkeypatch):
    """The coreml backend's code path (Core ML's predict stood in for by the exact mil executor): numpy
    arrays in fp16 at the package's batch."""
    opener = as_macos(monkeypatch, MilCoreML(tmp_path / "cache"))
    pipe = Pipeline.load(converted, backend="coreml", compute_units="ane")
    got = pipe("a red cat", controlnets=[("ControlTinyA", IMAGE, 0.8)], **GEN)[0]
    assert ("ControlTinyA.mlmodelc", "CPU_AND_NE") in opener.loaded and ("ControlledUnet.mlmodelc", "CPU_AND_NE") \
        in opener.loaded
    calls = pipe.components.parts["controlnet:ControlTinyA"].package.runners[0].model.calls
    assert calls and all(c["controlnet_cond"] == ((2, 3, 16, 16), np.float16) for c in calls)
    expected = torch_pipe("a red cat", controlnets=[(files["net_a"], IMAGE, 0.8)], **GEN)[0]
    assert psnr(expected.latents, got.latents) >= 30


@pytest.mark.slow
def test_weight_zero_on_a_controlled_unet_package_is_plain_unet(converted):
    """A ControlledUnet package at a step without control gets zero residuals: x + 0 = x, so its output is
    the plain Unet package's computation on the same weights (the two programs differ only by those adds)."""
    pipe = _mil_pipe(converted)
    zero = pipe("a red cat", controlnets=[("ControlTinyA", IMAGE, 0.0)], **GEN)[0]
    plain = pipe("a red cat", **GEN)[0]
    assert psnr(plain.latents, zero.latents) >= 60


# -- convert-controlnet ----------------------------------------------------------------------------
def _add(folder, net, *args):
    """`coreml-sd convert-controlnet NET --into FOLDER` (in coreml-sd's group: errors print, exit 1)."""
    from coreml_sd.cli import Group
    from conversion.cli import convert_controlnet

    cli = Group(commands={"convert-controlnet": convert_controlnet})
    return CliRunner().invoke(cli, ["convert-controlnet", str(net), "--into", str(folder), "-q", "--json", *args])


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.mark.slow
def test_convert_controlnet_adds_one_without_touching_the_rest(tmp_path_factory, files, tmp_path):
    _, shared = shared_tiny_model(tmp_path_factory)
    folder = copy_model(shared, tmp_path / "model")
    before = _listing(folder)
    result = _add(folder, files["net_b"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["name"] == "ControlTinyB"
    assert sorted(summary["added"]) == ["ControlledUnet.mlpackage", "controlnet/ControlTinyB.mlpackage"]
    after = _listing(folder)
    assert {k: v for k, v in after.items() if k in before and k != "manifest.json"} == \
        {k: v for k, v in before.items() if k != "manifest.json"}  # same files, not rewritten
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no staging left
    m = Manifest.read(folder)
    assert set(m.controlnets) == {"ControlTinyB"} and m.controlnets["ControlTinyB"].info.psnr_db >= 35
    # A second one reuses the ControlledUnet.
    unet_files = {k: v for k, v in after.items() if k.startswith("ControlledUnet")}
    result = _add(folder, files["net_a"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["added"] == ["controlnet/ControlTinyA.mlpackage"]
    assert {k: v for k, v in _listing(folder).items() if k.startswith("ControlledUnet")} == unet_files
    assert set(Manifest.read(folder).controlnets) == {"ControlTinyA", "ControlTinyB"}
    pipe = _mil_pipe(folder)
    pipe("a red cat", controlnets=[("ControlTinyA", IMAGE, 0.5), ("ControlTinyB", IMAGE, 0.5)], **GEN)
    assert pipe.components.runs_on["controlnet:ControlTinyB"].startswith("mil")


@pytest.mark.slow
def test_convert_controlnet_failures_leave_the_folder_as_it_was(tmp_path_factory, files, tmp_path, monkeypatch):
    from conversion import controlnet as module
    from conversion.export import ConversionError

    _, shared = shared_tiny_model(tmp_path_factory)
    folder = copy_model(shared, tmp_path / "model")
    before = _listing(folder)
    manifest = (folder / "manifest.json").read_bytes()
    result = _add(folder, files["wide"])
    assert result.exit_code == 1 and "context width is 64, the model's 32" in result.output
    real = module.convert_controlnet

    def failing(conv, net, shapes):
        real(conv, net, shapes)
        raise ConversionError("parity gate failed for the test")

    monkeypatch.setattr(module, "convert_controlnet", failing)
    result = _add(folder, files["net_b"])
    assert result.exit_code == 1 and "parity gate failed for the test" in result.output
    assert _listing(folder) == before and (folder / "manifest.json").read_bytes() == manifest
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_existing_name_needs_force_and_is_replaced_atomically(converted, files, tmp_path):
    folder = copy_model(converted, tmp_path / "model")
    result = _add(folder, files["net_a"])
    assert result.exit_code == 1 and "already holds ControlNet ControlTinyA" in result.output
    old = _listing(folder)["controlnet/ControlTinyA.mlpackage/Manifest.json"]
    result = _add(folder, files["net_a"], "--force")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["added"] == ["controlnet/ControlTinyA.mlpackage"]  # the ControlledUnet stays
    assert _listing(folder)["controlnet/ControlTinyA.mlpackage/Manifest.json"] != old


@pytest.mark.slow
def test_chunked_compressed_folder_gets_a_chunked_compressed_controlled_unet(tiny_diffusers_dir, files, tmp_path):
    """Apple chunks the ControlledUnet as the Unet and compresses ControlNets as the UNet."""
    from conversion.cli import convert

    folder = tmp_path / "chunked"
    result = CliRunner().invoke(convert, [str(tiny_diffusers_dir), "-o", str(folder), "-q", "--chunk-unet",
                                          "--weights", "int8", "--components", "unet"])
    assert result.exit_code == 0, result.output
    result = _add(folder, files["net_a"])
    assert result.exit_code == 0, result.output
    m = Manifest.read(folder)
    assert {"controlled_unet_chunk1", "controlled_unet_chunk2"} <= set(m.components)
    assert "controlled_unet" not in m.components
    assert m.controlnets["ControlTinyA"].info.weights == "int8"
    assert all(m.components[c].psnr_db >= 35 for c in ("controlled_unet_chunk1", "controlled_unet_chunk2"))
    chunk2_inputs = [s[0] for s in _specs(folder / "ControlledUnetChunk2.mlpackage")[0]]
    chunk1_inputs = [s[0] for s in _specs(folder / "ControlledUnetChunk1.mlpackage")[0]]
    residual_inputs = [n for n in chunk1_inputs + chunk2_inputs if n.startswith("additional_residual_")]
    assert sorted(residual_inputs) == [f"additional_residual_{i}" for i in range(5)]  # in the chunk with the middle block


def test_controlnet_rewrite_equals_diffusers():
    """The Neural-Engine rewrite (UNet input half + zero convs), both attention layouts, and the UNet rewrite
    taking residuals, against diffusers in fp32."""
    from diffusers import UNet2DConditionModel

    from conversion.ane import controlnet_from_diffusers, unet_from_diffusers
    from tiny_models import UNET_CONFIG

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET_CONFIG).eval()
    net = build_tiny_controlnet(unet, seed=4)
    sample, t = torch.randn(2, 4, 8, 8), torch.tensor([500.0, 20.0])
    context, image = torch.randn(2, 77, 32), torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        down, mid = net(sample, t, encoder_hidden_states=context, controlnet_cond=image, return_dict=False)
        expected = unet(sample, t, encoder_hidden_states=context, down_block_additional_residuals=tuple(down),
                        mid_block_additional_residual=mid).sample
        for attention in ("split_einsum_v2", "original"):
            ours = controlnet_from_diffusers(net, attention=attention)(sample, t, context.transpose(1, 2)[:, :, None],
                                                                        image)
            for a, b in zip(ours, (*down, mid)):
                np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5, rtol=1e-5)
            rewrite = unet_from_diffusers(unet, attention=attention)
            got = rewrite(sample, t, context.transpose(1, 2)[:, :, None], residuals=list(ours))
            np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-5, rtol=1e-5)
    assert rewrite.residual_shapes(2, (8, 8)) == [tuple(r.shape) for r in (*down, mid)] == RESIDUALS


def test_bgr_controlnets_are_refused_by_the_converter():
    from conversion.ane.config import ControlNetConfig

    with pytest.raises(CoreMLSDError, match="controlnet_conditioning_channel_order='bgr'"):
        ControlNetConfig.from_diffusers({"controlnet_conditioning_channel_order": "bgr",
                                         "down_block_types": ["DownBlock2D"], "block_out_channels": [32]})


@pytest.mark.slow
def test_a_folder_missing_a_listed_controlnet_package_says_so(converted, tmp_path):
    folder = copy_model(converted, tmp_path / "model")
    shutil.rmtree(folder / "controlnet")
    with pytest.raises(CoreMLSDError, match="missing controlnet/ControlTinyA.mlpackage"):
        Pipeline.load(folder, backend="mil")


@pytest.mark.slow
def test_an_unknown_name_lists_the_folders_controlnets(converted):
    with pytest.raises(CoreMLSDError, match="ControlNet ControlTinyZ not found: .* holds ControlTinyA"):
        _mil_pipe(converted)("a red cat", controlnets=[("ControlTinyZ", IMAGE)], **GEN)


@pytest.mark.parametrize("name,package", [
    ("control_v11p_sd15_canny", "ControlV11PSd15Canny"), ("lllyasviel/sd-controlnet-canny", "LllyasvielSdControlnetCanny"),
    ("control_sd15_depth", "ControlSd15Depth"), ("diffusers_xl_canny_mid", "DiffusersXlCannyMid")])
def test_package_names_are_apples(name, package):
    """torch2coreml.py: name.replace("/", "_"), then "".join(word.title() for word in re.split('_|-', name))."""
    from coreml_sd.components import controlnet_package_name

    assert controlnet_package_name(name) == package


def test_manifest_round_trips_its_controlnets(tmp_path):
    from coreml_sd.components import TensorSpec
    from coreml_sd.model_folder import ControlNetPackage, PackageInfo
    from test_convert_manifest import _manifest

    info = PackageInfo("controlnet/ControlX.mlpackage", (TensorSpec("sample", (2, 4, 8, 8), "fp16"),),
                       (TensorSpec("additional_residual_0", (2, 32, 8, 8), "fp32"),), "fp16", 10, 70.0)
    m = _manifest()
    m = Manifest(**{**{f: getattr(m, f) for f in m.__dataclass_fields__},
                    "controlnets": {"ControlX": ControlNetPackage(info, {"name": "x", "family": "sd1"}, {"a": 1})}})
    m.write(tmp_path)
    assert Manifest.read(tmp_path) == m
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["controlnets"]["ControlX"]["package"] == "controlnet/ControlX.mlpackage"
    del data["controlnets"]  # a folder written before ControlNets existed reads as having none
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    assert Manifest.read(tmp_path).controlnets == {}
