"""Seeded fuzzing of tensor files: mutated safetensors headers and bodies, torch zip and legacy pickles.

Every case must either load or fail with a ModelError (UnsafeFileError included): no other
exception, no hang, no allocation of what a header merely declares. Run by
tests/test_fuzz_checkpoints.py in a child process under an address-space limit, so a file that
makes torch reserve gigabytes fails the run instead of slowing the machine:

    python tests/fuzz_checkpoints.py --seed 0 --cases 300
prints one JSON object: counts per outcome and the cases that crashed or hung.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import signal
import struct
import sys
import tempfile
import time
import zipfile
from pathlib import Path

CASE_SECONDS = 10
# Values a hostile or broken header might hold where a well-formed one has a dtype, a dimension or an offset.
ODD_VALUES = [-1, -8, 0, 1, 3, 2**31, 2**62, 2**63, 2**64 + 1, 1.5, float("nan"), "F32", "x" * 300, "", None, True,
              [], [1], [2, 2], [-2, -2], [2**62, 2**62, 0], [0, 2**62], {}, {"a": 1}, [[[[[]]]]]]


def base_files(folder: Path) -> dict[str, Path]:
    """A small safetensors file, a torch zip and a legacy torch pickle, each with several dtypes and a view."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(4, 3, generator=gen), "b": torch.randn(4, generator=gen).half(),
               "i": torch.arange(6, dtype=torch.int64).reshape(2, 3), "e": torch.zeros(0, 5),
               "h": torch.randn(2, 2, generator=gen).bfloat16()}
    paths = {"safetensors": folder / "base.safetensors", "zip": folder / "base.ckpt", "legacy": folder / "base.pt"}
    save_file(tensors, str(paths["safetensors"]), metadata={"format": "pt", "note": "fuzz base"})
    shared = torch.randn(8, generator=gen)
    obj = {"state_dict": {**tensors, "view": shared[2:6], "whole": shared}, "global_step": 3}
    torch.save(obj, paths["zip"])
    torch.save(obj, paths["legacy"], _use_new_zipfile_serialization=False)
    return paths


def _flip(data: bytes, rng: random.Random, lo: int = 0, hi: int | None = None, count: int = 4) -> bytes:
    buf = bytearray(data)
    hi = len(buf) if hi is None else min(hi, len(buf))
    for _ in range(rng.randint(1, count)):
        if hi > lo:
            buf[rng.randrange(lo, hi)] = rng.randrange(256)
    return bytes(buf)


def _splice(data: bytes, rng: random.Random, lo: int, hi: int) -> bytes:
    """Delete, duplicate or insert a short run of bytes between lo and hi."""
    at = rng.randrange(lo, max(lo + 1, min(hi, len(data))))
    n = rng.randint(1, 16)
    choice = rng.randrange(3)
    if choice == 0:
        return data[:at] + data[at + n:]
    if choice == 1:
        return data[:at] + data[at:at + n] * 2 + data[at + n:]
    return data[:at] + bytes(rng.randrange(256) for _ in range(n)) + data[at:]


