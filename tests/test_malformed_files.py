"""Hand-made malformed tensor files and odd paths: each is refused with one ModelError saying what is wrong.

Every case here once escaped as an AttributeError, RecursionError, RuntimeError, a hang or an
8 GB allocation (issue 19); each must now fail in the header check, before any tensor is built.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")

from helpers_checkpoint import write_hostile  # noqa: E402

from coreml_sd.checkpoint.safeload import (  # noqa: E402
    MAX_TENSORS, check_folder_weights, check_pickle, load_pickle, load_safetensors, load_tensor_file,
    read_safetensors_header)
from coreml_sd.cli import main  # noqa: E402
from coreml_sd.errors import ModelError, UnsafeFileError  # noqa: E402
from coreml_sd.sources import open_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def st_bytes(header, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def entry(dtype, shape, offsets):
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


CASES = {
    "metadata a list": (st_bytes({"__metadata__": [1], "a": entry("F32", [1], [0, 4])}, bytes(4)),
                        "__metadata__ is a list"),
    "metadata a string": (st_bytes({"__metadata__": "x", "a": entry("F32", [1], [0, 4])}, bytes(4)),
                          "__metadata__ is a str"),
    "200000-deep nesting": (st_bytes(b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}"), "nests deeper"),
    "negative dims, product matches": (st_bytes({"a": entry("F32", [-2, -2], [0, 16])}, bytes(16)),
                                       "non-negative integers"),
    "2**62 x 2**62 x 0": (st_bytes({"a": entry("F32", [2**62, 2**62, 0], [0, 0])}), "overflows 64 bits"),
    "same data_offsets": (st_bytes({"a": entry("F32", [2], [0, 8]), "b": entry("F32", [2], [0, 8])}, bytes(8)),
                          "overlap"),
    "partly overlapping": (st_bytes({"a": entry("F32", [2], [0, 8]), "b": entry("F32", [2], [4, 12])}, bytes(12)),
                           "overlap"),
    "past the end": (st_bytes({"a": entry("F32", [2], [100, 108])}, bytes(8)), "truncated"),
    "negative offset": (st_bytes({"a": entry("F32", [2], [-8, 0])}, bytes(8)), "0 <= start <= stop"),
    "float dimension": (st_bytes({"a": entry("F32", [2.0], [0, 8])}, bytes(8)), "non-negative integers"),
    "entry not an object": (st_bytes({"a": 5}), "is not an object"),
    "unknown dtype": (st_bytes({"a": entry("F31", [1], [0, 4])}, bytes(4)), "supported: F64"),
    "header longer than the file": (struct.pack("<Q", 10**9) + b"{}", "truncated or corrupt"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_malformed_safetensors_fail_with_one_model_error(tmp_path, name):
    data, needle = CASES[name]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(ModelError, match=needle):
        read_safetensors_header(path)
    with pytest.raises(ModelError, match=needle):
        load_safetensors(path)
    with pytest.raises(ModelError, match=needle):
        open_model(path)


def test_negative_offset_message_names_the_offsets(tmp_path):
    path = tmp_path / "neg.safetensors"
    path.write_bytes(CASES["negative offset"][0])
    with pytest.raises(ModelError) as err:
        read_safetensors_header(path)
    assert "data_offsets [-8, 0]" in str(err.value) and "occupies" not in str(err.value)


def test_valid_layouts_still_load(tmp_path):
    """Zero-size tensors may share an offset, and tensors may lie in any order: neither is an overlap."""
    header = {"__metadata__": {"format": "pt"}, "b": entry("F32", [2], [8, 16]), "a": entry("F32", [2], [0, 8]),
              "e1": entry("F16", [0, 3], [8, 8]), "e2": entry("F32", [2**31, 2**31, 0], [8, 8])}
    path = tmp_path / "ok.safetensors"
    path.write_bytes(st_bytes(header, struct.pack("<4f", 1, 2, 3, 4)))
    sd = load_safetensors(path)
    assert sd["a"].tolist() == [1, 2] and sd["b"].tolist() == [3, 4]
    assert sd["e1"].shape == (0, 3) and sd["e2"].numel() == 0


# Peak RSS from /proc (VmHWM starts afresh at exec; a child's ru_maxrss starts from its parent's peak).
HUGE_HEADER = """
import sys, time
from coreml_sd.checkpoint.safeload import read_safetensors_header
from coreml_sd.errors import ModelError
start = time.perf_counter()
try:
    read_safetensors_header(sys.argv[1])
    print("accepted")
