"""`coreml-sd bench --model` on an SDXL model: ours (torch, mil) and diffusers' StableDiffusionXLPipeline,
every component measured, and the SDXL random model written for full-size benchmarks."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("jsonschema")

import tiny_sdxl as T  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from test_bench import FAST, validate  # noqa: E402

from coreml_sd.cli import main  # noqa: E402


@pytest.mark.slow  # converts the tiny SDXL model for mil (~30 s)
def test_bench_measures_every_component_of_an_sdxl_model(tmp_path):
    folder = T.save_folder(T.diffusers_pipeline(T.build_tiny_sdxl(0)), tmp_path / "tiny-xl")
    args = ["bench", "-m", str(folder), "--backends", "torch-cpu:fp32,diffusers,mil:fp32", *FAST, "--isolation",
            "inline", "--cache-dir", str(tmp_path / "cache"), "-o", str(tmp_path / "results"), "--name", "xl",
            "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    validate(report)
    runs = {r["label"]: r for r in report["runs"]}
    assert set(runs) == {"torch-cpu:fp32", "diffusers", "mil:fp32"}
    for label, run in runs.items():
        assert run["status"] == "ok", (label, run)
        for part in ("text_encoder", "unet_step", "vae_decoder"):
            assert run[part]["median_s"] > 0, (label, part)
    assert set(runs["diffusers"]["runs_on"]) == {"text_encoder", "text_encoder_2", "unet", "vae_decoder"}
    assert {"text_encoder", "text_encoder_2", "unet", "vae_decoder"} <= set(runs["mil:fp32"]["runs_on"])


def test_random_sdxl_model_is_an_sdxl_folder(tmp_path):
    """The full-size benchmark's model, here at tiny size: an SDXL diffusers folder written in fp16."""
    from coreml_sd.bench.models import write_random_model
    from coreml_sd.checkpoint.writer import config_from_modules
    from coreml_sd.config import SchedulerConfig
    from coreml_sd.sources import open_model

    mods = T.build_tiny_sdxl(0)
    cfg = config_from_modules(mods["text_encoder"], mods["unet"], mods["vae"], family="sdxl",
                              text_encoder_2=mods["text_encoder_2"],
                              scheduler=SchedulerConfig.from_dict(T.SDXL_SCHEDULER))
    folder = write_random_model(tmp_path / "rnd", config=cfg)
    source = open_model(folder)
    assert source.info.family == "sdxl"
    loaded = source.torch_modules(device="cpu", dtype=torch.float16)
    assert loaded.text_encoder_2.text_projection.weight.dtype == torch.float16
    assert loaded.unet.config.addition_embed_type == "text_time"


def tiny_sdxl_shaped_unet(seed: int = 0):
    """A UNet with SDXL's inputs (2048-wide context, text_time embedding of 1280 + 6 x 256) at a tiny width."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16, block_out_channels=(8, 16), layers_per_block=1, cross_attention_dim=2048,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
        norm_num_groups=4, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=1280 + 6 * 256).eval().requires_grad_(False)


def test_bench_sdxl_step_times_diffusers_and_ours_at_both_precisions(monkeypatch, capsys):
    """The step benchmark's phases on a tiny SDXL-shaped UNet: fp32 then bf16 on one module, each call
    announced before it runs, outputs compared with diffusers' fp32 (ours runs diffusers' module)."""
    import sys

    from benchmarks import bench_sdxl_step as bench

    written = {}
    monkeypatch.setattr(bench, "sdxl_unet", tiny_sdxl_shaped_unet)
    monkeypatch.setattr(bench, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(bench, "write_result", lambda name, data: written.setdefault(name, data) and name)
    monkeypatch.setattr(sys, "argv", ["bench", "--rounds", "2"])
    bench.main()
    lines = capsys.readouterr().out.splitlines()
    timed = [ln for ln in lines if ln.startswith("round ")]
    assert len(timed) == 2 * 4 and all("timing one SDXL UNet step" in ln and ln.endswith(" s") for ln in timed)
    result = written["sdxl_step_cpu"]
    assert set(result["step_seconds"]) == {"diffusers-fp32", "ours-fp32", "diffusers-bf16", "ours-bf16"}
    assert set(result["ratios"]) == {"ours/diffusers fp32", "ours/diffusers bf16", "ours bf16/ours fp32"}
    quality = result["psnr_db_vs_diffusers_fp32"]
    assert quality["ours-fp32"] >= 150  # the same module and arithmetic: equal but for kernel order
    assert 25 <= quality["ours-bf16"] < 150 and abs(quality["ours-bf16"] - quality["diffusers-bf16"]) < 3
    assert result["shape"]["encoder_hidden_states"] == [2, 77, 2048] and result["shape"]["time_ids"] == [2, 6]
