"""`coreml-sd doctor`: what this machine can run, and why not where it cannot.

Core ML (and why not), torch (version, CUDA, MPS), the CPU (cores, load, native bf16, the thread
count coreml-sd would choose) and the cache folder. Every probe is guarded: a missing library is
a line of the report, never an exception.
"""

from __future__ import annotations

import platform
import sys
from importlib import metadata
from typing import Any

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "bf16", "asimd")
SD15_PARAMS = 1_066_000_000  # text encoder + UNet + VAE of SD 1.5, for the thread choice shown


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def cpu_flags() -> list[str]:
    """The CPU features that decide bf16 and kernel speed, as /proc/cpuinfo names them (Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    have = set(line.split(":", 1)[1].split())
                    return [f for f in CPU_FLAGS if f in have]
    except OSError:
        pass
    return []


def coreml_report() -> dict[str, Any]:
    from coreml_sd.backends.coreml_backend import runtime_unavailable_reason

    reason = runtime_unavailable_reason()
    return {"available": reason is None, "reason": reason, "coremltools": _version("coremltools")}


def torch_report() -> dict[str, Any]:
    try:
        import torch
    except ImportError as exc:
        return {"installed": False, "reason": f"torch is not installed ({exc}); the torch and mil backends need it"}
    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return {
        "installed": True, "version": torch.__version__,
        "cuda": {"available": cuda, "version": torch.version.cuda,
                 "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
                 "reason": None if cuda else ("this torch build has no CUDA" if torch.version.cuda is None
                                              else "no CUDA GPU visible")},
        "mps": {"available": mps, "reason": None if mps else "needs macOS on Apple silicon"},
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "default_threads": torch.get_num_threads(),
    }


def cpu_report() -> dict[str, Any]:
    import os

    from coreml_sd.bench.machine import cpu_model, load_average
    from coreml_sd.devices import cpu_has_native_bf16
    from coreml_sd.threads import SMALL_MODEL_PARAMS, choose_threads, other_load, physical_cores

    cores, load = physical_cores(), other_load()
    native = cpu_has_native_bf16()
    return {
        "model": cpu_model(), "logical_cores": os.cpu_count(), "physical_cores": cores,
        "load_average": load_average(), "cores_busy_elsewhere": load, "flags": cpu_flags(), "native_bf16": native,
        "auto_precision": "bf16" if native else "fp32",
        "threads": {"small model (< {} M parameters)".format(SMALL_MODEL_PARAMS // 10**6):
                    choose_threads(0, cores, load), "SD 1.5": choose_threads(SD15_PARAMS, cores, load)},
    }


def system_report() -> dict[str, Any]:
    from coreml_sd import __version__
    from coreml_sd.cachedir import cache_usage

    torch = torch_report()
    return {
        "coreml_sd": __version__,
        "platform": {"os": platform.platform(terse=True), "machine": platform.machine(),
                     "python": platform.python_version(), "executable": sys.executable},
        "coreml": coreml_report(),
        "mil": {"available": bool(torch.get("installed")) and _version("coremltools") is not None,
                "reason": None if torch.get("installed") and _version("coremltools") else
                "runs converted packages with torch kernels: needs torch and coremltools"},
        "torch": torch,
        "cpu": cpu_report(),
        "cache": cache_usage(),
    }


def _yes(ok: bool, reason: str | None) -> str:
    return "yes" if ok else f"no ({reason})"


def render_report(r: dict[str, Any]) -> str:
    """The report as aligned lines for a terminal."""
    t, cpu, cache = r["torch"], r["cpu"], r["cache"]
    lines = [f"coreml-sd {r['coreml_sd']} on {r['platform']['os']} ({r['platform']['machine']}), "
             f"Python {r['platform']['python']}",
             f"  Core ML        {_yes(r['coreml']['available'], r['coreml']['reason'])}"
             f"; coremltools {r['coreml']['coremltools'] or 'not installed'}",
             f"  mil executor   {_yes(r['mil']['available'], r['mil']['reason'])}"]
    if t["installed"]:
        cuda = t["cuda"]
        gpus = ", ".join(cuda["devices"]) if cuda["available"] else _yes(False, cuda["reason"])
        lines += [f"  torch          {t['version']}, CPU kernels {t['cpu_capability']}",
                  f"  CUDA           {gpus}",
                  f"  MPS            {_yes(t['mps']['available'], t['mps']['reason'])}"]
    else:
        lines.append(f"  torch          {t['reason']}")
    bf16 = "native" if cpu["native_bf16"] else "emulated (slower than fp32: --precision auto uses fp32)"
    load = cpu["load_average"]
    lines += [f"  CPU            {cpu['model']}: {cpu['physical_cores']} physical / {cpu['logical_cores']} logical "
              f"cores, load average {load[0] if load else '?'}, {cpu['cores_busy_elsewhere']:g} busy elsewhere now",
              f"  bf16           {bf16}; flags {' '.join(cpu['flags']) or '-'}",
              "  threads        " + ", ".join(f"{k}: {v}" for k, v in cpu["threads"].items())
              + " (override with --threads)",
              f"  cache          {cache['path']} ({cache['set_by']}): {cache['size_bytes'] / 2**20:.1f} MiB"
              + ("" if cache["exists"] else ", not created yet")]
    lines += [f"    {name:<12} {size / 2**20:8.1f} MiB" for name, size in cache["entries"].items()]
    return "\n".join(lines)
