"""`coreml-sd doctor`, `coreml-sd cache info|clear` and the thread choice."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from coreml_sd.cli import main
from coreml_sd.threads import SMALL_MODEL_PARAMS, choose_threads, estimate_params


def test_doctor_reports_what_this_machine_can_run():
    result = CliRunner().invoke(main, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    from coreml_sd.backends.coreml_backend import runtime_unavailable_reason
    from coreml_sd.devices import cpu_has_native_bf16

    assert report["coreml"]["available"] is (runtime_unavailable_reason() is None)
    if sys.platform != "darwin":
        assert "macOS" in report["coreml"]["reason"]
    torch = pytest.importorskip("torch")
    assert report["torch"]["version"] == torch.__version__
    assert report["torch"]["cuda"]["available"] is torch.cuda.is_available()
    assert report["cpu"]["native_bf16"] is cpu_has_native_bf16()
    assert report["cpu"]["auto_precision"] == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert report["cpu"]["logical_cores"] == os.cpu_count()
    assert report["cache"]["path"] == os.environ["COREML_SD_CACHE"] and report["cache"]["set_by"] == "COREML_SD_CACHE"
    text = CliRunner().invoke(main, ["doctor"]).output
    assert "Core ML" in text and "threads" in text and report["cache"]["path"] in text


def _fill_cache(root):
    (root / "compiled" / "abc-macOS14").mkdir(parents=True)
    (root / "compiled" / "abc-macOS14" / "model.bin").write_bytes(b"x" * 3000)
    (root / "hashes.json").write_text("{}")
    (root / "bench").mkdir()
    (root / "bench" / "w.safetensors").write_bytes(b"y" * 1000)
    (root / "notes.txt").write_text("the user's own file, in a cache folder set by mistake")


def test_cache_info_and_clear_remove_only_coreml_sds_files(tmp_path, monkeypatch):
    monkeypatch.setenv("COREML_SD_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "cache"
    root.mkdir()
    _fill_cache(root)
    info = json.loads(CliRunner().invoke(main, ["cache", "info", "--json"]).stdout)
    assert info["entries"] == {"bench": 1000, "compiled": 3000, "hashes.json": 2} and info["other"] == ["notes.txt"]
    assert info["size_bytes"] == 4002

    refused = CliRunner().invoke(main, ["cache", "clear"], input="n\n")
    assert refused.exit_code == 1 and (root / "compiled").exists()

    cleared = CliRunner().invoke(main, ["cache", "clear", "--yes", "--json"])
    assert cleared.exit_code == 0, cleared.output
    summary = json.loads(cleared.stdout)
    assert sorted(summary["removed"]) == ["bench", "compiled", "hashes.json"] and summary["freed_bytes"] == 4002
    assert sorted(p.name for p in root.iterdir()) == ["notes.txt"]
    again = CliRunner().invoke(main, ["cache", "clear", "--yes"])
    assert again.exit_code == 0 and "nothing to remove" in again.output


@pytest.mark.parametrize("params, cores, load, expected", [
    (3_000_000, 16, 0.0, 1),  # the built-in model: one thread, however many cores
    (SMALL_MODEL_PARAMS - 1, 8, 0.0, 1),
    (860_000_000, 8, 0.0, 8),  # SD 1.5 on an idle machine: every physical core
    (860_000_000, 8, 3.2, 5),  # three cores busy elsewhere
    (860_000_000, 2, 6.0, 1),  # the shared 2-core VM of issue 19
    (860_000_000, 1, 0.0, 1),
])
def test_choose_threads(params, cores, load, expected):
    assert choose_threads(params, cores, load) == expected


def test_estimate_params_reads_sizes_only(tmp_path):
    from coreml_sd.sources import builtin_checkpoint

    assert estimate_params(None) == builtin_checkpoint().stat().st_size // 2 < SMALL_MODEL_PARAMS
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 4000)
    (tmp_path / "unet" / "config.json").write_text("{}" * 500)
    assert estimate_params(tmp_path) == 2000


def test_apply_threads_sets_torchs_count(monkeypatch):
    torch = pytest.importorskip("torch")
    from coreml_sd import threads

    before = torch.get_num_threads()
    try:
        assert threads.apply_threads(2, 10**9) == 2 and torch.get_num_threads() == 2
        monkeypatch.setattr(threads, "physical_cores", lambda: 4)
        monkeypatch.setattr(threads, "other_load", lambda: 0.0)
        assert threads.apply_threads(None, 10**9) == 4 and torch.get_num_threads() == 4
        assert threads.apply_threads(None, 10**6) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_other_load_is_the_load_now_not_the_lagging_average(monkeypatch):
    """Right after another job ends the 1-minute load average still counts it; the runnable count does
    not (a conversion started then ran on one thread of two, issue 18)."""
    from coreml_sd import threads

    monkeypatch.setattr(threads.os, "getloadavg", lambda: (1.9, 1.5, 1.2))
    monkeypatch.setattr(threads, "runnable_now", lambda: 1)  # only the reader itself
    assert threads.other_load() == 0.0 and threads.choose_threads(10**9, 2, threads.other_load()) == 2
    monkeypatch.setattr(threads, "runnable_now", lambda: 3)  # two others running now
    assert threads.other_load() == 2.0 and threads.choose_threads(10**9, 2, threads.other_load()) == 1
    monkeypatch.setattr(threads, "runnable_now", lambda: None)  # no /proc/loadavg (macOS)
    assert threads.other_load() == 1.9


@pytest.mark.skipif(not Path("/proc/loadavg").exists(), reason="reads Linux's /proc/loadavg")
def test_runnable_now_sees_a_busy_program():
    """The reading counts itself and a program that is running now (a busy loop in a child)."""
    import subprocess
    import time

    from coreml_sd.threads import other_load, runnable_now

    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # started and spinning
        assert runnable_now() >= 2 and other_load() >= 1.0
    finally:
        busy.kill()
        busy.wait()
