"""The fault matrix: what a kill, Ctrl-C, a full disk, a read-only folder or a second writer does to
`convert`, `generate` (several images) and `checkpoint to-safetensors`, on tiny models.

For every fault: the exit status, a message naming the cause, no partial or corrupt output,
earlier outputs untouched, and a rerun that succeeds (and clears what a SIGKILL left). Kill and
interrupt moments are drawn from a seeded generator over the command's measured duration. The
disk is "full" through RLIMIT_FSIZE in the child (writes past the limit fail with EFBIG).
"""

from __future__ import annotations

import random
import shutil
import signal
from pathlib import Path

import pytest

pytest.importorskip("torch")

from faults import (can_drop_root_write_override, image_is_complete, interrupt_cli, leftovers,  # noqa: E402
                    one_line_error, run_cli, snapshot, start_cli)

GENERATE = ["generate", "a 3", "--seed", "5", "--num-images", "3", "--steps", "4", "--format", "png"]
SIGNALS = {"SIGINT": signal.SIGINT, "SIGKILL": signal.SIGKILL}


# ------------------------------------------------------------------ fixtures: an earlier output of each command

@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from helpers_checkpoint import write_tiny_checkpoint

    path, _, _ = write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt", fmt="ckpt", sidecar=False)
    return path


def _earlier_images(folder: Path):
    """A folder holding the images of one complete run, and how long that run took."""
    done = run_cli(*GENERATE, "-o", folder, "-q")
    assert done.returncode == 0, done.stderr
    return snapshot(folder), done.seconds


def in_process(*args) -> str:
    """Run the CLI in this process (its modules are loaded already: seconds, not tens); returns stdout."""
    from click.testing import CliRunner

    from coreml_sd.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.stdout


def _earlier_safetensors(ckpt: Path, folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    done = run_cli("checkpoint", "to-safetensors", ckpt, "-o", folder / "earlier.safetensors")
    assert done.returncode == 0, done.stderr
    return snapshot(folder), done.seconds


def _earlier_model(source: Path, folder: Path):
    done = run_cli("convert", source, "-o", folder / "earlier", "-q")
    assert done.returncode == 0, done.stderr
    return snapshot(folder), done.seconds


def _intact(folder: Path, before: dict[str, str]) -> None:
    now = snapshot(folder)
    assert {k: now.get(k) for k in before} == before, "an earlier output changed"


def _check_stopped(outcome, sig) -> None:
    """A run stopped by `sig` either finished first (its paths are on stdout) or stopped cleanly."""
    if sig == signal.SIGKILL:
        assert outcome.returncode in (0, -signal.SIGKILL), outcome.stderr[-2000:]
    elif "Stopped:" in outcome.stderr:
        # 130, or killed by SIGINT: CPython re-raises SIGINT at exit when the interrupt first surfaced in
        # code run through PyRun_* (a C extension's), even though the command handled it. A shell
        # reports both as 130.
        assert outcome.returncode in (130, -signal.SIGINT), outcome.stderr[-2000:]
        assert one_line_error(outcome).startswith("Stopped: interrupted (Ctrl-C)")
    else:
        # The signal came after the command had finished, while the interpreter shut down.
        assert outcome.returncode in (0, -signal.SIGINT) and outcome.stdout.strip(), outcome.stderr[-2000:]


def _moments(seed: int, seconds: float, n: int = 2) -> list[float]:
    rng = random.Random(seed)
    return sorted(rng.uniform(0.3, seconds) for _ in range(n))


# ------------------------------------------------------------------ kills and Ctrl-C at random moments

@pytest.mark.slow
@pytest.mark.parametrize("name", list(SIGNALS))
def test_generate_killed_at_random_moments(tmp_path, name):
    sig, out = SIGNALS[name], tmp_path / "out"
    before, seconds = _earlier_images(out)
    for delay in _moments(11 + sig, seconds):
        outcome = interrupt_cli(*GENERATE, "-o", out, "-q", delay=delay, sig=sig)
        _check_stopped(outcome, sig)
        _intact(out, before)
        assert all(image_is_complete(p) for p in out.glob("*.png"))
        if sig == signal.SIGINT:
            assert leftovers(out) == []
    rerun = run_cli(*GENERATE, "-o", out)
    assert rerun.returncode == 0, rerun.stderr
    assert leftovers(out) == []  # a killed run's temporaries went with the next run into the folder
    new = rerun.stdout.split()
    assert len(new) == 3 and all(image_is_complete(Path(p)) for p in new)
    _intact(out, before)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SIGNALS))
