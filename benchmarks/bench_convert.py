"""`coreml-sd convert` of a full-size SD 1.5- or SDXL-architecture model (random weights), default options.

The source model is built once from the published configs (shipped in the package) with
diffusers' own random initialisation (so activations have realistic scale) and saved in fp16, as
a diffusers folder or as one original-layout .safetensors file (cached in --work). The conversion
then runs as its own process, `python -m coreml_sd convert SOURCE -o OUT --json`, under
`/usr/bin/time -v` where present; its JSON gives each stage's time and sampled peak RSS, the whole
process's peak RSS comes from the kernel (getrusage of the child). Targets: SD 1.5 (issue 6) peak
RSS <= 6 GiB, UNet trace + convert <= 100 s; SDXL (issue 12: text encoders, UNet, VAE decoder at
1024x1024) peak RSS <= 9 GiB; the conversion succeeds (every parity gate >= 35 dB).

    python -m benchmarks.bench_convert                                   # SD 1.5, diffusers folder
    python -m benchmarks.bench_convert --source-kind file                # SD 1.5, single .safetensors
    python -m benchmarks.bench_convert --model sdxl --source-kind file   # SDXL base, single .safetensors
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

from benchmarks.common import machine_info, write_result  # noqa: E402

WORK = Path(os.environ.get("TMPDIR", "/tmp")) / "coreml-sd-bench"
# model -> (peak RSS GiB, UNet trace + convert s or None)
TARGETS = {"sd15": (6.0, 100.0), "sdxl": (9.0, None)}
TARGET_PEAK_GIB, TARGET_UNET_S = TARGETS["sd15"]
DESCRIPTIONS = {"sd15": "SD 1.5 architecture", "sdxl": "SDXL 1.0 base architecture (2.6 B-parameter UNet)"}


def make_source(kind: str, work: Path, model: str = "sd15") -> Path:
    """The model-shaped random model (diffusers init, fp16 on disk), built once per kind."""
    path = work / (f"{model}-random-diffusers" if kind == "folder" else f"{model}-random-init-fp16.safetensors")
    if path.exists():
        return path
    code = f"from benchmarks.bench_convert import _build; _build({kind!r}, {str(path)!r}, {model!r})"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
    return path


def _build(kind: str, path: str, model: str = "sd15") -> None:
    # Both writers publish atomically themselves.
    if model == "sdxl":
        _build_sdxl(kind, Path(path))
    elif kind == "file":
        from benchmarks.common import sd15_text_encoder, sd15_unet, sd15_vae
        from coreml_sd.checkpoint.writer import write_original_checkpoint

        write_original_checkpoint(sd15_text_encoder(0), sd15_unet(1), sd15_vae(2), Path(path), dtype="fp16")
    else:
        from coreml_sd.bench.models import write_random_model

        write_random_model(Path(path), "sd1", seed=0)


def _build_sdxl(kind: str, path: Path) -> None:
    """SDXL base from its shipped config, each module initialised in fp16 (10 GB less than fp32 first)."""
    from coreml_sd.bench.models import random_modules, write_random_model
    from coreml_sd.checkpoint.config import shipped_config
    from coreml_sd.checkpoint.writer import write_original_checkpoint

    if kind == "folder":
        write_random_model(path, "sdxl", seed=0)
        return
    mods = random_modules(shipped_config("sdxl"), seed=0)
    write_original_checkpoint(mods["text_encoder"], mods["unet"], mods["vae"], path, dtype="fp16", family="sdxl",
                              text_encoder_2=mods["text_encoder_2"])


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
    ap.add_argument("--model", choices=tuple(TARGETS), default="sd15")
    ap.add_argument("--source-kind", choices=("folder", "file"), default="folder")
    ap.add_argument("--work", type=Path, default=WORK)
    ap.add_argument("--name", default=None, help="result file name (default convert_<model>_<kind>)")
    ap.add_argument("--keep", action="store_true", help="keep the converted folder")
    ap.add_argument("extra", nargs="*", help="extra `coreml-sd convert` options (after --)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    source = make_source(args.source_kind, args.work, args.model)
    out = args.work / f"converted-{args.model}-{args.source_kind}"
    load_before = os.getloadavg()
    summary, wall, peak, command = run_convert(source, out, args.extra)
    stages = summary["stages"]
    unet_tc = sum(s["seconds"] for s in stages if s["component"].startswith("unet") and s["stage"] in ("trace", "convert"))
    target_peak, target_unet = TARGETS[args.model]
    result = {
        "benchmark": f"coreml-sd convert, {DESCRIPTIONS[args.model]}, random weights (diffusers init), fp16 source",
        "command": command,
        "source_kind": args.source_kind,
        "source_bytes": source.stat().st_size if source.is_file() else None,
        "options": args.extra or "defaults (the family's text encoders, unet, vae_decoder; split_einsum_v2; fp16; "
                                 "batch 2; native size)",
        "wall_s": round(wall, 1),
        "peak_rss_gib": round(peak, 2),
        "unet_trace_convert_s": round(unet_tc, 1),
        "per_component": summary["summary"],
        "stages": stages,
        "parity_db": {k: v["min_psnr_db"] for k, v in summary["parity"].items()},
        "package_bytes": {k: v["size_bytes"] for k, v in summary["components"].items()},
        "targets": {"peak_rss_gib": target_peak, "unet_trace_convert_s": target_unet,
                    "met": peak <= target_peak and (target_unet is None or unet_tc <= target_unet)},
        "sd15_unet_trace_convert_s": _sd15_unet_seconds(),
        "load_average_before_after": [list(load_before), list(os.getloadavg())],
        "machine": machine_info(),
    }
    path = write_result(args.name or f"convert_{args.model}_{args.source_kind}", result)
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    print(json.dumps({k: result[k] for k in ("wall_s", "peak_rss_gib", "unet_trace_convert_s", "parity_db",
                                              "per_component", "targets")}, indent=2))
    print(f"wrote {path}")


def _sd15_unet_seconds() -> float | None:
    """SD 1.5's UNet trace + convert as recorded (results/convert_sd15_folder.json), for comparison."""
    recorded = Path(__file__).resolve().parent / "results" / "convert_sd15_folder.json"
    return json.loads(recorded.read_text()).get("unet_trace_convert_s") if recorded.is_file() else None


if __name__ == "__main__":
    main()
