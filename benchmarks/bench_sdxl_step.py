"""One SDXL UNet step (batch 2 for guidance, 1024x1024) on our torch backend next to diffusers, in fp32 and
bf16, and the mil executor on a converted Unet.mlpackage, in one run.

Rounds are interleaved and their order rotates, so a busy machine slows every variant alike; a
ratio is taken within each round, then the median over rounds. The fp32 UNet alone is 10.3 GB, so
the run goes in phases on one module (a 24 GiB machine cannot hold fp32 and bf16 copies and a
mil program at once):

  fp32   diffusers' UNet2DConditionModel called as StableDiffusionXLPipeline calls it
         (added_cond_kwargs text_embeds / time_ids), next to our torch backend's UNet over the
         same module (a Conditioning in, diffusers' arguments out: ours runs diffusers' modules)
  bf16   the same module cast to bf16 in place, both again
  mil    (--converted FOLDER) the folder's Unet.mlpackage run by the mil executor in fast mode
         (bf16 compute where the CPU has it), next to ours in bf16

Each output is compared with the fp32 one (PSNR), so a faster variant says what it costs.
Random weights (diffusers' init): latency does not depend on them.

    python -m benchmarks.bench_sdxl_step [--rounds 3] [--converted /tmp/coreml-sd-bench/converted-sdxl-file]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine_info, peak_rss_gib, summarize, write_result


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def inputs(latent: int = 128, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    side = latent * 8
    return {"sample": torch.randn(2, 4, latent, latent, generator=gen), "timestep": torch.full((2,), 500.0),
            "context": torch.randn(2, 77, 2048, generator=gen), "text_embeds": torch.randn(2, 1280, generator=gen),
            "time_ids": torch.tensor([[side, side, 0, 0, side, side]] * 2, dtype=torch.float32)}


def variants(unet, ours, x: dict, dtype) -> dict:
    """name -> call, at `dtype`: diffusers' call and ours on the same module."""
    from coreml_sd.conditioning import Conditioning

    cast = {k: v.to(dtype) for k, v in x.items()}
    cond = Conditioning(x["context"], extra={"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]})
    name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]

    def theirs():
        return unet(cast["sample"], cast["timestep"], encoder_hidden_states=cast["context"],
                    added_cond_kwargs={"text_embeds": cast["text_embeds"], "time_ids": cast["time_ids"]}).sample

    return {f"diffusers-{name}": theirs, f"ours-{name}": lambda: ours.predict(x["sample"], x["timestep"], cond)}


def run_rounds(calls: dict, rounds: int, times: dict) -> dict:
    """Warm up each call, then `rounds` rounds in rotating order; returns each call's last output."""
    outputs = {}
    with torch.inference_mode():
        for name, fn in calls.items():
            outputs[name] = fn().float()
            times.setdefault(name, [])
        names = list(calls)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                times[name].append(timed(calls[name]))
                print(f"round {r + 1} {name}: {times[name][-1]:.2f} s", flush=True)
    return outputs


def ratio(times: dict, a: str, b: str) -> float:
    return float(np.median([x / y for x, y in zip(times[a], times[b])]))


def mil_unet(folder: Path):
    from coreml_sd.backends.mil_backend import load_mil_component

    return load_mil_component([Path(folder) / "Unet.mlpackage"], "unet", device="cpu", precision_mode="fast")


def main() -> None:
    from diffusers import UNet2DConditionModel

    from coreml_sd.backends.torch_backend import TorchUNet
    from coreml_sd.checkpoint.config import shipped_config
    from coreml_sd.families import get_family
    from coreml_sd.metrics import psnr

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--converted", type=Path, default=None, help="a converted SDXL folder: also time mil")
    ap.add_argument("--name", default="sdxl_step_cpu")
    args = ap.parse_args()

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**shipped_config("sdxl").unet).eval().requires_grad_(False)
    params = sum(p.numel() for p in unet.parameters())
    x, times, outputs = inputs(), {}, {}
    family = get_family("sdxl")
    outputs.update(run_rounds(variants(unet, TorchUNet(unet, torch.float32, family), x, torch.float32),
                              args.rounds, times))
    rss_fp32 = peak_rss_gib()
    unet.to(torch.bfloat16)  # in place, parameter by parameter
    outputs.update(run_rounds(variants(unet, TorchUNet(unet, torch.bfloat16, family), x, torch.bfloat16),
                              args.rounds, times))
    mil_facts = {}
    if args.converted:
        from coreml_sd.conditioning import Conditioning

        start = time.perf_counter()
        mil = mil_unet(args.converted)
        mil_facts = {"load_s": round(time.perf_counter() - start, 1), "runs_on": mil.runs_on,
                     "package": str(args.converted / "Unet.mlpackage"),
                     "note": "the package holds the converted random model's weights, not this module's: latency "
                             "is compared, outputs are not"}
        cond = Conditioning(x["context"], extra={"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]})
        ours = TorchUNet(unet, torch.bfloat16, family)
        run_rounds({"ours-bf16 (next to mil)": lambda: ours.predict(x["sample"], x["timestep"], cond),
                    "mil-fast": lambda: mil.predict(x["sample"], x["timestep"], cond)}, args.rounds, times)
    ratios = {"ours/diffusers fp32": ratio(times, "ours-fp32", "diffusers-fp32"),
              "ours/diffusers bf16": ratio(times, "ours-bf16", "diffusers-bf16"),
              "ours bf16/ours fp32": ratio(times, "ours-bf16", "ours-fp32")}
    if args.converted:
        ratios["mil/ours bf16"] = ratio(times, "mil-fast", "ours-bf16 (next to mil)")
    print("ratios (median of per-round ratios):", {k: round(v, 3) for k, v in ratios.items()})
    ref = outputs["diffusers-fp32"].numpy()
    quality = {k: round(psnr(ref, v.numpy()), 2) for k, v in outputs.items() if k != "diffusers-fp32"}
    result = {
        "benchmark": "unet_step_sdxl_torch_cpu",
        "model": f"SDXL 1.0 base UNet architecture, random weights (diffusers init), {params / 1e9:.3f} B parameters",
        "shape": {"sample": [2, 4, 128, 128], "encoder_hidden_states": [2, 77, 2048], "text_embeds": [2, 1280],
                  "time_ids": [2, 6], "image": "1024x1024"},
        "machine": machine_info(),
        "step_seconds": {k: summarize(v) for k, v in times.items()},
        "ratios": ratios,
        "ratio_method": "median over rounds of the ratio within each round (order rotated per round)",
        "targets": {"ours/diffusers fp32": "<= 1.0", "ours/diffusers bf16": "<= 1.0", "mil/ours bf16": "<= 1.2"},
        "psnr_db_vs_diffusers_fp32": quality,
        "mil": mil_facts,
        "peak_rss_gib_fp32_phase": round(rss_fp32, 2),
        "peak_rss_gib": round(peak_rss_gib(), 2),
    }
    print("wrote", write_result(args.name, result))


if __name__ == "__main__":
    main()
