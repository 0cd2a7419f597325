"""Single-file sources through open_model / Pipeline / the CLI, with VAE, LoRA, embedding, hypernetwork."""

from __future__ import annotations

import hashlib

import click
import numpy as np
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")

from helpers_checkpoint import kohya_lora, save_safetensors, write_tiny_checkpoint  # noqa: E402
from tiny_models import build_tiny_modules  # noqa: E402

from coreml_sd.checkpoint import keymap  # noqa: E402
from coreml_sd.checkpoint.config import sidecar_path  # noqa: E402
from coreml_sd.cli import main  # noqa: E402
from coreml_sd.cli_checkpoint import PREDICTION_TYPES, parse_weighted  # noqa: E402
from coreml_sd.config import PREDICTION_TYPES as CONFIG_PREDICTION_TYPES  # noqa: E402
from coreml_sd.errors import ModelError  # noqa: E402
from coreml_sd.sources import open_model  # noqa: E402

GEN = dict(seed=3, steps=3, width=32, height=32)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny model of `tiny_diffusers_dir` (seed 0) as fp32 .safetensors and .ckpt files."""
    base = tmp_path_factory.mktemp("ckpt")
    st, mods, _ = write_tiny_checkpoint(base / "tiny.safetensors", ema=True, ema_seed=5)
    ck, _, _ = write_tiny_checkpoint(base / "tiny-pickle.ckpt", fmt="ckpt")
    return {"safetensors": st, "ckpt": ck, "mods": mods}


def test_info_names_and_hashes_the_file(files):
    source = open_model(files["safetensors"])
    info = source.info
    assert (info.name, info.kind, info.family, info.prediction_type) == ("tiny", "checkpoint", "sd1", "epsilon")
    assert info.hash == hashlib.sha256(files["safetensors"].read_bytes()).hexdigest()[:10]
    assert info.sample_size == 16 and info.text_hidden_size == 32 and info.pad_token == "<|endoftext|>"


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_images_from_the_file_equal_images_from_the_diffusers_folder(files, tiny_diffusers_dir, fmt):
    from coreml_sd import Pipeline

    from_folder = Pipeline.load(tiny_diffusers_dir, backend="torch", device="cpu", precision="fp32")
    from_file = Pipeline.load(files[fmt], backend="torch", device="cpu", precision="fp32")
    a, b = from_folder("a red fox", **GEN)[0], from_file("a red fox", **GEN)[0]
    assert np.array_equal(a.latents, b.latents)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert b.params.model == files[fmt].stem and b.params.model_hash == from_file.info.hash


def test_ema_weights_on_request(files):
    plain = open_model(files["safetensors"]).torch_modules(device="cpu", dtype=torch.float32).unet
    ema = open_model(files["safetensors"], ema=True).torch_modules(device="cpu", dtype=torch.float32).unet
    assert torch.equal(plain.conv_in.weight, files["mods"]["unet"].conv_in.weight)
    assert torch.equal(ema.conv_in.weight, build_tiny_modules(5)[1].conv_in.weight)
    with pytest.raises(ModelError, match="no EMA weights"):
        open_model(files["ckpt"], ema=True)


def test_fp16_file_loads_in_its_dtype_or_upcast(tmp_path):
    path, mods, _ = write_tiny_checkpoint(tmp_path / "half.safetensors", dtype="fp16")
    source = open_model(path)
    half = source.torch_modules(device="cpu", dtype=torch.float16).unet
    full = source.torch_modules(device="cpu", dtype=torch.float32).unet
    assert half.conv_in.weight.dtype == torch.float16 and full.conv_in.weight.dtype == torch.float32
    assert torch.equal(full.conv_in.weight, mods["unet"].conv_in.weight.half().float())


def vae_files(tmp_path, seed=9):
    """Another VAE in three layouts: original single file, diffusers file, diffusers folder."""
    vae = build_tiny_modules(seed)[2]
    original = keymap.apply_mapper(keymap.vae_to_original(vae.config, prefix=""), vae.state_dict())
    vae.save_pretrained(tmp_path / "vae-folder")
    return vae, {
        "original": save_safetensors(original, tmp_path / "other.vae.safetensors"),
        "diffusers": save_safetensors(vae.state_dict(), tmp_path / "diffusion_pytorch_model.safetensors"),
        "folder": tmp_path / "vae-folder",
    }


@pytest.mark.parametrize("layout", ["original", "diffusers", "folder"])
def test_vae_replacement(files, tiny_diffusers_dir, tmp_path, layout):
    other, paths = vae_files(tmp_path)
    for model in (files["safetensors"], tiny_diffusers_dir):
        source = open_model(model, vae=paths[layout])
        vae = source.torch_modules(device="cpu", dtype=torch.float32).vae
        pairs = zip(vae.state_dict().values(), other.state_dict().values(), strict=True)
        assert all(torch.equal(x, y) for x, y in pairs)
        assert source.generation_extras["VAE hash"] == hashlib.sha256(
            (paths[layout] / "diffusion_pytorch_model.safetensors" if layout == "folder" else paths[layout])
            .read_bytes()).hexdigest()[:10]


def test_checkpoint_without_vae_needs_one(files, tmp_path):
    from safetensors.torch import load_file

    sd = {k: v for k, v in load_file(str(files["safetensors"])).items() if not k.startswith(keymap.VAE_PREFIX)}
    path = save_safetensors(sd, tmp_path / "novae.safetensors")
    sidecar_path(path).write_text(sidecar_path(files["safetensors"]).read_text())
    with pytest.raises(ModelError, match="no VAE inside.*--vae"):
        open_model(path)
    other, paths = vae_files(tmp_path)
    vae = open_model(path, vae=paths["original"]).torch_modules(device="cpu", dtype=torch.float32).vae
    assert torch.equal(vae.decoder.conv_out.weight, other.decoder.conv_out.weight)


def test_prediction_type_override(files, tiny_diffusers_dir):
    assert open_model(files["safetensors"], prediction_type="v_prediction").info.prediction_type == "v_prediction"
    assert open_model(tiny_diffusers_dir, prediction_type="v_prediction").info.prediction_type == "v_prediction"
    with pytest.raises(ModelError, match="not one of epsilon, v_prediction"):
        open_model(files["safetensors"], prediction_type="sample")
    assert PREDICTION_TYPES == CONFIG_PREDICTION_TYPES


def test_modifiers_work_on_a_diffusers_folder_like_on_the_file(files, tiny_diffusers_dir, tmp_path):
    mods = files["mods"]
    lora = save_safetensors(kohya_lora(mods["text_encoder"], mods["unet"]), tmp_path / "style.safetensors")
    a = open_model(files["safetensors"], loras=[(lora, 0.5)]).torch_modules(device="cpu", dtype=torch.float32)
    b = open_model(tiny_diffusers_dir, loras=[(lora, 0.5)]).torch_modules(device="cpu", dtype=torch.float32)
    for x, y in ((a.unet, b.unet), (a.text_encoder, b.text_encoder)):
        assert all(torch.equal(p, q) for p, q in zip(x.state_dict().values(), y.state_dict().values(), strict=True))
    conv1 = a.unet.down_blocks[0].resnets[0].conv1.weight
    assert not torch.equal(conv1, mods["unet"].down_blocks[0].resnets[0].conv1.weight)  # the LoRA did change it


def test_generate_cli_with_every_modifier(files, tmp_path):
    from helpers_checkpoint import write_a1111_pt, write_hypernetwork

    from coreml_sd.images import read_parameters

    mods = files["mods"]
    lora = save_safetensors(kohya_lora(mods["text_encoder"], mods["unet"]), tmp_path / "style.safetensors")
    emb = write_a1111_pt(tmp_path / "mytoken.pt", torch.randn(2, 32))
    hyper, _ = write_hypernetwork(tmp_path / "toon.pt")
    _, vaes = vae_files(tmp_path)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [
        "generate", "a mytoken fox", "--model", str(files["ckpt"]), "--lora", f"{lora}:0.7", "--embedding", str(emb),
        "--hypernetwork", f"{hyper}:0.5", "--vae", str(vaes["original"]), "--steps", "2", "-W", "32", "-H", "32",
        "--seed", "1", "--precision", "fp32", "--device", "cpu", "--format", "png", "-q", "-o", str(out)])
    assert result.exit_code == 0, result.output
    (image,) = out.glob("*.png")
    text = read_parameters(image)
    for needle in ("Lora hashes: \"style: ", "TI hashes: \"mytoken: ", "Hypernet: toon", "Hypernet strength: 0.5",
                   "VAE: other.vae.safetensors", "Model: tiny-pickle"):
        assert needle in text, needle


def test_cli_refuses_a_lora_for_another_family_and_writes_nothing(files, tmp_path):
    base = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    wide = {base + ".lora_down.weight": torch.zeros(4, 1024), base + ".lora_up.weight": torch.zeros(32, 4)}
    lora = save_safetensors(wide, tmp_path / "sd2style.safetensors")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["generate", "a fox", "--model", str(files["safetensors"]), "--lora", str(lora),
                                       "--steps", "1", "-o", str(out)])
    assert result.exit_code == 1 and "SD 2.x" in result.output and "another model" in result.output
    assert not out.exists()


def test_to_safetensors_converts_a_pickle_once(files, tmp_path):
    from safetensors.torch import load_file

    from coreml_sd.checkpoint.safeload import flat_state_dict, load_pickle

    src = tmp_path / "copy.ckpt"
    src.write_bytes(files["ckpt"].read_bytes())
    result = CliRunner().invoke(main, ["checkpoint", "to-safetensors", str(src)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "copy.safetensors"
    converted, original = load_file(str(out)), flat_state_dict(load_pickle(src), src)
    assert set(converted) == set(original) and all(torch.equal(converted[k], original[k]) for k in original)
    again = CliRunner().invoke(main, ["checkpoint", "to-safetensors", str(src)])
    assert again.exit_code == 1 and "exists" in again.output
    target = tmp_path / "x.safetensors"
    already = CliRunner().invoke(main, ["checkpoint", "to-safetensors", str(out), "-o", str(target)])
    assert already.exit_code == 1 and "already a safetensors" in already.output and not target.exists()


def test_parse_weighted(tmp_path):
    plain = tmp_path / "a.safetensors"
    plain.write_bytes(b"x")
    colon = tmp_path / "c:odd.safetensors"  # a name with a colon, as a Windows drive path has one
    colon.write_bytes(b"x")
    assert parse_weighted(str(plain), "lora") == (plain, 1.0)
    assert parse_weighted(f"{plain}:0.75", "lora") == (plain, 0.75)
    assert parse_weighted(f"{plain}:-1", "lora") == (plain, -1.0)
    assert parse_weighted(str(colon), "lora") == (colon, 1.0)
    assert parse_weighted(f"{colon}:.5", "lora") == (colon, 0.5)
    for bad, needle in ((f"{plain}:strong", "is not a number"), (f"{plain}:inf", "finite"),
                        (str(tmp_path / "missing.safetensors:0.5"), "does not exist"),
                        (str(tmp_path / "missing.safetensors"), "does not exist")):
        with pytest.raises(click.BadParameter, match=needle):
            parse_weighted(bad, "lora")
    result = CliRunner().invoke(main, ["generate", "a fox", "--lora", f"{plain}:lots"])
    assert result.exit_code == 2 and "is not a number" in result.output
