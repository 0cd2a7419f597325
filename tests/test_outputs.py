"""Writers: the umask's file mode, checks of the output place, temporaries of dead processes, OS errors."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys

import pytest

from coreml_sd.errors import OutputError
from coreml_sd.outputs import (check_output_dir, default_file_mode, describe_os_error, embedded_os_error,
                               remove_stale_partials, temporary_name)


@pytest.fixture
def umask():
    """Set a umask for one test and put the old one back."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_images_get_the_umasks_mode(tmp_path, umask, mask):
    from PIL import Image

    from coreml_sd.images import GenerationParams, save_image

    umask(mask)
    assert default_file_mode() == 0o666 & ~mask
    path = save_image(Image.new("RGB", (8, 8)), tmp_path, "x", "png", GenerationParams("x"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


def test_to_safetensors_gets_the_umasks_mode(tmp_path, umask):
    torch = pytest.importorskip("torch")
    from coreml_sd.checkpoint.inspect import to_safetensors

    umask(0o022)
    torch.save({"w": torch.ones(3)}, tmp_path / "m.ckpt")
    out = to_safetensors(tmp_path / "m.ckpt")
    assert stat.S_IMODE(out.stat().st_mode) == 0o644  # safetensors alone creates 0600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ckpt", "m.safetensors"]


def test_check_output_dir(tmp_path):
    assert check_output_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checked, not created: a failed run leaves no empty folder
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_output_dir(tmp_path / "file" / "sub")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_output_dir(tmp_path / "file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # the probe left nothing


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dead, alive = _dead_pid(), os.getppid()
    final = tmp_path / "img.png"
    stale_file = temporary_name(final, dead)
    stale_file.write_bytes(b"half an image")
    stale_dir = temporary_name(tmp_path / "model", dead)
    (stale_dir / "Unet.mlpackage").mkdir(parents=True)
    busy = temporary_name(tmp_path / "other", alive)
    busy.mkdir()
    # `convert --force` killed between its two renames: the old model folder is put back, not deleted.
    set_aside = tmp_path / f".kept.old-{dead}-abcdef"
    set_aside.mkdir()
    (set_aside / "manifest.json").write_text("{}")
    unrelated = tmp_path / ".hidden.partial-notes"
    unrelated.write_text("not ours")
    removed = remove_stale_partials(tmp_path)
    assert sorted(p.name for p in removed) == sorted([stale_file.name, stale_dir.name, set_aside.name])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([busy.name, "kept", unrelated.name])
    assert (tmp_path / "kept" / "manifest.json").is_file()


def test_os_errors_read_as_one_line(tmp_path):
    err = describe_os_error(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x")), "the image",
                            tmp_path / "a.png")
    assert str(err) == f"cannot write the image {tmp_path / 'a.png'}: no space left on the device"
    err = describe_os_error(PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "d")), "the image",
                            tmp_path / "a.png")
    assert str(err) == f"cannot write the image {tmp_path / 'd'}: permission denied"
    inner = embedded_os_error(RuntimeError("Error while serializing: I/O error: File too large (os error 27)"))
    assert inner.errno == errno.EFBIG
    assert embedded_os_error(RuntimeError("shape mismatch")) is None


def test_save_image_under_a_file_is_an_output_error(tmp_path):
    from PIL import Image

    from coreml_sd.images import GenerationParams, save_image

    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="cannot write the image .*: a part of the path is a file"):
        save_image(Image.new("RGB", (8, 8)), tmp_path / "file" / "sub", "x", "png", GenerationParams("x"))


def test_a_conversion_never_replaces_a_folder_that_appeared_meanwhile(tmp_path):
    from conversion.atomic import OutputExists, atomic_folder

    target = tmp_path / "model"
    with pytest.raises(OutputExists, match="appeared while converting"):
        with atomic_folder(target, force=False) as tmp:
            (tmp / "mine.txt").write_text("this run")
            target.mkdir()  # another conversion to the same -o finished first
            (target / "theirs.txt").write_text("the other run")
    assert [p.name for p in target.iterdir()] == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    with atomic_folder(target, force=True) as tmp:
        (tmp / "mine.txt").write_text("this run")
    assert [p.name for p in target.iterdir()] == ["mine.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
