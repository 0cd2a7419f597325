"""`coreml-sd bench` on the tiny model: schema-valid JSON, table and chart, skipped backends with
their reason, the mil backend through the conversion cache, --compare ratios, option errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from coreml_sd.bench import report, targets
from coreml_sd.bench.stats import summarize
from coreml_sd.cli import main

jsonschema = pytest.importorskip("jsonschema")

SCHEMA = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "schema.json").read_text())
BACKENDS = "torch-cpu:fp32,diffusers,mil:fp32,coreml-ane,coreml-gpu,torch-cuda,torch-mps"
FAST = ["--steps", "2", "--warmup", "1", "--runs", "1", "--e2e-steps", "2", "--few-steps", "2", "--img2img-strength",
        "0.5", "--threads", "1"]


def validate(result: dict) -> None:
    jsonschema.Draft202012Validator(SCHEMA).validate(result)


@pytest.fixture(scope="module")
def bench_run(tiny_diffusers_dir, tmp_path_factory):
    """One harness run in this process: torch, diffusers and mil (converted once into the cache)."""
    out = tmp_path_factory.mktemp("bench")
    args = ["bench", "-m", str(tiny_diffusers_dir), "--backends", BACKENDS, *FAST, "--isolation", "inline",
            "--cache-dir", str(out / "cache"), "-o", str(out / "results"), "--name", "tiny", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), out


def by_label(result: dict) -> dict:
    return {r["label"]: r for r in result["runs"]}


def test_result_is_schema_valid_and_consistent(bench_run):
    result, _ = bench_run
    validate(result)
    assert [r["label"] for r in result["runs"]] == BACKENDS.split(",")
    for run in report.ok_runs(result):
        step = run["unet_step"]
        assert step["n"] == 2 and len(step["warmup_s"]) == 1
        assert step["min_s"] <= step["p10_s"] <= step["median_s"] <= step["p90_s"] <= step["max_s"]
        assert run["text_encoder"]["n"] == 1 and run["end_to_end"]["steps"] == 2
        # img2img from a picture at strength 0.5 runs half the steps (A1111's and diffusers' rule)
        img = run["img2img"]
        assert (img["steps"], img["strength"], img["unet_steps"]) == (2, 0.5, 1) and run["vae_encoder"]["n"] == 1
        assert img["vs_end_to_end"] == pytest.approx(img["seconds"] / run["end_to_end"]["seconds"])
        few = run["few_step"]  # prompt to image in LCM's 2 steps at guidance 1, beside the per-step figure
        assert (few["steps"], few["sampler"], few["guidance_scale"]) == (2, "lcm", 1.0)
        assert few["per_step_s"] == pytest.approx(few["seconds"] / 2)
        assert run["load"]["cold_s"] > 0 and run["load"]["warm_s"] > 0
        assert 0 < run["memory"]["peak_rss_gib"] < 64


def test_each_result_says_what_produced_it(bench_run, tiny_diffusers_dir):
    result, _ = bench_run
    import torch

    machine = result["machine"]
    assert machine["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert machine["os"] and machine["cpu"] and machine["accelerator"] and len(machine["load_average"]) == 3
    from coreml_sd.bench.machine import busy_note

    # A busy machine is flagged in the result (and the table) from the load before the run.
    assert result["busy"] == busy_note(result["load_average"]["before"])
    assert result["model"]["path"] == str(Path(tiny_diffusers_dir).resolve())
    runs = by_label(result)
    ours, base, mil = runs["torch-cpu:fp32"], runs["diffusers"], runs["mil:fp32"]
    assert ours["precision"] == "fp32" and ours["compression"] == "none"
    assert ours["runs_on"]["unet"] == "torch cpu fp32"
    assert "AttnProcessor" in ours["attention"]
    # diffusers' baseline: its own pipeline at its CPU default precision.
    assert base["status"] == "ok" and base["precision"] == "fp32" and base["runs_on"]["unet"].startswith("diffusers cpu")
    assert mil["status"] == "ok", mil["reason"]
    assert mil["runs_on"]["unet"].startswith("mil cpu") and mil["compression"] == "fp16"
    assert mil["attention"].startswith("original") and mil["precision"].startswith("fp32 compute")


def test_mil_packages_come_from_the_conversion_cache(bench_run, tiny_diffusers_dir):
    from coreml_sd.bench.models import BenchModel, ConvertOptions, converted_folder
    from coreml_sd.model_folder import Manifest

    result, out = bench_run
    conversion = by_label(result)["mil:fp32"]["conversion"]
    assert conversion["cached"] is False and conversion["attention"] == "original"
    folder = Path(conversion["path"])
    assert folder.parent == out / "cache" / "converted"
    assert Manifest.read(folder).attention == "original"
    # The same model and options again: the folder is reused, nothing is converted.
    model = BenchModel("tiny-sd", Path(tiny_diffusers_dir).resolve(), "tiny")
    again = converted_folder(model, ConvertOptions(attention="original", img2img=True), out / "cache")
    assert again.cached and again.path == folder
    assert Manifest.read(folder).has("vae_encoder")  # the img2img measurement asked for the VAE encoder


def test_unavailable_backends_are_skipped_with_the_reason(bench_run):
    import torch

    result, _ = bench_run
    runs = by_label(result)
    for label in ("coreml-ane", "coreml-gpu"):
        if sys.platform != "darwin":
            assert runs[label]["status"] == "skipped"
            assert "Core ML predicts only on macOS" in runs[label]["reason"]
    expected = {"torch-cuda": torch.cuda.is_available(), "torch-mps": torch.backends.mps.is_available()}
    for label, available in expected.items():
        if not available:
            assert runs[label]["status"] == "skipped"
            assert ("CUDA" if label == "torch-cuda" else "MPS") in runs[label]["reason"]
    for run in result["runs"]:
        if run["status"] == "skipped":  # never numbers for a backend that did not run
            assert not {"load", "unet_step", "text_encoder", "vae_decoder", "end_to_end"} & set(run)


def test_table_and_chart_are_written(bench_run):
    result, out = bench_run
    files = out / "results"
    assert json.loads((files / "tiny.json").read_text()) == result
    table = (files / "tiny.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| backend")]
    assert [row.split(" | ")[0][2:] for row in rows] == [r["label"] for r in result["runs"]]
    assert "**skipped**: " in table
    step = by_label(result)["torch-cpu:fp32"]["unet_step"]["median_s"]
    base = by_label(result)["diffusers"]["unet_step"]["median_s"]
    assert f"| {step / base:.2f} |" in rows[0]  # the x-diffusers column
    import matplotlib.image

    png = files / "tiny.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(png).shape
    assert width > 400 and height > 100


def _synthetic(step: dict[str, float], rss: float = 1.0) -> dict:
    """A minimal schema-valid result with the given UNet step medians per label."""
    def timing(x):
        return {"n": 3, "median_s": x, "p10_s": x * 0.9, "p90_s": x * 1.1, "iqr_s": x * 0.1, "min_s": x * 0.9,
                "max_s": x * 1.1, "warmup_s": [x * 2]}

    runs = []
    for label, x in step.items():
        backend, _, precision = label.partition(":")
        runs.append({
            "label": label, "backend": backend, "engine": targets.BACKENDS[backend].engine, "device": "cpu",
            "compute_units": None, "precision_requested": precision or "auto", "status": "ok", "reason": None,
            "precision": precision or "fp32", "attention": "sdpa", "compression": "none", "runs_on": {"unet": "x"},
            "model_path": "/m", "conversion": None, "isolation": "process",
            "load": {"cold_s": 10 * x, "warm_s": 5 * x, "cold_page_cache": "dropped"},
            "text_encoder": timing(x / 10), "unet_step": timing(x), "vae_decoder": timing(2 * x),
            "end_to_end": {"seconds": 30 * x, "steps": 4, "sampler": "euler_a", "width": 512, "height": 512},
            "memory": {"peak_rss_gib": rss, "peak_cuda_gib": None}, "load_average": {"before": None, "after": None},
            "seconds": 100 * x,
        })
    runs.append({"label": "coreml-ane", "backend": "coreml-ane", "engine": "coreml", "device": "ane",
                 "compute_units": "CPU_AND_NE", "precision_requested": "auto", "status": "skipped",
                 "reason": "Core ML runs only on macOS"})
    machine = {"os": "Linux", "machine": "x86_64", "cpu": "cpu", "cpu_count": 2, "memory_gib": 8.0,
               "accelerator": "none", "python": "3.11", "date": "2026-01-01", "load_average": [1.0, 1.0, 1.0]}
    settings = {"warmup": 1, "steps": 3, "runs": 3, "e2e_steps": 4, "width": None, "height": None, "prompt": "p",
                "guidance_scale": 7.5, "sampler": "euler_a", "torch_compile": None, "evict_cache": True,
                "attention": "auto", "weights": "fp16", "isolation": "process", "threads": None}
    return {"schema": "coreml-sd.bench", "schema_version": 1, "created": "2026-01-01T00:00:00+00:00",
            "command": "coreml-sd bench", "machine": machine, "settings": settings, "seconds": 1.0,
            "model": {"name": "m", "path": "/m", "description": "m", "random_weights": True},
            "load_average": {"before": [1.0, 1.0, 1.0], "after": [1.0, 1.0, 1.0]}, "runs": runs}


def test_compare_prints_b_over_a_per_backend_and_metric(tmp_path):
    a = _synthetic({"torch-cpu:fp32": 6.0, "torch-cpu:bf16": 4.0, "diffusers": 8.0}, rss=4.0)
    b = _synthetic({"torch-cpu:fp32": 3.0, "torch-cpu:bf16": 5.0, "mil": 2.0}, rss=2.0)
    for name, data in (("a", a), ("b", b)):
        validate(data)
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    runner = CliRunner()
    got = runner.invoke(main, ["bench", "--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--json"])
    assert got.exit_code == 0, got.output
    cmp = json.loads(got.stdout)
    ratios = {(r["label"], r["metric"]): r["ratio"] for r in cmp["rows"]}
    assert ratios[("torch-cpu:fp32", "unet_step.median_s")] == pytest.approx(0.5)
    assert ratios[("torch-cpu:bf16", "unet_step.median_s")] == pytest.approx(1.25)
    assert ratios[("torch-cpu:fp32", "vae_decoder.median_s")] == pytest.approx(0.5)
    assert ratios[("torch-cpu:bf16", "load.cold_s")] == pytest.approx(1.25)
    assert ratios[("torch-cpu:fp32", "memory.peak_rss_gib")] == pytest.approx(0.5)
    # these files timed no few-step generation, no VAE encoder and no img2img
    assert len(cmp["rows"]) == 2 * (len(report.METRICS) - 3)
    assert cmp["only_in_a"] == ["diffusers"] and cmp["only_in_b"] == ["mil"]
    text = runner.invoke(main, ["bench", "--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert text.exit_code == 0
    assert "| torch-cpu:fp32 | UNet step median | 6.00 s | 3.00 s | 0.500 |" in text.stdout
    assert "measured only in A: diffusers" in text.stdout


def test_compare_refuses_a_file_that_is_not_a_result(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"hello": 1}))
    got = CliRunner().invoke(main, ["bench", "--compare", str(tmp_path / "a.json"), str(tmp_path / "a.json")])
    assert got.exit_code == 1 and "not a coreml-sd benchmark result" in got.output


@pytest.mark.parametrize("args, expected", [
    (["--backends", "torch-gpu"], "valid backends: coreml-ane, coreml-gpu, coreml-cpu, coreml-all, mil, torch-cpu, "
                                  "torch-cuda, torch-mps, diffusers"),
    (["--backends", "torch-cpu:fp8"], "valid precisions: auto, fp32, fp16, bf16"),
    (["--backends", "coreml-ane:fp32"], "precision it was converted with"),
    (["--precision", "fp32,int4"], "valid precisions: auto, fp32, fp16, bf16"),
    (["--size", "500x512"], "multiples of 64"),
    (["--size", "512"], "WIDTHxHEIGHT"),
    (["--isolation", "thread"], "'process', 'inline'"),
    (["--torch-compile", "fast"], "'default', 'reduce-overhead', 'max-autotune'"),
    (["--steps", "0"], "x>=1"),
    (["--compare", "missing.json", "other.json"], "does not exist"),
])
def test_bad_options_exit_2_with_the_valid_choices(args, expected):
    got = CliRunner().invoke(main, ["bench", *args])
    assert got.exit_code == 2, got.output
    assert expected in " ".join(got.output.split())


def test_runs_are_backends_times_precisions():
    runs = targets.parse_runs("torch-cpu,mil:bf16,diffusers,coreml-ane", ("fp32", "bf16"))
    assert [r.label for r in runs] == ["torch-cpu:fp32", "torch-cpu:bf16", "mil:bf16", "diffusers", "coreml-ane"]
    assert [r.label for r in targets.parse_runs("torch-cpu")] == ["torch-cpu"]


def test_cli_choices_match_the_conversion_package():
    from coreml_sd.cli_bench import WEIGHTS
    from coreml_sd.bench.runner import ATTENTIONS
    from conversion.ane.attention import ATTENTION_IMPLEMENTATIONS
    from conversion.export import WEIGHT_MODES

    assert WEIGHTS == WEIGHT_MODES
    assert set(ATTENTIONS) - {"auto"} == set(ATTENTION_IMPLEMENTATIONS)


def test_summary_statistics():
    s = summarize([5.0, 1.0, 2.0, 4.0, 3.0])
    assert (s["n"], s["median_s"], s["min_s"], s["max_s"]) == (5, 3.0, 1.0, 5.0)
    assert s["p10_s"] == pytest.approx(1.4) and s["p90_s"] == pytest.approx(4.6) and s["iqr_s"] == pytest.approx(2.0)
    one = summarize([2.0])
    assert one["p10_s"] == one["p90_s"] == 2.0 and one["iqr_s"] == 0.0


def test_threads_are_set_and_recorded(bench_run):
    result, _ = bench_run
    assert result["settings"]["threads"] == 1
    assert all(r["torch_threads"] == 1 for r in report.ok_runs(result))


def test_worker_process_writes_its_measurement(tiny_diffusers_dir, tmp_path):
    """The fresh-process path: the worker's file protocol, here for a backend that cannot load a
    diffusers folder (mil needs a converted one), which is a skip with the reason."""
    from coreml_sd.bench.measure import Settings, Task
    from coreml_sd.bench.worker import main as worker_main

    task = Task(targets.RunSpec("mil"), str(tiny_diffusers_dir), Settings())
    (tmp_path / "task.json").write_text(json.dumps(task.to_dict()))
    assert worker_main(["measure", str(tmp_path / "task.json"), str(tmp_path / "out.json")]) == 0
    entry = json.loads((tmp_path / "out.json").read_text())
    assert entry["status"] == "skipped" and "convert" in entry["reason"]
    assert worker_main(["bogus"]) == 2


def test_a_worker_that_dies_is_a_failure_not_a_number(monkeypatch):
    from coreml_sd.bench import runner
    from coreml_sd.bench.measure import Settings, Task

    monkeypatch.setattr(runner.sys, "executable", "/bin/false")
    entry = runner._run_in_process(Task(targets.RunSpec("torch-cpu"), None, Settings()), lambda s: None)
    assert entry["status"] == "failed" and "exit code 1" in entry["reason"]
    assert "unet_step" not in entry


def test_random_model_is_written_once_and_loads_in_both_pipelines(tmp_path):
    """The default model's path: a random-weight diffusers folder written once into the cache (here
    at the tiny architecture with SD 1.5's shipped scheduler config, which leaves timestep_spacing
    unset), then measured by diffusers' own pipeline and by coreml_sd's."""
    from tiny_models import TEXT_CONFIG, UNET_CONFIG, VAE_CONFIG

    from coreml_sd.bench.measure import Settings
    from coreml_sd.bench.models import resolve_model, write_random_model
    from coreml_sd.bench.runner import BenchRequest, run_bench
    from coreml_sd.checkpoint.config import CheckpointConfig, shipped_config

    config = CheckpointConfig("sd1", dict(UNET_CONFIG), dict(VAE_CONFIG), dict(TEXT_CONFIG),
                              shipped_config("sd1").scheduler)
    calls = []

    def make(folder, name, seed):
        calls.append((name, seed))
        write_random_model(folder, config=config, seed=seed)

    first = resolve_model(None, tmp_path, make_random=make)
    again = resolve_model("sd15-random", tmp_path, make_random=make)
    assert calls == [("sd1", 0)] and first == again and first.random_weights
    assert not list(tmp_path.glob(".*partial*"))  # written under a temporary name, then renamed
    sched = json.loads((first.path / "scheduler" / "scheduler_config.json").read_text())
    assert sched["timestep_spacing"] == "leading"  # diffusers' default for the unset key, not null
    request = BenchRequest(tuple(targets.parse_runs("diffusers,torch-cpu:fp32")), model=str(first.path),
                           settings=Settings(steps=1, warmup=0, runs=1, e2e_steps=1, threads=1),
                           cache_dir=tmp_path, isolation="inline")
    result = run_bench(request)
    assert [r["status"] for r in result["runs"]] == ["ok", "ok"], [r["reason"] for r in result["runs"]]
