"""`coreml-sd convert` of a full-size SD 1.5-architecture model (random weights), default options.

The source model is built once from SD 1.5's published configs with diffusers' own random
initialisation (so activations have realistic scale) and saved in fp16, as a diffusers folder or
as one original-layout .safetensors file (cached in --work). The conversion then runs as its own
process, `python -m coreml_sd convert SOURCE -o OUT --json`, under `/usr/bin/time -v` where
present; its JSON gives each stage's time and sampled peak RSS, the whole process's peak RSS
comes from the kernel (getrusage of the child). Targets (issue 6): peak RSS <= 6 GiB, UNet trace +
convert <= 100 s, conversion succeeds (every parity gate >= 35 dB).

    python -m benchmarks.bench_convert                     # diffusers folder source
    python -m benchmarks.bench_convert --source-kind file  # single .safetensors checkpoint
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_info, sd15_config, write_result  # noqa: E402

WORK = Path(os.environ.get("TMPDIR", "/tmp")) / "coreml-sd-bench"
TARGET_PEAK_GIB = 6.0
TARGET_UNET_S = 100.0


def make_source(kind: str, work: Path) -> Path:
    """The SD 1.5-shaped random model (diffusers init, fp16 on disk), built once per kind."""
    path = work / ("sd15-random-diffusers" if kind == "folder" else "sd15-random-init-fp16.safetensors")
    if path.exists():
        return path
    code = f"from benchmarks.bench_convert import _build; _build({kind!r}, {str(path)!r})"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
    return path


def _build(kind: str, path: str) -> None:
    # Both writers publish atomically themselves.
    if kind == "file":
        from benchmarks.common import sd15_text_encoder, sd15_unet, sd15_vae
        from coreml_sd.checkpoint.writer import write_original_checkpoint

        write_original_checkpoint(sd15_text_encoder(0), sd15_unet(1), sd15_vae(2), Path(path), dtype="fp16")
    else:
        from coreml_sd.bench.models import write_random_model

        write_random_model(Path(path), "sd1", seed=0)


def run_convert(source: Path, out: Path, extra: list[str]) -> tuple[dict, float, float, str]:
    """(the command's JSON, wall seconds, child peak RSS GiB, command line)."""
    cmd = [sys.executable, "-m", "coreml_sd", "convert", str(source), "-o", str(out), "--force", "--json", *extra]
    if Path("/usr/bin/time").exists() and sys.platform.startswith("linux"):
        cmd = ["/usr/bin/time", "-v", *cmd]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB (Linux)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"conversion failed with exit status {proc.returncode}")
    for line in proc.stderr.splitlines():
        if "Maximum resident set size" in line:  # /usr/bin/time -v, KiB
            peak = int(line.split(":")[1]) / 2**20
    stdout = proc.stdout
    return json.loads(stdout[stdout.index("{"):]), wall, peak, " ".join(cmd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source-kind", choices=("folder", "file"), default="folder")
    ap.add_argument("--work", type=Path, default=WORK)
    ap.add_argument("--name", default=None, help="result file name (default convert_sd15_<kind>)")
    ap.add_argument("--keep", action="store_true", help="keep the converted folder")
    ap.add_argument("extra", nargs="*", help="extra `coreml-sd convert` options (after --)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    source = make_source(args.source_kind, args.work)
    out = args.work / f"converted-{args.source_kind}"
    load_before = os.getloadavg()
    summary, wall, peak, command = run_convert(source, out, args.extra)
    stages = summary["stages"]
    unet_tc = sum(s["seconds"] for s in stages if s["component"].startswith("unet") and s["stage"] in ("trace", "convert"))
    result = {
        "benchmark": "coreml-sd convert, SD 1.5 architecture, random weights (diffusers init), fp16 source",
        "command": command,
        "source_kind": args.source_kind,
        "options": args.extra or "defaults (text_encoder, unet, vae_decoder; split_einsum_v2; fp16; batch 2; 512x512)",
        "wall_s": round(wall, 1),
        "peak_rss_gib": round(peak, 2),
        "unet_trace_convert_s": round(unet_tc, 1),
        "per_component": summary["summary"],
        "stages": stages,
        "parity_db": {k: v["min_psnr_db"] for k, v in summary["parity"].items()},
        "package_bytes": {k: v["size_bytes"] for k, v in summary["components"].items()},
        "targets": {"peak_rss_gib": TARGET_PEAK_GIB, "unet_trace_convert_s": TARGET_UNET_S,
                    "met": peak <= TARGET_PEAK_GIB and unet_tc <= TARGET_UNET_S},
        "text_hidden_size": sd15_config().text_encoder["hidden_size"],
        "load_average_before_after": [list(load_before), list(os.getloadavg())],
        "machine": machine_info(),
    }
    path = write_result(args.name or f"convert_sd15_{args.source_kind}", result)
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    print(json.dumps({k: result[k] for k in ("wall_s", "peak_rss_gib", "unet_trace_convert_s", "parity_db",
                                              "per_component", "targets")}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
