"""`coreml-sd convert` of a full-size SD 1.5- or SDXL-architecture model (random weights), default options.

The source model is built once from the published configs (shipped in the package) with
diffusers' own random initialisation (so activations have realistic scale) and saved in fp16, as
a diffusers folder or as one original-layout .safetensors file (cached in --work). The conversion
then runs as its own process, `python -m coreml_sd convert SOURCE -o OUT --json`, under
`/usr/bin/time -v` where present; its JSON gives each stage's time and sampled peak RSS, the whole
process's peak RSS comes from the kernel (getrusage of the child) and the process tree's (the
conversion and its gate worker, summed) from sampling. Targets: SD 1.5 whole run <= 150 s (issue
18), peak RSS <= 6 GiB, UNet trace + convert <= 100 s (issue 6); SDXL (issue 12: text encoders,
UNet, VAE decoder at 1024x1024) peak RSS <= 9 GiB; the conversion succeeds (every parity gate >= 35 dB).

    python -m benchmarks.bench_convert                                   # SD 1.5, diffusers folder
    python -m benchmarks.bench_convert --source-kind file                # SD 1.5, single .safetensors
    python -m benchmarks.bench_convert --model sdxl --source-kind file   # SDXL base, single .safetensors
    python -m benchmarks.bench_convert --baseline DIR      # another commit's conversion first, same run
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
# model -> (whole run s, peak RSS GiB, UNet trace + convert s); None: no target
TARGETS = {"sd15": (150.0, 6.0, 100.0), "sdxl": (None, 9.0, None)}
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


class TreeRSS:
    """The summed resident memory of a process and all its descendants (the conversion and its
    gate worker), sampled every 50 ms: the memory the conversion needs at once."""

    def __init__(self, pid: int):
        import threading

        self.pid, self.peak, self.stop = pid, 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import psutil

        while not self.stop.wait(0.05):
            try:
                root = psutil.Process(self.pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            total = 0
            for proc in procs:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)

    def finish(self) -> float:
        self.stop.set()
        self.thread.join()
        return self.peak / 2**30


def run_convert(source: Path, out: Path, extra: list[str], code: Path | None = None) -> tuple[dict, float, dict, str]:
    """(the command's JSON, wall seconds, {peak RSS GiB of the main process and of the process tree,
    CPU seconds}, command line). `code`: the checkout to run (its folder is the working directory:
    `python -m` puts that first on the import path)."""
    cmd = [sys.executable, "-m", "coreml_sd", "convert", str(source), "-o", str(out), "--force", "--json", *extra]
    if Path("/usr/bin/time").exists() and sys.platform.startswith("linux"):
        cmd = ["/usr/bin/time", "-v", *cmd]
    start = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=str(code.resolve()) if code else None)
    tree = TreeRSS(proc.pid)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    facts = {"main_peak_rss_gib": usage.ru_maxrss / 2**20, "tree_peak_rss_gib": tree.finish(),
             "cpu_s": (usage.ru_utime - before.ru_utime) + (usage.ru_stime - before.ru_stime)}
    if proc.returncode != 0:
        sys.stderr.write(stderr[-4000:])
        raise SystemExit(f"conversion failed with exit status {proc.returncode}")
    for line in stderr.splitlines():
        if "Maximum resident set size" in line:  # /usr/bin/time -v, KiB
            facts["main_peak_rss_gib"] = int(line.split(":")[1]) / 2**20
    return json.loads(stdout[stdout.index("{"):]), wall, facts, " ".join(cmd)


def measure(source: Path, out: Path, extra: list[str], *, code: Path | None = None, model: str = "sd15") -> dict:
    """One conversion, as its own process; `code`: a checkout whose coreml_sd/conversion it runs
    (another commit's, for a before/after comparison), else this one's."""
    env_path = os.environ.get("PYTHONPATH")
    if code is not None:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(code.resolve()), *([env_path] if env_path else [])])
    load_before = os.getloadavg()
    try:
        summary, wall, facts, command = run_convert(source, out, extra, code)
    finally:
        if code is not None:
            os.environ.pop("PYTHONPATH") if env_path is None else os.environ.__setitem__("PYTHONPATH", env_path)
    peak = max(facts["main_peak_rss_gib"], facts["tree_peak_rss_gib"])
    stages = summary["stages"]
    unet_tc = sum(s["seconds"] for s in stages if s["component"].startswith("unet") and s["stage"] in ("trace", "convert"))
    target_wall, target_peak, target_unet = TARGETS[model]
    return {
        "code": str(code) if code else "this checkout",
        "command": command,
        "wall_s": round(wall, 1),
        "cpu_s": round(facts["cpu_s"], 1),  # user + system, all processes of the conversion
        "peak_rss_gib": round(peak, 2),  # the larger of the main process's and the process tree's (summed)
        "main_peak_rss_gib": round(facts["main_peak_rss_gib"], 2),
        "tree_peak_rss_gib": round(facts["tree_peak_rss_gib"], 2),
        "unet_trace_convert_s": round(unet_tc, 1),
        "per_component": summary["summary"],
        "stages": stages,
        "parity_db": {k: v["min_psnr_db"] for k, v in summary["parity"].items()},
        "package_bytes": {k: v["size_bytes"] for k, v in summary["components"].items()},
        "targets": {"wall_s": target_wall, "peak_rss_gib": target_peak, "unet_trace_convert_s": target_unet,
                    "met": all(v is None or got <= v for got, v in ((wall, target_wall), (peak, target_peak),
                                                                     (unet_tc, target_unet)))},
        "load_average_before_after": [list(load_before), list(os.getloadavg())],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=tuple(TARGETS), default="sd15")
    ap.add_argument("--source-kind", choices=("folder", "file"), default="folder")
    ap.add_argument("--work", type=Path, default=WORK)
    ap.add_argument("--name", default=None, help="result file name (default convert_<model>_<kind>)")
    ap.add_argument("--keep", action="store_true", help="keep the converted folder")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="a checkout of another commit (e.g. `git archive <commit> | tar -x -C DIR`): its "
                         "conversion runs first, then this checkout's, one after the other in this run")
    ap.add_argument("extra", nargs="*", help="extra `coreml-sd convert` options (after --)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    source = make_source(args.source_kind, args.work, args.model)
    out = args.work / f"converted-{args.model}-{args.source_kind}"
    baseline = measure(source, out, args.extra, code=args.baseline, model=args.model) if args.baseline else None
    result = {
        "benchmark": f"coreml-sd convert, {DESCRIPTIONS[args.model]}, random weights (diffusers init), fp16 source",
        "source_kind": args.source_kind,
        "source_bytes": source.stat().st_size if source.is_file() else None,
        "options": args.extra or "defaults (the family's text encoders, unet, vae_decoder; split_einsum_v2; fp16; "
                                 "batch 2; native size)",
        **measure(source, out, args.extra, model=args.model),
        "sd15_unet_trace_convert_s": _sd15_unet_seconds() if args.model != "sd15" else None,
        "machine": machine_info(),
    }
    if baseline:
        result["baseline"] = baseline
        result["speedup_wall"] = round(baseline["wall_s"] / result["wall_s"], 2)
    path = write_result(args.name or f"convert_{args.model}_{args.source_kind}", result)
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    keys = ("wall_s", "cpu_s", "peak_rss_gib", "unet_trace_convert_s", "parity_db", "per_component", "targets")
    print(json.dumps({k: result[k] for k in keys}, indent=2))
    if baseline:
        print(f"baseline {baseline['wall_s']} s -> {result['wall_s']} s ({result['speedup_wall']}x)")
    print(f"wrote {path}")


def _sd15_unet_seconds() -> float | None:
    """SD 1.5's UNet trace + convert as recorded (results/convert_sd15_folder.json), for comparison."""
    recorded = Path(__file__).resolve().parent / "results" / "convert_sd15_folder.json"
    return json.loads(recorded.read_text()).get("unet_trace_convert_s") if recorded.is_file() else None


if __name__ == "__main__":
    main()
