"""Open a full-size SD 1.5-architecture single-file checkpoint: time to ready and peak memory.

    python benchmarks/bench_checkpoint_load.py [--file PATH] [--runs 3]

Makes (once, if missing) an fp16 `.safetensors` in the original CompVis/A1111 layout with random
weights and SD 1.5's shapes (2.13 GB; timing and memory do not depend on weight values), then
opens it in fresh processes: `open_model(path)` (header read, family detection, sha256 short
hash — computed by the first open, then remembered in the cache folder while the file is unchanged) and `torch_modules(device="cpu", dtype=float16)` (memory-mapped tensors assigned into
modules built on the meta device). "ready" is when the modules are returned; "touched" is after
every weight has been read once (as a first UNet step would), which is when the mapped pages are
resident. Each run is done with the file's pages evicted from the page cache first (cold, via
posix_fadvise DONTNEED) and again with them cached (warm).

Target: peak RSS <= 1.3 x the file size (no fp32 copy of the model).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_info, peak_rss_gib, summarize, write_result  # noqa: E402

DEFAULT_FILE = Path(os.environ.get("TMPDIR", "/tmp")) / "coreml-sd-bench" / "sd15-random-fp16.safetensors"


def make_file(path: Path) -> None:
    """SD 1.5-shaped random fp16 weights under their original names, one tensor in fp32 at a time."""
    import torch
    from safetensors.torch import save_file

    from coreml_sd.checkpoint.config import shipped_config
    from coreml_sd.checkpoint.loader import new_text_encoder, new_unet, new_vae
    from coreml_sd.checkpoint.writer import original_state_dict

    cfg = shipped_config("sd1")
    meta = original_state_dict(new_text_encoder(cfg.text_encoder), new_unet(cfg.unet), new_vae(cfg.vae))
    gen = torch.Generator().manual_seed(0)
    tensors = {k: (torch.randn(t.shape, generator=gen) * 0.02).half() for k, t in meta.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    from coreml_sd.outputs import replacing

    with replacing(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "note": "random weights, SD 1.5 shapes"})


def evict(path: Path) -> None:
    with open(path, "rb") as fh:
        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def measure(path: Path) -> dict:
    """One run in this (fresh) process."""
    import psutil

    proc = psutil.Process()
    t0 = time.perf_counter()
    import torch

    from coreml_sd.sources import open_model

    # Imported by the loader anyway; imported here so that "ready" times loading, not imports.
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel  # noqa: F401

    t_import = time.perf_counter() - t0
    rss_imported = proc.memory_info().rss
    t1 = time.perf_counter()
    source = open_model(path)
    t_open = time.perf_counter() - t1
    t2 = time.perf_counter()
    mods = source.torch_modules(device="cpu", dtype=torch.float16)
    t_modules = time.perf_counter() - t2
    rss_ready = proc.memory_info().rss
    t3 = time.perf_counter()
    checksum = 0.0
    with torch.no_grad():
        for module in (mods.text_encoder, mods.unet, mods.vae):
            for p in module.parameters():
                checksum += float(torch.sum(p, dtype=torch.float32))  # reads every page once, no fp32 copy
    t_touch = time.perf_counter() - t3
    dtypes = sorted({str(p.dtype) for m in (mods.text_encoder, mods.unet, mods.vae) for p in m.parameters()})
    return {
        "import_s": t_import, "open_s": t_open, "modules_s": t_modules, "ready_s": t_open + t_modules,
        "touch_s": t_touch, "rss_after_imports_gib": rss_imported / 2**30, "rss_ready_gib": rss_ready / 2**30,
        "rss_touched_gib": proc.memory_info().rss / 2**30, "peak_rss_gib": peak_rss_gib(),
        "param_dtypes": dtypes, "checksum_finite": checksum == checksum,
    }


def run_child(path: Path, cold: bool, cache: Path) -> dict:
    if cold:
        evict(path)
    # The file's sha256 is remembered in the cache folder after the first open (see
    # coreml_sd.checkpoint.safeload): the runs share a fresh one, so only the first pays for hashing.
    env = dict(os.environ, COREML_SD_CACHE=str(cache))
    out = subprocess.run([sys.executable, __file__, "--child", str(path)], capture_output=True, text=True,
                         check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, default=DEFAULT_FILE)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--make", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child)))
        return
    if args.make:
        make_file(args.make)
        return
    if not args.file.is_file():
        # In a process of its own: a child's ru_maxrss starts from its parent's high-water mark on
        # Linux, so a parent that held the 2 GB of tensors would inflate every measured peak.
        t = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--make", str(args.file)], check=True)
        print(f"made {args.file} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    size = args.file.stat().st_size
    runs = {"cold": [], "warm": []}
    with tempfile.TemporaryDirectory(prefix="coreml-sd-bench-cache-") as cache:
        first = run_child(args.file, cold=True, cache=Path(cache))  # page cache and hash cache empty
        for _ in range(args.runs):
            runs["cold"].append(run_child(args.file, cold=True, cache=Path(cache)))
            runs["warm"].append(run_child(args.file, cold=False, cache=Path(cache)))
    peak = max(r["peak_rss_gib"] for rs in [*runs.values(), [first]] for r in rs)
    result = {
        "benchmark": "checkpoint_load",
        "command": f"python benchmarks/bench_checkpoint_load.py --runs {args.runs}",
        "file": {"layout": "original (CompVis/A1111)", "format": "safetensors", "dtype": "fp16",
                 "architecture": "SD 1.5 (random weights)", "size_gib": size / 2**30, "size_bytes": size},
        "load": {"device": "cpu", "dtype": "float16"},
        "summary": {
            "first_open": {"open_s": first["open_s"], "ready_s": first["ready_s"],
                           "note": "cold, and the file's sha256 not yet remembered: hashed once here"},
            **{f"{kind}_open": summarize([r["open_s"] for r in rs]) for kind, rs in runs.items()},
            **{f"{kind}_ready": summarize([r["ready_s"] for r in rs]) for kind, rs in runs.items()},
            **{f"{kind}_touch": summarize([r["touch_s"] for r in rs]) for kind, rs in runs.items()},
            "peak_rss_gib": peak, "peak_rss_over_file_size": peak * 2**30 / size,
            "target_ratio": 1.3, "meets_target": peak * 2**30 / size <= 1.3,
        },
        "runs": runs,
        "machine": machine_info(),
        "load_average_1_5_15": os.getloadavg(),  # the machine is shared: other jobs slow the timings
    }
    path = write_result("checkpoint_load", result)
    print(json.dumps(result["summary"], indent=2))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