def test_to_safetensors_killed_at_random_moments(tmp_path, tiny_ckpt, name):
    from coreml_sd.checkpoint.safeload import load_safetensors

    sig, folder = SIGNALS[name], tmp_path / "weights"
    before, seconds = _earlier_safetensors(tiny_ckpt, folder)
    reference = load_safetensors(folder / "earlier.safetensors")
    target = folder / "again.safetensors"
    for delay in _moments(23 + sig, seconds):
        target.unlink(missing_ok=True)
        outcome = interrupt_cli("checkpoint", "to-safetensors", tiny_ckpt, "-o", target, delay=delay, sig=sig)
        _check_stopped(outcome, sig)
        _intact(folder, before)
        if target.exists():  # only ever complete
            got = load_safetensors(target)
            assert got.keys() == reference.keys() and all(got[k].equal(reference[k]) for k in got)
        if sig == signal.SIGINT:
            assert leftovers(folder) == []
    target.unlink(missing_ok=True)
    rerun = run_cli("checkpoint", "to-safetensors", tiny_ckpt, "-o", target)
    assert rerun.returncode == 0 and leftovers(folder) == [], rerun.stderr
    _intact(folder, before)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SIGNALS))
def test_convert_killed_at_random_moments(tmp_path, tiny_diffusers_dir, name):
    from coreml_sd.sources import open_model

    sig, models = SIGNALS[name], tmp_path / "models"
    before, seconds = _earlier_model(tiny_diffusers_dir, models)
    target = models / "again"
    for delay in _moments(37 + sig, seconds):
        shutil.rmtree(target, ignore_errors=True)
        outcome = interrupt_cli("convert", tiny_diffusers_dir, "-o", target, "-q", delay=delay, sig=sig)
        _check_stopped(outcome, sig)
        _intact(models, before)
        # The folder appears only complete: exactly when the command got to report it (a signal may
        # still come after that, while the interpreter shuts down).
        assert target.exists() == (str(target) in outcome.stdout)
        if target.exists():
            assert open_model(target).info.kind == "coreml"
        if sig == signal.SIGINT:
            assert leftovers(models) == []
    rerun = run_cli("convert", tiny_diffusers_dir, "-o", target, "-q", "--force")
    assert rerun.returncode == 0, rerun.stderr
    assert leftovers(models) == []  # a killed conversion's partial folder went with the next conversion there
    assert open_model(target).info.kind == "coreml"
    _intact(models, before)


# ------------------------------------------------------------------ a full disk (a file-size limit)

def test_generate_on_a_full_disk(tmp_path):
    out = tmp_path / "out"
    in_process(*GENERATE, "-o", out, "-q")
    before = snapshot(out)
    full = run_cli(*GENERATE, "-o", out, fsize=600)  # each PNG is ~2 KB
    assert full.returncode == 1
    line = one_line_error(full)
    assert "cannot write the image" in line and str(out) in line and "file-size limit" in line
    assert leftovers(out) == [] and snapshot(out) == before  # no partial image, nothing else touched
    new = in_process(*GENERATE, "-o", out).split()
    assert len(new) == 3 and all(image_is_complete(Path(p)) for p in new) and len(list(out.glob("*.png"))) == 6


def test_to_safetensors_on_a_full_disk(tmp_path, tiny_ckpt):
    folder = tmp_path / "weights"
    folder.mkdir()
    in_process("checkpoint", "to-safetensors", tiny_ckpt, "-o", folder / "earlier.safetensors")
    before = snapshot(folder)
    target = folder / "new.safetensors"
    full = run_cli("checkpoint", "to-safetensors", tiny_ckpt, "-o", target, fsize=1 << 16)
    assert full.returncode == 1
    line = one_line_error(full)
    assert "cannot write the safetensors file" in line and str(target) in line and "file too large" in line
    assert not target.exists() and leftovers(folder) == [] and snapshot(folder) == before
    in_process("checkpoint", "to-safetensors", tiny_ckpt, "-o", target)
    from coreml_sd.checkpoint.safeload import load_tensor_file

    # (Not byte-equal: safetensors writes its metadata from a hash map, in no fixed order.)
    (new, new_meta), (old, old_meta) = load_tensor_file(target), load_tensor_file(folder / "earlier.safetensors")
    assert new_meta == old_meta and new.keys() == old.keys() and all(new[k].equal(old[k]) for k in new)


