"""The benchmark scripts' bookkeeping, on tiny stand-ins for the full-size models: every timed call is
announced before it runs, emulated bf16 is skipped and said so, a busy machine is flagged."""

from __future__ import annotations

import sys

import pytest

torch = pytest.importorskip("torch")


def tiny_sd15_shaped_unet(seed: int = 0):
    """A UNet with SD 1.5's inputs (4 latent channels, 768-wide context) at a tiny width."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=64, block_out_channels=(8, 16), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=768,
                                attention_head_dim=4, norm_num_groups=4).eval().requires_grad_(False)


@pytest.mark.parametrize("native", [True, False])
def test_bench_torch_step_announces_each_round_and_skips_emulated_bf16(monkeypatch, capsys, native):
    from benchmarks import bench_torch_step as bench

    written = {}
    monkeypatch.setattr(bench, "sd15_unet", tiny_sd15_shaped_unet)
    monkeypatch.setattr(bench, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(bench, "resolve_precision", lambda p, d: "bf16" if native else "fp32")
    monkeypatch.setattr(bench, "write_result", lambda name, data: written.setdefault(name, data) and name)
    monkeypatch.setattr(sys, "argv", ["bench", "--rounds", "2", "--quality-steps", "0", "--mode", "off",
                                      "--image-steps", "0"])
    bench.main()
    lines = capsys.readouterr().out.splitlines()
    timed = [ln for ln in lines if ln.startswith("round ")]
    # Each announcement names the round and the work and is printed (flushed) before the time is known.
    assert all("timing one SD1.5 UNet step" in ln and ln.rstrip().endswith(" s") for ln in timed)
    result = written["torch_step_cpu"]
    assert result["native_bf16"] is native
    if native:
        assert "diffusers-bf16" in result["step_seconds"] and result["skipped"] == {}
        assert len(timed) == 2 * 3
    else:
        assert "diffusers-bf16" not in result["step_seconds"] and "emulated" in result["skipped"]["diffusers-bf16"]
        assert any(ln.startswith("skipping diffusers-bf16") for ln in lines) and len(timed) == 2 * 2
        assert set(result["ratios"]) == {"ours-eager (fp32)/diffusers-fp32"}


def test_busy_machine_is_flagged():
    from coreml_sd.bench.machine import busy_note

    assert busy_note([0.2, 0.3, 0.4], cores=2) is None
    assert busy_note(None, cores=2) is None
    note = busy_note([6.05, 3.0, 1.0], cores=2)
    assert "busy machine" in note and "6.05 on 2 cores" in note


def test_bench_torch_step_quality_loop_runs(monkeypatch, capsys):
    """The final-latent comparison (fp32 against the auto precision) runs on the current UNet contract."""
    from benchmarks import bench_torch_step as bench

    written = {}
    monkeypatch.setattr(bench, "sd15_unet", tiny_sd15_shaped_unet)
    monkeypatch.setattr(bench, "write_result", lambda name, data: written.setdefault(name, data) and name)
    monkeypatch.setattr(sys, "argv", ["bench", "--rounds", "1", "--quality-steps", "2", "--mode", "off",
                                      "--image-steps", "0"])
    bench.main()
    quality = written["torch_step_cpu"]["quality"]
    assert quality["steps"] == 2 and quality["final_latent_psnr_db_vs_fp32"]["ours-eager"] > 20
