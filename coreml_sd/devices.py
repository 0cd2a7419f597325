"""Choosing where the torch backend runs and in which precision."""

from __future__ import annotations

import logging
import platform

from coreml_sd.errors import BackendUnavailable, choices_text

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def cpu_has_native_bf16() -> bool:
    """True where the CPU has bf16 matrix instructions (x86 AVX512-BF16 / AMX, Arm BF16).

    There bf16 runs about twice as fast as fp32 in torch; elsewhere it is emulated and slower.
    """
    machine = platform.machine().lower()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as fh:
            info = fh.read()
    except OSError:
        return False  # macOS/Windows: Apple CPUs do have BF16, but torch's CPU kernels gain little there
    flags = set()
    for line in info.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
            break
    if machine in ("x86_64", "amd64"):
        return bool({"avx512_bf16", "amx_bf16"} & flags)
    return "bf16" in flags


def resolve_device(device: str) -> str:
    import torch

    if device not in DEVICES:
        raise BackendUnavailable(f"unknown device {device!r}; valid devices: {choices_text(DEVICES)}")
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable("device 'cuda' requested but torch sees no CUDA GPU; valid here: cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise BackendUnavailable("device 'mps' requested but torch sees no Metal GPU (needs macOS on Apple silicon)")
    return device


def resolve_precision(precision: str, device: str) -> str:
    """`auto`: fp16 on GPUs, bf16 on CPUs with native bf16, fp32 otherwise."""
    if precision not in PRECISIONS:
        raise BackendUnavailable(f"unknown precision {precision!r}; valid: {choices_text(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device in ("cuda", "mps"):
        return "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def torch_dtype(precision: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