except ModelError as exc:
    peak = [ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("VmHWM")][0]
    print(f"refused {time.perf_counter() - start:.3f} {peak} {exc}")
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak memory from /proc")
def test_a_header_of_a_million_tensors_is_refused_fast_in_bounded_memory(tmp_path):
    """The issue's file: a 79 MB header of 1.2 M empty tensors took 50 s and 0.9 GB."""
    n = 1_200_000
    raw = b"{" + b",".join(b'"t%d":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}' % i for i in range(n)) + b"}"
    path = tmp_path / "many.safetensors"
    path.write_bytes(st_bytes(raw))
    del raw
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", HUGE_HEADER, str(path)], capture_output=True, text=True, env=env,
                         timeout=60).stdout
    verdict, seconds, peak_kib, message = out.split(" ", 3)
    assert verdict == "refused" and f"at most {MAX_TENSORS} tensors" in message and "1200000" in message
    assert float(seconds) < 5
    assert int(peak_kib) < 200 * 1024  # the header's bytes (71 MB) and the interpreter, no object per entry


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("command", [["checkpoint", "inspect"], ["info"], ["generate", "x", "-o", "OUT", "--model"]])
def test_a_fifo_named_safetensors_is_refused_without_blocking(tmp_path, command):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    args = [str(tmp_path / "out") if a == "OUT" else a for a in command]
    proc = subprocess.run([sys.executable, "-m", "coreml_sd", *args, str(fifo)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert proc.returncode in (1, 2), proc.stderr
    assert "FIFO" in proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(ModelError, match="FIFO"):
        load_tensor_file(fifo)


def test_a_symlink_loop_says_so(tmp_path):
    loop = tmp_path / "loop.safetensors"
    loop.symlink_to(loop)
    with pytest.raises(ModelError, match="symbolic link loop"):
        open_model(loop)
    with pytest.raises(ModelError, match="symbolic link loop"):
        load_tensor_file(loop)
    for args in (["checkpoint", "inspect", str(loop)], ["generate", "x", "--embedding", str(loop)],
                 ["generate", "x", "--lora", f"{loop}:0.5"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and "symbolic link loop" in result.output, (args, result.output)
        assert "does not exist" not in result.output


def _legacy_with_numel(path: Path, numel: int) -> Path:
    """A legacy torch file (torch.save with the old format) whose only storage declares `numel` floats."""
    torch.save({"a": torch.ones(3)}, path, _use_new_zipfile_serialization=False)
    data, found = re.subn(rb"(cpuq.)K\x03N", lambda m: m.group(1) + b"J" + struct.pack("<i", numel) + b"N",
                          path.read_bytes(), count=1, flags=re.DOTALL)
    assert found == 1, "the fixture did not find the element count"
    path.write_bytes(data)
    return path


def _zip_with_numel(path: Path, numel: int) -> Path:
    """A torch zip whose storage record holds 3 floats but whose pickle declares `numel`."""
    import zipfile

    torch.save({"a": torch.ones(3)}, path)
    with zipfile.ZipFile(path) as zf:
        records = {i.filename: zf.read(i) for i in zf.infolist()}
    pkl = next(n for n in records if n.endswith("data.pkl"))
    # 'cpu' (memoized), then BININT1 3: the element count; replaced by a 4-byte BININT
    records[pkl], found = re.subn(rb"(cpuq.)K\x03", lambda m: m.group(1) + b"J" + struct.pack("<i", numel),
                                  records[pkl], count=1, flags=re.DOTALL)
    assert found == 1, "the fixture did not find the element count"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, content in records.items():
            zf.writestr(name, content)
    return path


@pytest.mark.parametrize("make", [_legacy_with_numel, _zip_with_numel])
def test_pickles_declaring_huge_storages_are_refused_before_allocating(tmp_path, make):
    path = make(tmp_path / "big.ckpt", 2**31 - 1)  # 8 GB of float32 declared in a file of a few hundred bytes
    with pytest.raises(ModelError, match="refused before allocating"):
        check_pickle(path)
    with pytest.raises(ModelError, match="refused before allocating"):
        load_pickle(path)
    ok = make(tmp_path / "ok.ckpt", 3)
    assert load_pickle(ok)["a"].tolist() == [1.0, 1.0, 1.0]


def _hostile_folder(tiny_diffusers_dir: Path, tmp_path: Path, relative: str, marker: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny_diffusers_dir, folder)
    weights = folder / relative
    for sibling in weights.parent.glob("*.safetensors"):
        sibling.unlink()  # as in the issue: the folder carries only the pickled weights
    write_hostile(weights, "os.system", marker)
    return folder


@pytest.mark.parametrize("relative", ["text_encoder/pytorch_model.bin", "unet/diffusion_pytorch_model.bin"])
def test_a_diffusers_folder_with_a_hostile_bin_is_refused_with_our_message(tiny_diffusers_dir, tmp_path, relative):
    marker = tmp_path / "pwned"
    folder = _hostile_folder(tiny_diffusers_dir, tmp_path, relative, marker)
    with pytest.raises(UnsafeFileError, match="posix.system|nt.system"):
        check_folder_weights(folder)
    with pytest.raises(UnsafeFileError) as err:
        open_model(folder).torch_modules(device="cpu", dtype=torch.float32)
    assert relative.split("/")[-1] in str(err.value) and "weights_only" not in str(err.value)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["generate", "a cat", "--model", str(folder), "-o", str(out), "--steps", "1"])
    assert result.exit_code == 1 and "Nothing from the file was executed" in result.output
    assert "weights_only" not in result.output and "Traceback" not in result.output
    assert not marker.exists() and not out.exists()


def test_check_folder_weights_passes_plain_weights(tiny_diffusers_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_diffusers_dir, folder)
    torch.save({"w": torch.ones(2)}, folder / "unet" / "diffusion_pytorch_model.bin")
    assert check_folder_weights(folder) == [folder / "unet" / "diffusion_pytorch_model.bin"]


@pytest.mark.parametrize("entry", ["inspect", "model", "vae", "lora", "embedding", "convert", "info"])
def test_every_entry_point_refuses_a_malformed_file_in_one_line(tmp_path, entry):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(CASES["partly overlapping"][0])
    out = tmp_path / "out"
    args = {"inspect": ["checkpoint", "inspect", bad], "model": ["generate", "x", "--model", bad, "-o", out],
            "vae": ["generate", "x", "--vae", bad, "-o", out], "lora": ["generate", "x", "--lora", bad, "-o", out],
            "embedding": ["generate", "x", "--embedding", bad, "-o", out],
            "convert": ["convert", bad, "-o", out], "info": ["info", bad]}[entry]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    assert "overlap" in result.output and result.output.count("\n") == 1 and "Traceback" not in result.output
    assert not out.exists()
