"""`coreml-sd generate --controlnet ...` and `coreml-sd checkpoint inspect` on ControlNet files."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from coreml_sd.cli import main

torch = pytest.importorskip("torch")

from helpers_controlnet import (build_tiny_controlnet, control_picture, full_size_controlnet_shapes,  # noqa: E402
                                write_controlnet_file)


@pytest.fixture(scope="module")
def files(tiny_diffusers_dir, tmp_path_factory):
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("cn-cli")
    unet = UNet2DConditionModel.from_pretrained(tiny_diffusers_dir / "unet", local_files_only=True)
    net = build_tiny_controlnet(unet, seed=1)
    image = root / "edges.png"
    control_picture().save(image)
    return {"net": write_controlnet_file(root / "control_tiny.pth", net), "image": image, "root": root}


def _generate(model, *args):
    return CliRunner().invoke(main, ["generate", "a red cat", "-m", str(model), "--backend", "torch",
                                     "--precision", "fp32", "--steps", "3", "-s", "7", "-q", "--json", "--format",
                                     "png", *map(str, args)])


def test_generate_with_a_controlnet_writes_a1111_metadata(tiny_diffusers_dir, files, tmp_path):
    from PIL import Image

    result = _generate(tiny_diffusers_dir, "--controlnet", f"{files['net']}:0.6", "--control-image", files["image"],
                       "--control-start", "0.1", "--control-end", "0.9", "--control-mode", "ControlNet is more important",
                       "-o", tmp_path)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    entry = summary["parameters"]["extras"]["ControlNet 0"]
    assert entry.startswith("Module: none, Model: control_tiny [") and "Weight: 0.6, " in entry
    assert entry.endswith("Resize Mode: Crop and Resize, Guidance Start: 0.1, Guidance End: 0.9, "
                          "Control Mode: ControlNet is more important")
    text = Image.open(summary["images"][0]["path"]).info["parameters"]
    assert f'ControlNet 0: "{entry}"' in text


def test_cli_equals_the_library(tiny_diffusers_dir, files, tmp_path):
    from coreml_sd import Pipeline
    from coreml_sd.image_input import load_image

    result = _generate(tiny_diffusers_dir, "--controlnet", files["net"], "--control-image", files["image"],
                       "--control-preprocessor", "invert", "-o", tmp_path)
    assert result.exit_code == 0, result.output
    written = np.asarray(load_image(json.loads(result.stdout)["images"][0]["path"]))
    pipe = Pipeline.load(tiny_diffusers_dir, backend="torch", precision="fp32")
    from coreml_sd.control import ControlUnit

    image = pipe("a red cat", seed=7, steps=3, controlnets=[ControlUnit(files["net"], files["image"],
                                                                        preprocessor="invert")])[0].image
    assert np.array_equal(np.asarray(image), written)


@pytest.mark.parametrize("args,needle", [
    (["--controlnet", "x.pth"], "1 --controlnet and 0 --control-image"),
    (["--controlnet", "a.pth", "--controlnet", "b.pth", "--control-image", "IMG", "--control-image", "IMG",
      "--control-mode", "balanced", "--control-mode", "prompt", "--control-mode", "prompt"],
     "--control-mode is given 3 times for 2 --controlnet"),
    (["--controlnet", "a.pth", "--control-image", "IMG", "--control-start", "0.9", "--control-end", "0.1"],
     "0 <= start <= end <= 1"),
    (["--controlnet", "a.pth", "--control-image", "IMG", "--control-mode", "loud"], "unknown control mode"),
    (["--controlnet", "a.pth:-1", "--control-image", "IMG"], "weight must be >= 0"),
    (["--controlnet", "a.pth", "--control-image", "IMG", "--control-preprocessor", "openpose"],
     "runs a downloaded model"),
    (["--controlnet", "a.pth", "--control-image", "missing.png"], "does not exist"),
])
def test_usage_errors_exit_2_and_write_nothing(tiny_diffusers_dir, files, tmp_path, args, needle):
    args = [str(files["image"]) if a == "IMG" else a for a in args]
    result = _generate(tiny_diffusers_dir, *args, "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert not (tmp_path / "out").exists()


def test_model_and_weight_parsing():
    from coreml_sd.cli_controlnet import _model_and_weight

    assert _model_and_weight(None, None, ("a.pth", "b.pth:0.5", "C:\\nets\\c.pth", "d:weird.pth")) == [
        ("a.pth", 1.0), ("b.pth", 0.5), ("C:\\nets\\c.pth", 1.0), ("d:weird.pth", 1.0)]


def test_inspect_names_a_controlnet_file(files):
    result = CliRunner().invoke(main, ["checkpoint", "inspect", str(files["net"]), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["kind"] == "controlnet" and report["format"] == "pickle (torch zip)"
    assert report["family"] == "sd1" and report["supported"] is True  # from its config beside it
    assert report["context_dim"] == 32 and report["block_widths"] == [32, 64] and report["residuals"] == 5
    assert report["layout"] == "control_model.*"


@pytest.mark.parametrize("family,context,widths,residuals", [
    ("sd1", 768, [320, 640, 1280, 1280], 13), ("sd2", 1024, [320, 640, 1280, 1280], 13),
    ("sdxl", 2048, [320, 640, 1280], 10)])
def test_full_size_controlnets_are_named_by_their_family(family, context, widths, residuals):
    from coreml_sd.checkpoint import detect
    from coreml_sd.checkpoint.controlnet_keymap import residual_count

    shapes = full_size_controlnet_shapes(family)
    det = detect.classify(shapes)
    assert (det.kind, det.family, det.context_dim, list(det.block_widths)) == ("controlnet", family, context, widths)
    bare = detect.classify(full_size_controlnet_shapes(family, prefix=""))
    assert (bare.kind, bare.family, bare.layout) == ("controlnet", family, "")
    assert residual_count(dict(_config(family))) == residuals


def _config(family):
    from diffusers import ControlNetModel, UNet2DConditionModel

    from coreml_sd.checkpoint.config import shipped_config

    with torch.device("meta"):
        return ControlNetModel.from_unet(UNet2DConditionModel(**dict(shipped_config(family).unet))).config


def test_a_controlnet_passed_as_the_model_says_what_it_is(files):
    from coreml_sd.errors import ModelError
    from coreml_sd.sources import open_model

    with pytest.raises(ModelError, match="is a ControlNet, not a Stable Diffusion model; pass it with --controlnet"):
        open_model(files["net"])


def test_difference_controlnets_are_refused_with_a_reason(files, tmp_path):
    from safetensors.torch import save_file

    from coreml_sd.checkpoint.safeload import load_tensor_file
    from coreml_sd.controlnet_source import open_controlnet_model
    from coreml_sd.errors import ModelError

    state = dict(load_tensor_file(files["net"])[0]["state_dict"])
    state["difference"] = torch.tensor([1.0])
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "control_sd15_canny_diff.safetensors"))
    with pytest.raises(ModelError, match="'difference' ControlNet"):
        open_controlnet_model(tmp_path / "control_sd15_canny_diff.safetensors")


def test_full_size_diffusers_named_controlnets_are_named_by_their_family():
    from diffusers import ControlNetModel, UNet2DConditionModel

    from coreml_sd.checkpoint import detect
    from coreml_sd.checkpoint.config import shipped_config
    from coreml_sd.checkpoint.controlnet_keymap import DIFFUSERS, config_from_unet
    from coreml_sd.checkpoint.safeload import TensorInfo

    for family in ("sd1", "sdxl"):
        unet_config = dict(shipped_config(family).unet)
        with torch.device("meta"):
            net = ControlNetModel.from_unet(UNet2DConditionModel(**unet_config))
        shapes = {k: TensorInfo("F16", tuple(t.shape)) for k, t in net.state_dict().items()}
        det = detect.classify(shapes)
        assert (det.kind, det.family, det.layout) == ("controlnet", family, DIFFUSERS)
        config = config_from_unet(unet_config, shapes, DIFFUSERS)
        assert config["conditioning_embedding_out_channels"] == [16, 32, 96, 256]
        assert config["block_out_channels"] == unet_config["block_out_channels"]


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_original_names_are_the_ones_diffusers_single_file_reader_reads(family):
    """Our diffusers -> control_model.* names, fed to diffusers' own convert_controlnet_checkpoint (full
    size, meta tensors), come back under the diffusers names they were made from, every one."""
    from diffusers import ControlNetModel, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    from coreml_sd.checkpoint.config import shipped_config
    from coreml_sd.checkpoint.controlnet_keymap import controlnet_to_original

    with torch.device("meta"):
        net = ControlNetModel.from_unet(UNet2DConditionModel(**dict(shipped_config(family).unet)))
    mapper = controlnet_to_original(dict(net.config))
    original = {mapper(k, None)[0][0]: k for k in net.state_dict()}
    tokens = {name: torch.zeros(1) for name in original}  # distinct objects: which file key went where
    converted = convert_controlnet_checkpoint(tokens, dict(net.config))
    by_id = {id(t): name for name, t in tokens.items()}
    assert {k: by_id[id(v)] for k, v in converted.items()} == {k: o for o, k in original.items()}
