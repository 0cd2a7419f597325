"""Detection from key names and shapes; clear refusals for files that are not SD 1.x/2.x models."""

from __future__ import annotations

import hashlib
import json

import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")

from helpers_checkpoint import (  # noqa: E402
    build_tiny_sd2_modules,
    full_size_shapes,
    save_safetensors,
    write_tiny_checkpoint,
)

from coreml_sd.checkpoint import detect, keymap  # noqa: E402
from coreml_sd.checkpoint.safeload import TensorInfo  # noqa: E402
from coreml_sd.cli import main  # noqa: E402
from coreml_sd.errors import ModelError  # noqa: E402
from coreml_sd.sources import open_model  # noqa: E402


@pytest.fixture(scope="module")
def sd1_shapes():
    return full_size_shapes("sd1")


def test_full_size_sd1_and_sd2_are_recognised(sd1_shapes):
    sd1 = detect.classify(sd1_shapes)
    facts = (sd1.kind, sd1.family, sd1.text_encoder, sd1.context_dim, sd1.in_channels)
    assert facts == ("model", "sd1", "clip", 768, 4)
    assert sd1.standard and sd1.has_vae and sd1.has_text_encoder and not sd1.has_ema
    assert 855e6 < sd1.params["unet"] < 865e6 and 120e6 < sd1.params["text_encoder"] < 125e6  # SD 1.5's counts
    sd2 = detect.classify(full_size_shapes("sd2"))
    assert (sd2.family, sd2.text_encoder, sd2.context_dim) == ("sd2", "openclip", 1024)
    detect.require_model(sd1, "sd1.safetensors")
    detect.require_model(sd2, "sd2.safetensors")


def test_a_9_channel_unet_is_the_inpainting_variant(sd1_shapes):
    inpaint = {**sd1_shapes, keymap.UNET_PREFIX + "input_blocks.0.0.weight": TensorInfo("F16", (320, 9, 3, 3))}
    det = detect.classify(inpaint)
    assert (det.family, det.in_channels, det.standard) == ("sd1-inpainting", 9, True)
    detect.require_model(det, "sd-v1-5-inpainting.safetensors")


def test_ema_and_missing_parts_are_seen(sd1_shapes):
    with_ema = dict(sd1_shapes)
    for key, info in list(sd1_shapes.items()):
        if key.startswith(keymap.UNET_PREFIX):
            with_ema[keymap.ema_key(key)] = info
    assert detect.classify(with_ema).has_ema
    no_vae = {k: v for k, v in sd1_shapes.items() if not k.startswith(keymap.VAE_PREFIX)}
    det = detect.classify(no_vae)
    assert det.kind == "model" and not det.has_vae


