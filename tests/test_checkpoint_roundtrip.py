"""Original-layout single files written from diffusers modules load back tensor for tensor."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from helpers_checkpoint import write_tiny_checkpoint  # noqa: E402

from coreml_sd.checkpoint import keymap  # noqa: E402
from coreml_sd.checkpoint.config import CheckpointConfig, sidecar_path  # noqa: E402
from coreml_sd.checkpoint.loader import read_original  # noqa: E402
from coreml_sd.checkpoint.safeload import read_safetensors_header  # noqa: E402
from coreml_sd.errors import ModelError  # noqa: E402


def assert_same_tensors(expected, got, dtype):
    a, b = expected.state_dict(), got.state_dict()
    assert set(a) == set(b)
    for key in a:
        assert b[key].dtype == (dtype if a[key].is_floating_point() else a[key].dtype), key
        # fp16 files hold the fp16 rounding of the weights: compare with exactly that rounding.
        assert torch.equal(a[key].to(b[key].dtype), b[key]), key


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_every_tensor_round_trips(tmp_path, fmt, dtype):
    path, mods, ema_unet = write_tiny_checkpoint(tmp_path / f"tiny.{fmt}", dtype=dtype, fmt=fmt, ema=True, ema_seed=7)
    config = CheckpointConfig.from_json(sidecar_path(path))
    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
    loaded = read_original(path, config)
    for name in ("text_encoder", "unet", "vae"):
        assert_same_tensors(mods[name], loaded[name], torch_dtype)
    ema = read_original(path, config, ema=True)
    assert_same_tensors(ema_unet, ema["unet"], torch_dtype)
    assert not torch.equal(ema["unet"].conv_in.weight, loaded["unet"].conv_in.weight)


def test_file_uses_original_key_layout(tmp_path):
    path, _, _ = write_tiny_checkpoint(tmp_path / "tiny.safetensors", ema=True)
    keys = set(read_safetensors_header(path)[0])
    for key in ("model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.middle_block.1.proj_in.weight",
                "model.diffusion_model.output_blocks.1.1.conv.weight", "model.diffusion_model.out.2.bias",
                "first_stage_model.decoder.up.0.block.0.conv1.weight", "first_stage_model.encoder.mid.attn_1.q.weight",
                "cond_stage_model.transformer.text_model.final_layer_norm.weight",
                "model_ema.diffusion_modelinput_blocks00weight", "model_ema.decay"):
        assert key in keys, key
    assert not any(k.startswith(("unet.", "down_blocks.", "text_model.")) for k in keys)


def test_sd2_openclip_round_trip_drops_the_unused_last_layer(tmp_path):
    path, mods, _ = write_tiny_checkpoint(tmp_path / "tiny2.safetensors", family="sd2")
    keys = set(read_safetensors_header(path)[0])
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    config = CheckpointConfig.from_json(sidecar_path(path))
    loaded = read_original(path, config)
    for name in ("text_encoder", "unet", "vae"):
        assert_same_tensors(mods[name], loaded[name], torch.float32)
    # A real SD 2.x file holds one more OpenCLIP layer than is used (penultimate-layer conditioning):
    # a config with one layer fewer loads the first layers and ignores the last.
    fewer = CheckpointConfig.from_dict({**config.to_dict(),
                                        "text_encoder": {**config.text_encoder, "num_hidden_layers": 1}})
    short = read_original(path, fewer)["text_encoder"]
    assert len(short.encoder.layers) == 1
    first = mods["text_encoder"].encoder.layers[0]
    assert torch.equal(short.encoder.layers[0].self_attn.q_proj.weight, first.self_attn.q_proj.weight)
    assert torch.equal(short.final_layer_norm.weight, mods["text_encoder"].final_layer_norm.weight)


def test_modules_compute_the_same(tmp_path):
    path, mods, _ = write_tiny_checkpoint(tmp_path / "tiny.safetensors")
    loaded = read_original(path, CheckpointConfig.from_json(sidecar_path(path)))
    # Loading is exact: every tensor comes back bit for bit.
    for name in ("text_encoder", "unet", "vae"):
        want, got = mods[name].state_dict(), loaded[name].state_dict()
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), name
    # The modules then compute the same function. Two separately built modules may take other
    # kernels (memory layout, alignment), so outputs agree to float32 rounding, not bit for bit.
    ids = torch.tensor([[49406, 320, 1125, 49407] + [49407] * 73])
    ctx = mods["text_encoder"](ids).last_hidden_state
    close = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded["text_encoder"](ids).last_hidden_state, ctx, **close)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded["unet"](x, 500, encoder_hidden_states=ctx).sample,
                               mods["unet"](x, 500, encoder_hidden_states=ctx).sample, **close)
    torch.testing.assert_close(loaded["vae"].decode(x).sample, mods["vae"].decode(x).sample, **close)


def test_stray_and_missing_keys_are_named(tmp_path):
    from helpers_checkpoint import save_safetensors
    from safetensors.torch import load_file

    path, _, _ = write_tiny_checkpoint(tmp_path / "tiny.safetensors")
    config = CheckpointConfig.from_json(sidecar_path(path))
    sd = load_file(str(path))
    stray = dict(sd, **{"model.diffusion_model.input_blocks.1.1.bogus.weight": torch.zeros(2)})
    save_safetensors(stray, tmp_path / "stray.safetensors")
    with pytest.raises(ModelError, match="bogus"):
        read_original(tmp_path / "stray.safetensors", config)
    missing = {k: v for k, v in sd.items() if k != "model.diffusion_model.out.2.bias"}
    save_safetensors(missing, tmp_path / "missing.safetensors")
    with pytest.raises(ModelError, match=r"missing 1 .*conv_out\.bias"):
        read_original(tmp_path / "missing.safetensors", config)


def test_wrong_config_names_the_shape_mismatch(tmp_path):
    path, _, _ = write_tiny_checkpoint(tmp_path / "tiny.safetensors")
    config = CheckpointConfig.from_json(sidecar_path(path))
    wrong = CheckpointConfig.from_dict({**config.to_dict(), "unet": {**config.unet, "cross_attention_dim": 48}})
    with pytest.raises(ModelError, match=r"another shape .*file \(32, 32\), model \(32, 48\)"):
        read_original(path, wrong)


def test_unet_mapper_matches_diffusers_reader_on_shipped_configs():
    """The writer's key table and diffusers' converter agree on full-size SD1 and SD2 layouts."""
    from coreml_sd.checkpoint.config import shipped_config
    from coreml_sd.checkpoint.loader import new_unet

    for name in ("sd1", "sd2"):
        cfg = shipped_config(name)
        state = new_unet(cfg.unet).state_dict()
        original = keymap.apply_mapper(keymap.unet_to_original(cfg.unet), state)
        back = keymap.unet_from_original(original, cfg.unet)
        assert set(back) == set(state), name
