"""`coreml-sd convert` of a full-size SD 1.5-architecture model (random weights), default options.

The source model is built once from SD 1.5's published configs with diffusers' own random
initialisation (so activations have realistic scale) and saved in fp16, as a diffusers folder or
as one original-layout .safetensors file (cached in --work). The conversion then runs as its own
process, `python -m coreml_sd convert SOURCE -o OUT --json`, under `/usr/bin/time -v` where
present; its JSON gives each stage's time and sampled peak RSS, the whole process's peak RSS
comes from the kernel (getrusage of the child) and the process tree's (the conversion and its gate
worker, summed) from sampling. Targets: whole run <= 150 s (issue 18), peak RSS <= 6 GiB, UNet
trace + convert <= 100 s (issue 6), conversion succeeds (every parity gate >= 35 dB).

    python -m benchmarks.bench_convert                     # diffusers folder source
    python -m benchmarks.bench_convert --source-kind file  # single .safetensors checkpoint
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

from benchmarks.common import machine_info, sd15_config, write_result  # noqa: E402

WORK = Path(os.environ.get("TMPDIR", "/tmp")) / "coreml-sd-bench"
TARGET_PEAK_GIB = 6.0
TARGET_UNET_S = 100.0
TARGET_WALL_S = 150.0


def make_source(kind: str, work: Path) -> Path:
    """The SD 1.5-shaped random model (diffusers init, fp16 on disk), built once per kind."""
    path = work / ("sd15-random-diffusers" if kind == "folder" else "sd15-random-init-fp16.safetensors")
    if path.exists():
        return path
    code = f"from benchmarks.bench_convert import _build; _build({kind!r}, {str(path)!r})"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
    return path


def _build(kind: str, path: str) -> None:
    target = Path(path)
    tmp = target.with_name(target.name + ".partial")
    if kind == "file":
        from benchmarks.common import sd15_text_encoder, sd15_unet, sd15_vae
        from coreml_sd.checkpoint.writer import write_original_checkpoint

        write_original_checkpoint(sd15_text_encoder(0), sd15_unet(1), sd15_vae(2), tmp, dtype="fp16")
    else:
        from coreml_sd.bench.models import write_random_model

        write_random_model(tmp, "sd1", seed=0)
    os.replace(tmp, target)


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


def measure(source: Path, out: Path, extra: list[str], *, code: Path | None = None) -> dict:
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
        "targets": {"wall_s": TARGET_WALL_S, "peak_rss_gib": TARGET_PEAK_GIB, "unet_trace_convert_s": TARGET_UNET_S,
                    "met": wall <= TARGET_WALL_S and peak <= TARGET_PEAK_GIB and unet_tc <= TARGET_UNET_S},
        "load_average_before_after": [list(load_before), list(os.getloadavg())],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source-kind", choices=("folder", "file"), default="folder")
    ap.add_argument("--work", type=Path, default=WORK)
    ap.add_argument("--name", default=None, help="result file name (default convert_sd15_<kind>)")
    ap.add_argument("--keep", action="store_true", help="keep the converted folder")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="a checkout of another commit (e.g. `git archive <commit> | tar -x -C DIR`): its "
                         "conversion runs first, then this checkout's, one after the other in this run")
    ap.add_argument("extra", nargs="*", help="extra `coreml-sd convert` options (after --)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    source = make_source(args.source_kind, args.work)
    out = args.work / f"converted-{args.source_kind}"
    baseline = measure(source, out, args.extra, code=args.baseline) if args.baseline else None
    result = {
        "benchmark": "coreml-sd convert, SD 1.5 architecture, random weights (diffusers init), fp16 source",
        "source_kind": args.source_kind,
        "options": args.extra or "defaults (text_encoder, unet, vae_decoder; split_einsum_v2; fp16; batch 2; 512x512)",
        **measure(source, out, args.extra),
        "text_hidden_size": sd15_config().text_encoder["hidden_size"],
        "machine": machine_info(),
    }
    if baseline:
        result["baseline"] = baseline
        result["speedup_wall"] = round(baseline["wall_s"] / result["wall_s"], 2)
    path = write_result(args.name or f"convert_sd15_{args.source_kind}", result)
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    keys = ("wall_s", "cpu_s", "peak_rss_gib", "unet_trace_convert_s", "parity_db", "per_component", "targets")
    print(json.dumps({k: result[k] for k in keys}, indent=2))
    if baseline:
        print(f"baseline {baseline['wall_s']} s -> {result['wall_s']} s ({result['speedup_wall']}x)")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