def mutate_safetensors(data: bytes, rng: random.Random) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    header, body = json.loads(data[8:8 + n]), data[8 + n:]
    how = rng.randrange(7)
    if how == 0:  # one field of one entry replaced by an odd value, or removed
        key = rng.choice(list(header))
        entry = header[key] if isinstance(header[key], dict) else {}
        field = rng.choice(list(entry) or ["x"])
        if rng.random() < 0.2:
            entry.pop(field, None)
        else:
            entry[field] = rng.choice(ODD_VALUES)
        header[key] = entry if key != "__metadata__" or rng.random() < 0.5 else rng.choice(ODD_VALUES)
    elif how == 1:  # an entry copied onto another's bytes, or shifted part-way into them
        src = header[rng.choice([k for k in header if k != "__metadata__"])]
        start, stop = src["data_offsets"]
        shift = rng.choice([0, 1, 2, (stop - start) // 2])
        header["dup"] = dict(src, data_offsets=[start + shift, stop + shift])
    elif how == 2:  # a random integer in a random place of the raw header
        raw = json.dumps(header).encode()
        digits = [i for i, c in enumerate(raw) if chr(c).isdigit()]
        at = rng.choice(digits)
        raw = raw[:at] + str(rng.choice([-1, 10**20, 2**63, 7])).encode() + raw[at + 1:]
        return struct.pack("<Q", len(raw)) + raw + body
    elif how == 3:
        return _flip(data, rng, 0, 8 + n)
    elif how == 4:
        return data[:rng.randrange(len(data))]
    elif how == 5:
        return struct.pack("<Q", rng.choice([0, 1, n - 1, n + 1, len(data), 2**63])) + data[8:]
    else:  # tensor bytes only: must load (the values change, the layout does not)
        return _flip(data, rng, 8 + n)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def mutate_zip(path: Path, rng: random.Random) -> bytes:
    with zipfile.ZipFile(path) as zf:
        records = {info.filename: zf.read(info) for info in zf.infolist()}
    pkl = next(n for n in records if n.endswith("data.pkl"))
    how = rng.randrange(5)
    if how == 3:
        return _flip(path.read_bytes(), rng)
    if how == 4:
        data = path.read_bytes()
        return data[:rng.randrange(len(data))]
    data = records[pkl]
    records[pkl] = (_flip(data, rng) if how == 0 else _splice(data, rng, 0, len(data)) if how == 1
                    else data[:rng.randrange(len(data))])
    out = io.BytesIO()  # rewritten with valid CRCs, so the pickle itself is what is tested
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for name, content in records.items():
            zf.writestr(name, content)
    return out.getvalue()


def mutate_legacy(data: bytes, rng: random.Random) -> bytes:
    pickles_end = min(len(data), 700)  # the five pickles come first, then the raw storages
    how = rng.randrange(4)
    if how == 0:
        return _flip(data, rng, 0, pickles_end)
    if how == 1:
        return _splice(data, rng, 0, pickles_end)
    if how == 2:
        return data[:rng.randrange(len(data))]
    return _flip(data, rng)


def touch_all(obj) -> int:
    """Read every tensor's bytes (a mapping past the file's end would fault here)."""
    import torch

    seen = 0
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            item.to(torch.float64).sum().item() if item.numel() else None
            seen += 1
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return seen


class CaseTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise CaseTimeout()


def run_case(path: Path) -> str:
    from coreml_sd.checkpoint.safeload import load_tensor_file, tensor_shapes
    from coreml_sd.errors import ModelError

    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_SECONDS)
    try:
        tensor_shapes(path)
        touch_all(load_tensor_file(path)[0])
        return "loaded"
    except ModelError as exc:
        text = str(exc)
        return "bad-message" if "weights_only" in text or "Traceback" in text else "refused"
    except CaseTimeout:
        return "hang"
    finally:
        signal.alarm(0)


def fuzz(seed: int, cases: int, folder: Path) -> dict:
    bases = base_files(folder)
    raw = {k: p.read_bytes() for k, p in bases.items()}
    counts: dict[str, int] = {}
    problems = []
    for i in range(cases):
        rng = random.Random(seed * 1_000_003 + i)
        kind = ("safetensors", "zip", "legacy")[i % 3]
        data = (mutate_safetensors(raw[kind], rng) if kind == "safetensors" else
                mutate_zip(bases[kind], rng) if kind == "zip" else mutate_legacy(raw[kind], rng))
        path = folder / f"case{bases[kind].suffix}"
        path.write_bytes(data)
        try:
            outcome = run_case(path)
        except Exception as exc:  # noqa: BLE001 - exactly what this fuzzer looks for
            outcome = f"crash {type(exc).__name__}: {str(exc)[:200]}"
        key = f"{kind} {outcome.split(':')[0]}"
        counts[key] = counts.get(key, 0) + 1
        if outcome not in ("loaded", "refused"):
            problems.append({"case": i, "kind": kind, "outcome": outcome})
    return {"counts": counts, "problems": problems}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cases", type=int, default=300)
    args = ap.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = fuzz(args.seed, args.cases, Path(tmp))
    import resource

    result["seconds"] = round(time.perf_counter() - start, 2)
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