@pytest.mark.parametrize("change, needle", [
    (lambda s: {**s, keymap.UNET_PREFIX + "input_blocks.0.0.weight": TensorInfo("F16", (320, 8, 3, 3))},
     "instruct-pix2pix"),
    (lambda s: {**s, keymap.UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight":
                TensorInfo("F16", (320, 1024))}, "unknown Stable Diffusion variant"),
    (lambda s: {k: v for k, v in s.items() if k.startswith(keymap.VAE_PREFIX)}, "VAE"),
    (lambda s: {"foo.bar.weight": TensorInfo("F32", (3, 3)), "foo.bar.bias": TensorInfo("F32", (3,))},
     r"found 2 tensors: foo.bar.\* \(2\)"),
    (lambda s: {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": TensorInfo("F16", (4, 320))}, "LoRA"),
    (lambda s: {"emb_params": TensorInfo("F32", (2, 768))}, "embedding"),
])
def test_refusals_say_what_was_found(sd1_shapes, change, needle):
    with pytest.raises(ModelError, match=needle):
        detect.require_model(detect.classify(change(sd1_shapes)), "x.safetensors")


def test_file_of_an_unregistered_family_is_refused_everywhere(tmp_path):
    """Keys of no registered family's layout (here SD 3's MMDiT layout: joint blocks, three text
    encoders, a 16-channel VAE) are an unknown variant: refused by open, generate and inspect, with
    the families that are known."""
    path = save_safetensors({
        "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(4608, 1536),
        "model.diffusion_model.x_embedder.proj.weight": torch.zeros(1536, 16, 2, 2),
        "text_encoders.clip_l.transformer.text_model.embeddings.position_embedding.weight": torch.zeros(77, 768),
        "first_stage_model.decoder.conv_in.weight": torch.zeros(512, 16, 3, 3),
    }, tmp_path / "sd3_medium.safetensors")
    det = detect.classify(detect_shapes(path))
    assert det.kind == "model" and det.family is None
    with pytest.raises(ModelError, match="unknown Stable Diffusion variant .* supported families: sd1 .*sdxl"):
        open_model(path)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["generate", "a cat", "--model", str(path), "-o", str(out)])
    assert result.exit_code == 1 and "unknown Stable Diffusion variant" in result.output and not out.exists()
    report = json.loads(CliRunner().invoke(main, ["checkpoint", "inspect", "--json", str(path)]).output)
    assert report["family"] is None and report["supported"] is False


def detect_shapes(path):
    from coreml_sd.checkpoint.safeload import tensor_shapes

    return tensor_shapes(path)[0]


def test_vae_or_lora_passed_as_model(tmp_path):
    path, mods, _ = write_tiny_checkpoint(tmp_path / "tiny.safetensors")
    vae = keymap.apply_mapper(keymap.vae_to_original(mods["vae"].config, prefix=""), mods["vae"].state_dict())
    vae_file = save_safetensors(vae, tmp_path / "vae-ft-mse.safetensors")
    lora_file = save_safetensors({"lora_unet_conv_in.lora_down.weight": torch.zeros(4, 4, 3, 3),
                                  "lora_unet_conv_in.lora_up.weight": torch.zeros(32, 4, 1, 1)},
                                 tmp_path / "l.safetensors")
    for bad, needle in ((vae_file, "is a VAE, not a Stable Diffusion model; pass it with --vae"),
                        (lora_file, "is a LoRA, not a Stable Diffusion model; pass it with --lora")):
        out = tmp_path / "out"
        result = CliRunner().invoke(main, ["generate", "a cat", "--model", str(bad), "-o", str(out)])
        assert result.exit_code == 1 and needle in result.output and not out.exists()
    # ...and the other way round: a full model given as --vae.
    result = CliRunner().invoke(main, ["generate", "a cat", "--model", str(path), "--vae", str(path), "-o",
                                       str(tmp_path / "out")])
    assert result.exit_code == 1 and "--vae expects a VAE file" in result.output


def test_non_standard_size_needs_its_config(tmp_path):
    path, _, _ = write_tiny_checkpoint(tmp_path / "tiny.safetensors", sidecar=False)
    with pytest.raises(ModelError, match=r"non-standard size \(cross-attention width 32\); pass its config"):
        open_model(path)


def test_config_family_must_match_the_file(tmp_path):
    path, mods, _ = write_tiny_checkpoint(tmp_path / "tiny2.safetensors", family="sd2", sidecar=False)
    from coreml_sd.checkpoint.writer import config_from_modules

    wrong = config_from_modules(*build_tiny_sd2_modules(0), family="sd1").to_dict()
    with pytest.raises(ModelError, match="is sd2 .*config says sd1"):
        open_model(path, config=wrong)


@pytest.mark.parametrize("bias, expected", [(-2.0, True), (0.5, False)])
def test_v_prediction_probe(bias, expected):
    """An SD 2.x UNet that returns about -x at t=999 predicts velocity; one that returns about x, noise."""
    _, unet, _ = build_tiny_sd2_modules(0)
    with torch.no_grad():
        unet.conv_out.weight.zero_()
        unet.conv_out.bias.fill_(bias)
    assert detect.probe_v_prediction(unet) is expected


def test_inspect_reports_the_facts(tmp_path):
    path, _, _ = write_tiny_checkpoint(tmp_path / "tiny.safetensors", dtype="fp16", ema=True,
                                       prediction_type="v_prediction")
    result = CliRunner().invoke(main, ["checkpoint", "inspect", "--json", str(path)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (report["kind"], report["family"], report["dtype"], report["prediction_type"]) == \
        ("model", "sd1", "fp16", "v_prediction")
    assert report["has_ema"] and report["has_vae"] and report["has_text_encoder"] and report["supported"]
    assert report["parameters"]["unet"] == report["parameters"]["ema"] > 0
    text = CliRunner().invoke(main, ["checkpoint", "inspect", str(path)]).output
    assert "family: sd1" in text and "has ema: True" in text
