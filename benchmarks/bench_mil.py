"""One SD1.5-architecture UNet step run by the mil executor next to torch eager, same precision.

The UNet (diffusers UNet2DConditionModel, SD 1.5 config, random weights from a seed) is converted
once with plain coremltools to an fp16 ML program (cached in --work). Then, in separate
processes so each peak RSS is its own:

  convert   trace + coremltools.convert + save               (time, peak RSS)
  mil       load the package, compile, warm up: peak RSS of the mil executor alone; then the same
            UNet in torch eager at the same dtype is built in that process and the two run in
            interleaved rounds, so a busy machine slows both alike and the ratio stays meaningful
  torch     torch eager alone: its peak RSS

Results (with machine facts and the load average, since the machine may be shared) go to
benchmarks/results/<name>.json. Usage:

  python -m benchmarks.bench_mil --preset small          # reduced config: a quick check
  python -m benchmarks.bench_mil --preset sd15           # full size (converting needs ~10+ GiB)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import machine_info, peak_rss_gib, sd15_config, summarize, write_result

SD15_UNET = dict(sd15_config().unet)
PRESETS = {
    "sd15": SD15_UNET,
    # Same block structure at a fifth of the width: ~1/25 of the weights, converts in a minute.
    "small": dict(SD15_UNET, block_out_channels=(64, 128, 256, 256), cross_attention_dim=768),
}


def _unet(preset: str, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**PRESETS[preset]).eval().requires_grad_(False)


def _inputs(batch: int, latent: int, context_dim: int = 768):
    gen = torch.Generator().manual_seed(0)
    return {
        "sample": torch.randn(batch, 4, latent, latent, generator=gen),
        "timestep": torch.full((batch,), 500.0),
        "encoder_hidden_states": torch.randn(batch, 77, context_dim, generator=gen),
    }


class Wrapper(torch.nn.Module):
    """The UNet returning a plain tensor (what tracing wants)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _rss_gib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def phase_convert(args) -> dict:
    from benchmarks import coremltools_fixes
    from coreml_sd.quiet_imports import import_coremltools

    ct = import_coremltools()
    coremltools_fixes.apply()
    start = time.perf_counter()
    unet = _unet(args.preset)
    feeds = _inputs(args.batch, args.latent)
    with torch.no_grad():
        traced = torch.jit.trace(Wrapper(unet), tuple(feeds.values()), strict=False, check_trace=False)
    del unet
    model = ct.convert(
        traced,
        inputs=[ct.TensorType(name=n, shape=tuple(v.shape)) for n, v in feeds.items()],
        outputs=[ct.TensorType(name="noise_pred")],
        convert_to="mlprogram",
        compute_precision=ct.precision.FLOAT16,
    )
    tmp = args.package.with_name("partial_" + args.package.name)
    model.save(str(tmp))
    tmp.rename(args.package)  # a half-written package never looks finished
    return {"convert_s": time.perf_counter() - start, "convert_peak_rss_gib": peak_rss_gib()}


