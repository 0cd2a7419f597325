"""What taking several image sizes costs: `convert --sizes` next to a single-size conversion.

A full-size SD 1.5-architecture model (random weights, diffusers' initialisation, fp16; the same
source `bench_convert` builds and caches) is converted twice, each as its own process
(`python -m coreml_sd convert SOURCE -o OUT --components unet,vae_decoder --json`): once for
512x512, once with `--sizes 512x512,512x768,768x512` (Core ML enumerated shapes: one UNet and one
VAE decoder taking each size). The text encoder does not depend on the image size and is left out.
Recorded: wall time and stage times, peak RSS, package sizes. Then, in a fresh process per folder,
the `mil` executor's UNet step (batch 2, fast mode, this CPU) at every size each folder takes,
after one warm-up call. Run the whole thing under the shared lock:

    flock /work/wt/heavy.lock python -m benchmarks.bench_sizes

Nothing here measures the Neural Engine or Core ML: no Mac was available (see the README).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_convert import WORK, make_source, run_convert  # noqa: E402
from benchmarks.common import machine_info, summarize, write_result  # noqa: E402

SIZES = ((512, 512), (512, 768), (768, 512))
COMPONENTS = "unet,vae_decoder"


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def convert(source: Path, out: Path, sizes) -> dict:
    extra = ["--components", COMPONENTS, "-q"]
    extra += ["--sizes", ",".join(f"{w}x{h}" for w, h in sizes)] if len(sizes) > 1 else \
        ["-W", str(sizes[0][0]), "-H", str(sizes[0][1])]
    load = os.getloadavg()
    summary, wall, peak, command = run_convert(source, out, extra)
    stages: dict[str, dict[str, float]] = {}
    for r in summary["stages"]:
        per = stages.setdefault(r["component"], {})
        per[r["stage"]] = round(per.get(r["stage"], 0.0) + r["seconds"], 1)
    return {"command": command, "wall_s": round(wall, 1), "peak_rss_gib": round(peak, 2),
            "per_component": summary["summary"], "stage_seconds": stages,
            "parity_db": {k: v["psnr_db"] for k, v in summary["parity"].items()},
            "package_bytes": {k: v["size_bytes"] for k, v in summary["components"].items()},
            "folder_bytes": _folder_bytes(out), "load_average_before_after": [list(load), list(os.getloadavg())]}


def step_times(folder: Path, sizes, repeats: int) -> dict:
    """The UNet step at each size, in a fresh process (its own memory and thread pool)."""
    code = ("import json,sys; from benchmarks.bench_sizes import _steps; "
            f"print(json.dumps(_steps({str(folder)!r}, {list(map(list, sizes))!r}, {repeats})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit("timing failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _steps(folder: str, sizes, repeats: int) -> dict:
    import numpy as np
    import torch

    from coreml_sd.backends.mil_backend import load_mil_component
    from coreml_sd.conditioning import Conditioning

    start = time.perf_counter()
    unet = load_mil_component(Path(folder) / "Unet.mlpackage", "unet", device="cpu", precision_mode="fast")
    out = {"load_s": round(time.perf_counter() - start, 1), "executor": unet.runs_on,
           "fused": dict(unet.package.executors[0].fused), "steps": {}}
    rng = np.random.default_rng(0)
    cond = Conditioning(context=torch.from_numpy(rng.standard_normal((2, 77, 768)).astype(np.float32)))
    for w, h in sizes:
        sample = torch.from_numpy(rng.standard_normal((2, 4, h // 8, w // 8)).astype(np.float32))
        t = torch.tensor([500.0, 500.0])
        unet.predict(sample, t, cond)  # warm-up
        times = []
        for _ in range(repeats):
            begin = time.perf_counter()
            unet.predict(sample, t, cond)
            times.append(time.perf_counter() - begin)
        out["steps"][f"{w}x{h}"] = {**summarize(times), "load_average": list(os.getloadavg())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=WORK, help="where the source model is built and cached")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "coreml-sd-bench-sizes",
                    help="where the conversions are written (removed after timing unless --keep)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the converted folders")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    source = make_source("folder", args.work)
    runs = {"single 512x512": ((512, 512),), "3 sizes": SIZES}
    result = {"benchmark": "convert --sizes 512x512,512x768,768x512 next to a 512x512 conversion, SD 1.5 architecture, "
                           "random weights; UNet and VAE decoder; mil UNet step (batch 2, fast mode) at each size",
              "conversions": {}, "mil_step": {}}
    for name, sizes in runs.items():
        out = args.out / f"sizes-{len(sizes)}"
        print(f"converting {name} ...", flush=True)
        result["conversions"][name] = convert(source, out, sizes)
        print(f"timing the mil UNet step of {name} ...", flush=True)
        result["mil_step"][name] = step_times(out, sizes, args.repeats)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    result["machine"] = machine_info()
    path = write_result("sizes_sd15_cpu", result)
    print(json.dumps({k: {n: {x: v.get(x) for x in ("wall_s", "peak_rss_gib", "package_bytes")}
                          for n, v in result["conversions"].items()} for k in ("conversions",)}, indent=2))
    print(json.dumps({n: {s: v["median_s"] for s, v in r["steps"].items()} for n, r in result["mil_step"].items()},
                     indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