@pytest.mark.slow
def test_convert_on_a_full_disk(tmp_path, tiny_diffusers_dir):
    models = tmp_path / "models"
    before, _ = _earlier_model(tiny_diffusers_dir, models)
    full = run_cli("convert", tiny_diffusers_dir, "-o", models / "new", "-q", fsize=100_000)
    assert full.returncode == 1
    line = one_line_error(full)
    assert "cannot write the model folder" in line and "file-size limit" in line
    assert not (models / "new").exists() and leftovers(models) == [] and snapshot(models) == before
    assert run_cli("convert", tiny_diffusers_dir, "-o", models / "new", "-q").returncode == 0


# ------------------------------------------------------------------ a read-only output folder

@pytest.fixture
def read_only(tmp_path):
    if not can_drop_root_write_override():
        pytest.skip("running as root without the right to drop CAP_DAC_OVERRIDE: no folder is read-only")
    folder = tmp_path / "ro"
    folder.mkdir()
    (folder / "earlier.txt").write_text("an earlier output")
    folder.chmod(0o555)
    yield folder
    folder.chmod(0o755)


@pytest.mark.parametrize("command", ["generate", "generate-subfolder", "to-safetensors", "convert"])
def test_a_read_only_output_folder_fails_before_any_work(read_only, tiny_ckpt, tiny_diffusers_dir, command):
    args = {"generate": [*GENERATE, "-o", read_only],
            "generate-subfolder": [*GENERATE, "-o", read_only / "sub"],
            "to-safetensors": ["checkpoint", "to-safetensors", tiny_ckpt, "-o", read_only / "x.safetensors"],
            "convert": ["convert", tiny_diffusers_dir, "-o", read_only / "model"]}[command]
    before = snapshot(read_only)
    outcome = run_cli(*args, drop_dac=True)
    assert outcome.returncode == 1
    line = one_line_error(outcome)
    assert str(read_only) in line and "permission denied" in line
    assert "seed" not in outcome.stderr and "converting" not in outcome.stderr  # nothing was loaded
    assert snapshot(read_only) == before and sorted(p.name for p in read_only.iterdir()) == ["earlier.txt"]


# ------------------------------------------------------------------ two writers at once

def test_two_generates_into_one_folder_with_one_seed(tmp_path):
    out = tmp_path / "out"
    procs = [start_cli(*GENERATE, "-o", out) for _ in range(2)]
    results = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    assert all(rc == 0 for rc, _, _ in results), [err[-2000:] for _, _, err in results]
    paths = [line for _, stdout, _ in results for line in stdout.split()]
    assert len(paths) == len(set(paths)) == 6  # no image overwrote another
    assert sorted(Path(p).name for p in paths) == sorted(p.name for p in out.iterdir())
    assert all(image_is_complete(Path(p)) for p in paths) and leftovers(out) == []


def test_two_to_safetensors_into_one_file(tmp_path, tiny_ckpt):
    from coreml_sd.checkpoint.safeload import load_safetensors

    target = tmp_path / "same.safetensors"
    procs = [start_cli("checkpoint", "to-safetensors", tiny_ckpt, "-o", target) for _ in range(2)]
    results = sorted((p.wait(timeout=600), *p.communicate()) for p in procs)
    (ok, _, _), (failed, _, err) = results
    assert (ok, failed) == (0, 1), err
    assert "exists" in err.splitlines()[-1] or "appeared while converting" in err.splitlines()[-1]
    assert load_safetensors(target) and leftovers(tmp_path) == []


@pytest.mark.slow
def test_two_converts_into_one_folder(tmp_path, tiny_diffusers_dir):
    from coreml_sd.sources import open_model

    target = tmp_path / "model"
    procs = [start_cli("convert", tiny_diffusers_dir, "-o", target, "-q") for _ in range(2)]
    results = sorted((p.wait(timeout=900), *p.communicate()) for p in procs)
    (ok, _, _), (failed, _, err) = results
    assert (ok, failed) == (0, 1), err
    assert "already exists" in err or "appeared while converting" in err
    assert open_model(target).info.kind == "coreml" and leftovers(tmp_path) == []
