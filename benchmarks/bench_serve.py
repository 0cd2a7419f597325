"""A warm `coreml-sd serve` against the same work done as separate `coreml-sd generate` runs.

    python benchmarks/bench_serve.py [--model builtin|sd15-random|PATH] [--steps 4] [--requests 30]
                                     [--cli-runs 8] [--clients 1] [--name NAME]

Both sides make the same images (prompt, 4 Euler-a steps, guidance 7.5, the model's native size,
seed i for request i) and both save each one as PNG with its parameters. The server is started once
as a real `coreml-sd serve` process; after one untimed warm-up request, `--requests` txt2img
requests are timed one after another (latency = request sent to response read, image decoded),
then the same count again from `--clients` threads at once (throughput through the queue). Each CLI
run is a fresh `python -m coreml_sd generate` process, timed from start to exit, so its latency
includes Python start-up, imports and the model load: what a script that shells out per image pays.

Requests per minute = 60 x count / total wall time. The ratio server/CLI is what keeping the model
warm buys. Written to benchmarks/results/<name>.json with the machine and library versions.
The default, the built-in model, is what was measured; `--model sd15-random` (SD 1.5's full-size
architecture with random weights, 2 GB written once to the cache) is prepared but optional.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_info, summarize, write_result

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a handwritten digit seven"


def env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def start_server(model: str | None, out: Path) -> tuple[subprocess.Popen, str, float]:
    """Start `coreml-sd serve`; return (process, base URL, seconds until the model was loaded)."""
    import requests

    args = [sys.executable, "-m", "coreml_sd", "serve", "--port", "0", "-o", str(out), "--log-level", "warning"]
    args += ["--model", model] if model else []
    started = time.perf_counter()
    proc = subprocess.Popen(args, env=env(), stderr=subprocess.PIPE, text=True)
    url = None
    for line in proc.stderr:
        if m := re.search(r"serving on (http://127\.0\.0\.1:\d+)/", line):
            url = m.group(1)
            break
    if url is None:
        raise RuntimeError("coreml-sd serve did not start")
    threading.Thread(target=lambda: [_ for _ in proc.stderr], daemon=True).start()
    while requests.get(url + "/coreml-sd/v1/info").json()["default_size"] is None:
        time.sleep(0.05)
    return proc, url, time.perf_counter() - started


def request(url: str, seed: int, steps: int) -> float:
    import requests
    from PIL import Image

    t = time.perf_counter()
    response = requests.post(url + "/sdapi/v1/txt2img", json={
        "prompt": PROMPT, "seed": seed, "steps": steps, "cfg_scale": 7.5, "sampler_name": "Euler a"})
    response.raise_for_status()
    Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))).load()
    return time.perf_counter() - t


def measure_server(model: str | None, steps: int, n: int, clients: int, out: Path) -> dict:
    proc, url, ready_s = start_server(model, out)
    try:
        request(url, 0, steps)  # warm-up: first-call allocations, lazy imports
        t = time.perf_counter()
        sequential = [request(url, 1000 + i, steps) for i in range(n)]
        sequential_wall = time.perf_counter() - t
        t = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            concurrent_lat = list(pool.map(lambda i: request(url, 2000 + i, steps), range(n)))
        concurrent_wall = time.perf_counter() - t
    finally:
        proc.terminate()
        proc.wait(60)
    return {"start_to_model_loaded_s": ready_s,
            "sequential": {"latency": summarize(sequential), "wall_s": sequential_wall,
                           "requests_per_minute": 60 * n / sequential_wall},
            "concurrent": {"clients": clients, "latency": summarize(concurrent_lat), "wall_s": concurrent_wall,
                           "requests_per_minute": 60 * n / concurrent_wall}}


def measure_cli(model: str | None, steps: int, n: int, out: Path) -> dict:
    times = []
    for i in range(n):
        args = [sys.executable, "-m", "coreml_sd", "generate", PROMPT, "--seed", str(1000 + i), "--steps", str(steps),
                "--guidance-scale", "7.5", "--format", "png", "-o", str(out), "-q"]
        args += ["--model", model] if model else []
        t = time.perf_counter()
        subprocess.run(args, env=env(), check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    return {"latency": summarize(times), "wall_s": sum(times), "requests_per_minute": 60 * n / sum(times)}


def main(argv=None) -> None:
    from coreml_sd.bench.models import BUILTIN, default_cache_dir, resolve_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=BUILTIN)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--cli-runs", type=int, default=8)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--name", default=None)
    args = parser.parse_args(argv)
    bench_model = resolve_model(args.model, default_cache_dir())
    model = None if bench_model.path is None else str(bench_model.path)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        server = measure_server(model, args.steps, args.requests, args.clients, Path(tmp) / "served")
        cli = measure_cli(model, args.steps, args.cli_runs, Path(tmp) / "cli")
    result = {
        "benchmark": "serve", "machine": machine_info(), "model": bench_model.to_dict(), "steps": args.steps,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "server": server, "cli": cli,
        "ratio": {"requests_per_minute_server_over_cli": server["sequential"]["requests_per_minute"]
                  / cli["requests_per_minute"],
                  "latency_cli_over_server": cli["latency"]["median_s"] / server["sequential"]["latency"]["median_s"]},
    }
    path = write_result(args.name or f"serve_{bench_model.name}_cpu", result)
    print(f"server: {server['sequential']['requests_per_minute']:.0f} req/min sequential "
          f"(median {server['sequential']['latency']['median_s'] * 1000:.0f} ms), "
          f"{server['concurrent']['requests_per_minute']:.0f} req/min with {args.clients} clients; "
          f"cli: {cli['requests_per_minute']:.1f} req/min (median {cli['latency']['median_s']:.2f} s); "
          f"ratio {result['ratio']['requests_per_minute_server_over_cli']:.3g}x -> {path}")


if __name__ == "__main__":
    main()