def phase_mil(args) -> dict:

    from coreml_sd.memory import release_memory
    from coreml_sd.mil.executor import Executor
    from coreml_sd.mil.package import load_program

    from coreml_sd.memory import mmap_large_allocations

    mmap_large_allocations()  # as load_mil_runner does for the mil backend
    feeds = _inputs(args.batch, args.latent)
    start = time.perf_counter()
    program = load_program(args.package)
    loaded = time.perf_counter()
    executor = Executor(program, device=args.device, precision_mode="fast", fast_dtype=args.fast_dtype)
    del program
    release_memory()  # as load_mil_component does: the fp16 numpy weights go back to the OS
    compiled = time.perf_counter()
    first = executor(feeds)["noise_pred"]  # warm-up
    warm = time.perf_counter()
    result = {
        "load_s": loaded - start, "compile_and_prepare_s": compiled - loaded, "first_call_s": warm - compiled,
        "mil_steps": executor.num_steps, "mil_fused": executor.fused, "mil_peak_rss_gib": peak_rss_gib(),
        "mil_rss_after_first_call_gib": _rss_gib(),
    }
    if args.device == "cuda":
        result["mil_peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.fast_dtype]
    unet = _unet(args.preset).to(args.device, dtype)
    module = Wrapper(unet)
    cast = {k: (v.to(dtype) if k != "timestep" else v).to(args.device) for k, v in feeds.items()}
    with torch.inference_mode():
        reference = module(**cast).float()
        times = {"mil": [], "torch": []}
        for _ in range(args.rounds):
            for name, fn in (("mil", lambda: executor(feeds)), ("torch", lambda: module(**cast))):
                _sync(args.device)
                t0 = time.perf_counter()
                fn()
                _sync(args.device)
                times[name].append(time.perf_counter() - t0)
    from coreml_sd.metrics import psnr

    result["psnr_mil_vs_torch_db"] = psnr(reference.float(), first.float())
    result["mil"] = summarize(times["mil"])
    result["torch"] = summarize(times["torch"])
    result["ratio_median"] = result["mil"]["median_s"] / result["torch"]["median_s"]
    return result


def phase_torch(args) -> dict:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.fast_dtype]
    unet = _unet(args.preset)
    params = sum(p.numel() for p in unet.parameters())
    module = Wrapper(unet.to(args.device, dtype))
    feeds = {k: (v.to(dtype) if k != "timestep" else v).to(args.device) for k, v in _inputs(args.batch, args.latent).items()}
    with torch.inference_mode():
        for _ in range(2):
            module(**feeds)
    result = {"torch_peak_rss_gib": peak_rss_gib(), "params": params, "fp16_weights_gib": params * 2 / 2**30}
    if args.device == "cuda":
        result["torch_peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def _run_phase(phase: str, args) -> dict:
    out = args.work / f"{phase}.json"
    cmd = [sys.executable, "-m", "benchmarks.bench_mil", "--phase", phase, "--phase-out", str(out)] + args.passthrough
    print(f"[bench_mil] {phase}: {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def _parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--latent", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--fast-dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    ap.add_argument("--device", choices=("cpu", "cuda", "mps"), default="cpu")
    ap.add_argument("--work", type=Path, default=Path(".cache/bench_mil"))
    ap.add_argument("--name", default=None, help="result file name (default mil_step_<preset>_<device>)")
    ap.add_argument("--phase", choices=("convert", "mil", "torch"), help=argparse.SUPPRESS)
    ap.add_argument("--phase-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.package = args.work / f"unet_{args.preset}_b{args.batch}_l{args.latent}_fp16.mlpackage"
    args.passthrough = ["--preset", args.preset, "--batch", str(args.batch), "--latent", str(args.latent),
                        "--rounds", str(args.rounds), "--fast-dtype", args.fast_dtype, "--work", str(args.work),
                        "--device", args.device]
    return args


def main() -> None:
    args = _parse()
    if args.phase:
        result = {"convert": phase_convert, "mil": phase_mil, "torch": phase_torch}[args.phase](args)
        args.phase_out.write_text(json.dumps(result))
        return
    data = {"machine": machine_info(), "load_average_start": os.getloadavg(),
            "config": {k: v for k, v in vars(args).items() if k in ("preset", "batch", "latent", "rounds", "fast_dtype", "device")},
            "command": "python -m benchmarks.bench_mil " + " ".join(sys.argv[1:])}
    if args.package.exists():  # converted by an earlier run: report that run's conversion figures
        earlier = args.work / "convert.json"
        data["convert"] = {"cached": str(args.package), **(json.loads(earlier.read_text()) if earlier.exists() else {})}
    else:
        data["convert"] = _run_phase("convert", args)
    data["torch_threads"] = torch.get_num_threads()
    data["run"] = _run_phase("mil", args)
    data["torch_alone"] = _run_phase("torch", args)
    data["load_average_end"] = os.getloadavg()
    weights = data["torch_alone"]["fp16_weights_gib"]
    data["mil_peak_rss_vs_fp16_weights"] = data["run"]["mil_peak_rss_gib"] / weights
    data["target_mil_peak_rss_vs_fp16_weights"] = 1.4
    path = write_result(args.name or f"mil_step_{args.preset}_{args.device}", data)
    run = data["run"]
    print(f"mil {run['mil']['median_s']:.2f} s, torch eager {run['torch']['median_s']:.2f} s "
          f"({args.fast_dtype}): ratio {run['ratio_median']:.2f}; peak RSS mil {run['mil_peak_rss_gib']:.2f} GiB, "
          f"({data['mil_peak_rss_vs_fp16_weights']:.2f}x the fp16 weights), "
          f"torch {data['torch_alone']['torch_peak_rss_gib']:.2f} GiB; PSNR {run['psnr_mil_vs_torch_db']:.1f} dB -> {path}")


if __name__ == "__main__":
    main()
