"""SDXL LoRA (kohya: lora_unet_ in the original UNet's names, lora_te1_, lora_te2_) and SDXL embeddings
(clip_l / clip_g), each equal to what diffusers does with the same file."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import tiny_sdxl as T  # noqa: E402
from helpers_checkpoint import kohya_lora, save_safetensors  # noqa: E402

from coreml_sd.checkpoint.lora import merge_lora  # noqa: E402
from coreml_sd.errors import ModelError  # noqa: E402
from coreml_sd.pipeline import Pipeline  # noqa: E402
from coreml_sd.sources import open_model  # noqa: E402

ENCODERS = ("text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl-lora")
    mods = T.build_tiny_sdxl(0)
    return {"mods": mods, "file": T.write_single_file(mods, root / "base.safetensors", family="sdxl"), "root": root}


def sdxl_lora(mods, *, naming="original", alpha=2.0, seed=1):
    return kohya_lora({"lora_te1_": mods["text_encoder"], "lora_te2_": mods["text_encoder_2"]}, mods["unet"],
                      naming=naming, alpha=alpha, seed=seed)


def diffusers_fused(mods, lora: dict, strength: float) -> dict:
    pytest.importorskip("peft")
    pipe = T.diffusers_pipeline({k: copy.deepcopy(v) for k, v in mods.items()})
    pipe.load_lora_weights({k: v.clone() for k, v in lora.items()})
    pipe.fuse_lora(lora_scale=strength)
    pipe.unload_lora_weights()  # keeps the fused weights, removes the adapter layers
    return {name: getattr(pipe, name) for name in (*ENCODERS, "unet")}


def max_diff(a, b) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)


@pytest.mark.parametrize("naming, strength, alpha", [("original", 0.7, 2.0), ("diffusers", 1.0, None)])
def test_sdxl_lora_merge_equals_diffusers_fuse_lora(xl, tmp_path, naming, strength, alpha):
    """Both text encoders and the UNet (attention linears, LoCon on resnets and projections)."""
    lora = sdxl_lora(xl["mods"], naming=naming, alpha=alpha)
    path = save_safetensors(lora, tmp_path / "xl-style.safetensors")
    ours = {k: copy.deepcopy(xl["mods"][k]) for k in (*ENCODERS, "unet")}
    report = merge_lora({"lora_te1_": ours["text_encoder"], "lora_te2_": ours["text_encoder_2"]}, ours["unet"],
                        path, strength)
    layers = {k.rsplit(".", 2)[0] for k in lora if "lora_down" in k}
    assert report.unmatched == [] and report.matched == len(layers)
    assert any(k.startswith("lora_te2_") for k in layers) and any("input_blocks" in k or "down_blocks" in k
                                                                   for k in layers)
    reference = diffusers_fused(xl["mods"], lora, strength)
    for name in (*ENCODERS, "unet"):
        assert max_diff(ours[name], xl["mods"][name]) > 1e-3, name  # the LoRA changed it
        assert max_diff(ours[name], reference[name]) <= 1e-5, name


def test_sdxl_lora_through_the_pipeline(xl, tmp_path):
    lora = sdxl_lora(xl["mods"], seed=4)
    path = save_safetensors(lora, tmp_path / "detail.safetensors")
    source = open_model(xl["file"], loras=[(path, 0.5)])
    mods = source.torch_modules(device="cpu", dtype=torch.float32)
    reference = diffusers_fused(xl["mods"], lora, 0.5)
    for name in (*ENCODERS, "unet"):
        assert max_diff(getattr(mods, name), reference[name]) <= 1e-5, name
    assert source.generation_extras["Lora hashes"].startswith("detail: ")


def test_lora_of_the_other_family_is_refused(xl, tmp_path):
    from tiny_models import build_tiny_modules

    sd1 = build_tiny_modules(0)
    sd1_lora = save_safetensors(kohya_lora(sd1[0], sd1[1]), tmp_path / "sd1.safetensors")
    with pytest.raises(ModelError, match=r"SD 1.x/2.x LoRA .* lora_te1_\*, lora_te2_\*"):
        open_model(xl["file"], loras=[sd1_lora]).torch_modules(device="cpu", dtype=torch.float32)
    xl_lora = save_safetensors(sdxl_lora(xl["mods"]), tmp_path / "xl.safetensors")
    with pytest.raises(ModelError, match="an SDXL LoRA"):
        merge_lora(copy.deepcopy(sd1[0]), copy.deepcopy(sd1[1]), xl_lora, 1.0)


def sdxl_embedding(path, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    vecs = {"clip_l": torch.randn(n, T.TEXT_CONFIG_1["hidden_size"], generator=g),
            "clip_g": torch.randn(n, T.TEXT_CONFIG_2["hidden_size"], generator=g)}
    return save_safetensors(vecs, path), vecs


def test_sdxl_embedding_equals_diffusers_textual_inversion(xl):
    """clip_l into the first encoder, clip_g into the second (diffusers' documented way for SDXL files)."""
    path, vecs = sdxl_embedding(xl["root"] / "shinystyle.safetensors")
    prompt = "a photo of a cat, shinystyle"
    ours = Pipeline.load(xl["file"], backend="torch", device="cpu", precision="fp32", embeddings=[path])
    got = ours(prompt, seed=7, steps=5, guidance_scale=5.0, sampler="euler")[0]
    pipe = T.diffusers_pipeline({k: copy.deepcopy(v) for k, v in xl["mods"].items()})
    pipe.load_textual_inversion(vecs["clip_l"], token="shinystyle", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(vecs["clip_g"], token="shinystyle", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(prompt, generator=torch.Generator().manual_seed(7), num_inference_steps=5, guidance_scale=5.0,
                    height=16, width=16, output_type="latent").images.numpy()
    tol = 64 * 2.0**-23 * float(np.abs(expected).max())
    assert np.abs(got.latents - expected).max() <= tol
    plain = Pipeline.load(xl["file"], backend="torch", device="cpu", precision="fp32")(
        prompt, seed=7, steps=5, guidance_scale=5.0, sampler="euler")[0]
    assert np.abs(plain.latents - expected).max() > 100 * tol  # the trigger word did something
    assert got.params.extras["TI hashes"].startswith("shinystyle: ")


def test_embedding_kinds_must_fit_the_family(xl, tiny_diffusers_dir):
    path, _ = sdxl_embedding(xl["root"] / "xlstyle.safetensors", n=1)
    with pytest.raises(ModelError, match="SDXL embedding"):
        open_model(tiny_diffusers_dir, embeddings=[path])
    sd1 = save_safetensors({"emb_params": torch.randn(1, 768)}, xl["root"] / "sd1style.safetensors")
    with pytest.raises(ModelError, match=r"768 wide \(SD 1.x\).* clip_l vectors of an SDXL embedding"):
        open_model(xl["file"], embeddings=[sd1])
    uneven = save_safetensors({"clip_l": torch.randn(1, 32), "clip_g": torch.randn(2, 48)},
                              xl["root"] / "uneven.safetensors")
    with pytest.raises(ModelError, match="differ in number"):
        open_model(xl["file"], embeddings=[uneven])
