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
