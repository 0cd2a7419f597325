"""`torch.compile` for the torch backend's UNet: CUDA graphs on GPUs, inductor's C++ kernels on CPUs.

GPU: at batch 2 (the guidance pair) an SD 1.5 UNet step in eager fp16 costs about 26 ms on an H100
while its arithmetic needs about 1.6 ms: most of the step is Python and one kernel launch per
op (~1,000 launches). What closes that gap, in order of effect:

1. CUDA graphs: the whole step is recorded once and replayed as one launch (inductor's
   `triton.cudagraphs`, which `reduce-overhead` and `max-autotune` turn on). Shapes must stay
   fixed, and they do: the pipeline always calls the UNet with the same batch and size.
2. Inductor's fusions: GroupNorm+SiLU, bias+activation and the residual adds fold into the
   convolution/GEMM epilogues or into one Triton kernel each.
3. channels_last: cuDNN's tensor-core convolutions work in NHWC; in NCHW each one transposes.
4. Fused QKV projections: one GEMM for q, k and v of each self-attention instead of three
   (diffusers' `fuse_qkv_projections`); attention itself stays torch's fused SDPA (flash).
5. 1x1 convolutions as matrix multiplies (`conv_1x1_as_mm`): the UNet's proj_in/proj_out and
   shortcut convolutions then use the autotuned GEMM templates.

CPU (`CPU_OPTIONS`): inductor writes C++/OpenMP kernels; channels_last lets oneDNN's bf16
convolutions (AMX) run without reordering every activation, and GroupNorm, SiLU, the residual
adds and the GEGLU gate become a few fused loops instead of a dozen passes over memory. What it
buys, and what compiling costs, is in benchmarks/README.md (`results/torch_step_cpu.json`).

Compiling happens at the first call (minutes on a CPU). The compiled graphs are cached under the
coreml-sd cache folder (`cache_dir()`: inductor's FX-graph and AOT-autograd caches), so a later
launch with the same model, shapes and torch version loads them instead of compiling; only
dynamo's tracing of the Python is repeated. `auto` (`resolve_mode`) compiles only where that was
measured to pay. The mode names are importable without torch (the CLI lists them).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from coreml_sd.errors import InputError, choices_text

log = logging.getLogger(__name__)

# mode -> inductor options (torch.compile takes a mode or options, not both: these are the
# modes' own settings plus the SD-specific ones above).
COMPILE_MODES: dict[str, dict] = {
    "default": {"conv_1x1_as_mm": True},
    "reduce-overhead": {"conv_1x1_as_mm": True, "triton.cudagraphs": True},
    "max-autotune": {"conv_1x1_as_mm": True, "triton.cudagraphs": True, "max_autotune": True,
                     "coordinate_descent_tuning": True},
    "max-autotune-no-cudagraphs": {"conv_1x1_as_mm": True, "max_autotune": True, "coordinate_descent_tuning": True},
}
AUTO = "auto"
# What `auto` compiles with, per device (None: eager). CUDA: launch-bound eager (see above); MPS:
# inductor's Metal backend is not what the GPU path was measured with; CPU: in bf16 (CPUs with
# native bf16) a compiled SD 1.5 step took 0.74x diffusers' bf16 step (benchmarks/README.md,
# results/torch_step_cpu.json); fp32 on a CPU was not measured, so it stays eager (AUTO_CPU_DTYPES).
AUTO_MODES: dict[str, str | None] = {"cuda": "reduce-overhead", "mps": None, "cpu": "default"}
AUTO_CPU_DTYPES = ("bfloat16",)
# Added on a CPU: options that only apply there.
CPU_OPTIONS: dict = {}
CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def check_mode(mode: str) -> str:
    if mode != AUTO and mode not in COMPILE_MODES:
        raise InputError(f"unknown torch compile mode {mode!r}; valid modes: {choices_text([*COMPILE_MODES, AUTO])}")
    return mode


def resolve_mode(mode: str | None, device: str, dtype=None) -> str | None:
    """The mode to compile with on `device` (None: stay eager); `auto` per AUTO_MODES, and on a CPU
    only for the precisions it was measured in (`dtype`: the UNet's torch dtype)."""
    if mode is None:
        return None
    check_mode(mode)
    if mode != AUTO:
        return mode
    if device == "cpu" and str(dtype).removeprefix("torch.") not in AUTO_CPU_DTYPES:
        return None
    return AUTO_MODES.get(device)


def uses_cuda_graphs(mode: str, device: str) -> bool:
    return device == "cuda" and bool(COMPILE_MODES[check_mode(mode)].get("triton.cudagraphs"))


def cache_dir() -> Path:
    """Where inductor keeps compiled graphs: $TORCHINDUCTOR_CACHE_DIR if set, else the coreml-sd cache
    folder's torch-compile/ (set for inductor here, before it first looks)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    from coreml_sd.cachedir import cache_root

    path = cache_root() / "torch-compile"
    os.environ[CACHE_ENV] = str(path)
    return path


def inductor_options(mode: str, device: str) -> dict:
    options = dict(COMPILE_MODES[mode])
    if device != "cuda":
        options.pop("triton.cudagraphs", None)  # CUDA graphs exist only on CUDA
    if device == "cpu":
        options.update(CPU_OPTIONS)
    return options


def compile_unet(unet, mode: str, *, device: str, backend: str = "inductor"):
    """Prepare `unet` (in place) and return its compiled module. `backend` is torch.compile's
    (tests use "eager" to check the preparation without waiting for inductor)."""
    import torch

    check_mode(mode)
    if mode == AUTO:
        raise InputError("resolve 'auto' with resolve_mode(mode, device) first")
    if hasattr(unet, "fuse_qkv_projections") and device != "cpu":
        unet.fuse_qkv_projections()
    unet.to(memory_format=torch.channels_last)
    options = inductor_options(mode, device) if backend == "inductor" else None
    where = cache_dir() if backend == "inductor" else None
    log.info("compiling the UNet with torch.compile (%s, %s) at its first call; compiled graphs cached in %s",
             mode, backend, where)
    return torch.compile(unet, backend=backend, options=options, fullgraph=False, dynamic=False)
