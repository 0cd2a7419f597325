"""LoRA merge: equal to diffusers' load_lora_weights + fuse_lora on the same tiny model and LoRA."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

from helpers_checkpoint import build_tiny_sd2_modules, kohya_lora, save_safetensors  # noqa: E402
from tiny_models import CLIP_FILES, build_tiny_modules  # noqa: E402

from coreml_sd.checkpoint.lora import merge_lora  # noqa: E402
from coreml_sd.errors import ModelError  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_modules(0)


def diffusers_fused(mods, lora: dict, strength: float):
    """Fuse `lora` into copies of the modules with diffusers (peft) — the reference."""
    pytest.importorskip("peft")
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    text_encoder, unet, vae = (copy.deepcopy(m) for m in mods)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, unet=unet, scheduler=PNDMScheduler(),
        tokenizer=CLIPTokenizer(str(CLIP_FILES / "vocab.json"), str(CLIP_FILES / "merges.txt")),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights({k: v.clone() for k, v in lora.items()})
    pipe.fuse_lora(lora_scale=strength)
    pipe.unload_lora_weights()  # keeps the fused weights, removes the adapter layers
    return pipe.text_encoder, pipe.unet


def max_diff(a, b) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)


@pytest.mark.parametrize("naming, strength, alpha", [("diffusers", 1.0, 2.0), ("original", 0.6, 8.0),
                                                     ("diffusers", -0.5, None)])
def test_merge_equals_diffusers_fuse_lora(tiny, tmp_path, naming, strength, alpha):
    lora = kohya_lora(tiny[0], tiny[1], naming=naming, alpha=alpha)
    path = save_safetensors(lora, tmp_path / "style.safetensors")
    text_encoder, unet = copy.deepcopy(tiny[0]), copy.deepcopy(tiny[1])
    report = merge_lora(text_encoder, unet, path, strength)
    assert report.unmatched == [] and report.matched == len({k.rsplit(".", 2)[0] for k in lora if "lora_down" in k})
    # diffusers maps original-UNet (input_blocks) names assuming SD's full-size layout, so its reference
    # reads the same tensors under the diffusers names (kohya_lora draws them in the same order).
    reference = kohya_lora(tiny[0], tiny[1], naming="diffusers", alpha=alpha)
    assert all(torch.equal(a, b) for a, b in zip(reference.values(), lora.values(), strict=True))
    ref_text, ref_unet = diffusers_fused(tiny, reference, strength)
    assert max_diff(text_encoder, ref_text) <= 1e-5
    assert max_diff(unet, ref_unet) <= 1e-5
    # ...and the LoRA really changed the weights, LoCon 3x3 convolutions included.
    assert max_diff(unet, tiny[1]) > 1e-3 and max_diff(text_encoder, tiny[0]) > 1e-3
    conv = unet.down_blocks[0].resnets[0].conv1.weight
    assert conv.shape[-1] == 3 and not torch.equal(conv, tiny[1].down_blocks[0].resnets[0].conv1.weight)


def test_merge_by_hand_for_one_layer(tiny, tmp_path):
    """W' = W + strength * alpha/rank * up @ down, checked directly on one linear and one 3x3 conv."""
    lora = kohya_lora(tiny[0], tiny[1], alpha=2.0, rank=4)
    path = save_safetensors(lora, tmp_path / "l.safetensors")
    text_encoder, unet = copy.deepcopy(tiny[0]), copy.deepcopy(tiny[1])
    merge_lora(text_encoder, unet, path, 0.8)
    base = "lora_te_text_model_encoder_layers_1_mlp_fc2"
    expected = tiny[0].encoder.layers[1].mlp.fc2.weight + 0.8 * 0.5 * (
        lora[base + ".lora_up.weight"] @ lora[base + ".lora_down.weight"])
    assert torch.allclose(text_encoder.encoder.layers[1].mlp.fc2.weight, expected, atol=1e-6)
    base = "lora_unet_up_blocks_1_resnets_0_conv2"
    down, up = lora[base + ".lora_down.weight"], lora[base + ".lora_up.weight"]
    delta = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
    assert torch.allclose(unet.up_blocks[1].resnets[0].conv2.weight,
                          tiny[1].up_blocks[1].resnets[0].conv2.weight + 0.8 * 0.5 * delta, atol=1e-6)


def test_unmatched_keys_are_reported(tiny, tmp_path, caplog):
    lora = kohya_lora(tiny[0], tiny[1], convs=False)
    lora["lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight"] = torch.zeros(4, 32)
    lora["lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight"] = torch.zeros(32, 4)
    path = save_safetensors(lora, tmp_path / "extra.safetensors")
    report = merge_lora(copy.deepcopy(tiny[0]), copy.deepcopy(tiny[1]), path, 1.0)
    assert report.unmatched == ["lora_unet_down_blocks_7_attentions_0_proj_in"]
    assert "down_blocks_7" in caplog.text


def test_lora_for_another_family_is_refused(tiny, tmp_path):
    # A LoRA made on an SD 2.x-shaped model: linear proj_in where SD 1.x has a 1x1 conv, other head sizes.
    sd2 = build_tiny_sd2_modules(0)
    wider = kohya_lora(sd2[0], sd2[1])
    wider = {k: (torch.zeros(v.shape[0], 48) if k.endswith("attn2_to_k.lora_down.weight") else v)
             for k, v in wider.items()}
    path = save_safetensors(wider, tmp_path / "sd2.safetensors")
    text_encoder, unet = copy.deepcopy(tiny[0]), copy.deepcopy(tiny[1])
    with pytest.raises(ModelError, match="made for another model"):
        merge_lora(text_encoder, unet, path, 1.0)
    assert max_diff(unet, tiny[1]) == 0 and max_diff(text_encoder, tiny[0]) == 0  # nothing half-merged
    xl = save_safetensors({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 32),
                           "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(64, 4)},
                          tmp_path / "xl.safetensors")
    with pytest.raises(ModelError, match="SDXL LoRA"):
        merge_lora(text_encoder, unet, xl, 1.0)
    nothing = save_safetensors({"lora_unet_label_emb_0_0.lora_down.weight": torch.zeros(4, 32),
                                "lora_unet_label_emb_0_0.lora_up.weight": torch.zeros(32, 4)},
                               tmp_path / "nothing.safetensors")
    with pytest.raises(ModelError, match="none of its 1 layers matches"):
        merge_lora(text_encoder, unet, nothing, 1.0)


@pytest.mark.parametrize("key, kind", [("x.hada_w1_a", "LoHa"), ("x.lora_mid.weight", "lora_mid")])
def test_unsupported_lycoris_kinds_are_named(tiny, tmp_path, key, kind):
    path = save_safetensors({key: torch.zeros(2, 2), "x.lora_down.weight": torch.zeros(2, 2)},
                            tmp_path / "ly.safetensors")
    with pytest.raises(ModelError, match=kind):
        merge_lora(copy.deepcopy(tiny[0]), copy.deepcopy(tiny[1]), path, 1.0)
