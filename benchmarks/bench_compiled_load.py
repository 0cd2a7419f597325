"""Loading a UNet for the mil executor from its `.mlpackage` vs its `.mlmodelc`: time and peak memory.

    python benchmarks/bench_compiled_load.py [--sizes tiny,medium] [--runs 3] [--dir DIR]

Makes (once, if missing) a UNet package with `coreml-sd convert`'s emitter (split-einsum-v2
attention, fp16 weights, random weights; sizes below) and the `.mlmodelc` written from it by
`coreml_sd.mil.compiled.write_compiled_model`, then loads each in fresh processes, alternating:
`load_program(path)` (package: the spec proto; compiled: model.mil parsed into the same proto;
then coremltools' loader reads the weights) and `Executor(program)` (constants materialized). Peak
RSS is the process's high-water mark (ru_maxrss) after both, imports included; the model is made
in a process of its own (a child's ru_maxrss starts from its parent's high-water mark on Linux).

Sizes: `tiny` is the test suite's UNet (32/64 channels); `medium` has SD 1.5's layout at half its
channel widths (160/320/640/640, 2 layers per block, 768-wide context, 32x32 latents).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import SD15_UNET, machine_info, peak_rss_gib, summarize, write_result  # noqa: E402

DEFAULT_DIR = Path(os.environ.get("TMPDIR", "/tmp")) / "coreml-sd-bench" / "compiled-load"
SIZES = {
    "tiny": dict(sample_size=8, layers_per_block=1, block_out_channels=(32, 64),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, norm_num_groups=8),
    "medium": dict(SD15_UNET, sample_size=32, block_out_channels=(160, 320, 640, 640)),
}


def make(size: str, folder: Path) -> None:
    """Unet.mlpackage and Unet.mlmodelc of a random-weight UNet of `size` in `folder`."""
    import torch
    from diffusers import UNet2DConditionModel

    from conversion.ane import unet_from_diffusers
    from conversion.export import TensorIO, build_program, to_mlmodel
    from coreml_sd.mil.compiled import write_compiled_model

    config = {"in_channels": 4, "out_channels": 4, "attention_head_dim": 8, **SIZES[size]}
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).eval().requires_grad_(False).half()
    rewrite = unet_from_diffusers(unet, attention="split_einsum_v2")
    s, c = config["sample_size"], config["cross_attention_dim"]
    ins = [TensorIO("sample", (2, 4, s, s), "fp16"), TensorIO("timestep", (2,), "fp16"),
           TensorIO("encoder_hidden_states", (2, c, 1, 77), "fp16")]
    with torch.no_grad():
        prog, _, _ = build_program(lambda ops, x, t, e: [rewrite(x, t, e, ops)], rewrite, ins,
                                   [TensorIO("noise_pred", (2, 4, s, s), "fp32")], min_target="macOS13")
    folder.mkdir(parents=True, exist_ok=True)
    package = to_mlmodel(prog, min_target="macOS13", package_dir=folder / "Unet.mlpackage")
    write_compiled_model(package, folder / "Unet.mlmodelc")


def measure(path: Path) -> dict:
    """One load in this (fresh) process."""
    t0 = time.perf_counter()
    from coreml_sd.mil import Executor, load_program
    from coreml_sd.quiet_imports import import_coremltools

    import_coremltools()
    t_import = time.perf_counter() - t0
    t1 = time.perf_counter()
    program = load_program(path)
    t_load = time.perf_counter() - t1
    t2 = time.perf_counter()
    executor = Executor(program, device="cpu", precision_mode="fast", fast_dtype="fp32")
    t_executor = time.perf_counter() - t2
    result = {"import_s": t_import, "load_program_s": t_load, "executor_s": t_executor,
              "ready_s": t_load + t_executor, "steps": executor.num_steps, "peak_rss_gib": peak_rss_gib()}
    if path.suffix == ".mlmodelc":  # the text parse alone (after the peak was taken): part of load_program_s
        from coreml_sd.mil.mil_text_read import parse_program_text

        text = (path / "model.mil").read_text()
        t3 = time.perf_counter()
        parse_program_text(text)
        result["parse_text_s"] = time.perf_counter() - t3
    return result


def child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def bench_size(size: str, folder: Path, runs: int) -> dict:
    if not (folder / "Unet.mlmodelc" / "model.mil").is_file():
        t = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--make", size, str(folder)], check=True)
        print(f"made the {size} UNet in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    paths = {"package": folder / "Unet.mlpackage", "compiled": folder / "Unet.mlmodelc"}
    results: dict[str, list] = {kind: [] for kind in paths}
    for _ in range(runs):
        for kind, path in paths.items():
            results[kind].append(child(["--child", str(path)]))
    keys = ("load_program_s", "executor_s", "ready_s", "parse_text_s")
    summary = {kind: {key: summarize([r[key] for r in rs]) for key in keys if key in rs[0]}
               | {"peak_rss_gib": max(r["peak_rss_gib"] for r in rs), "steps": rs[0]["steps"]}
               for kind, rs in results.items()}
    summary["compiled_over_package"] = {
        key: summary["compiled"][key]["median_s"] / summary["package"][key]["median_s"]
        for key in ("load_program_s", "ready_s")} | {
        "peak_rss": summary["compiled"]["peak_rss_gib"] / summary["package"]["peak_rss_gib"]}
    files = {"package_bytes": folder_bytes(paths["package"]), "compiled_bytes": folder_bytes(paths["compiled"]),
             "model_mil_bytes": (paths["compiled"] / "model.mil").stat().st_size,
             "weight_bin_bytes": (paths["compiled"] / "weights" / "weight.bin").stat().st_size}
    return {"files": files, "summary": summary, "runs": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,medium")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--make", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child)))
        return
    if args.make:
        make(args.make[0], Path(args.make[1]))
        return
    sizes = [s for s in args.sizes.split(",") if s]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown size {unknown[0]!r}; valid: {', '.join(SIZES)}")
    result = {
        "benchmark": "compiled_load",
        "command": f"python benchmarks/bench_compiled_load.py --sizes {args.sizes} --runs {args.runs}",
        "model": {"component": "unet", "attention": "split_einsum_v2", "weights": "fp16 (random)",
                  "executor": "mil cpu fast fp32", "configs": {s: SIZES[s] for s in sizes}},
        "sizes": {s: bench_size(s, args.dir / s, args.runs) for s in sizes},
        "machine": machine_info(),
        "load_average_1_5_15": os.getloadavg(),  # the machine is shared: other jobs slow the timings
    }
    path = write_result("compiled_load", result)
    print(json.dumps({s: r["summary"] for s, r in result["sizes"].items()}, indent=2))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
