"""All requested backends on one model, into one result (see benchmarks/schema.json).

Each backend is measured in a fresh process by default (`isolation="process"`): the others'
models are gone, its cold load is really the first in its process, and its peak memory is its
own. `inline` measures in this process one after the other (releasing each model first): faster
to start, for tests and quick looks, but imports and allocator caches carry over.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from coreml_sd.conversion_names import ATTENTION_IMPLEMENTATIONS
from coreml_sd.bench.machine import busy_note, load_average, machine_info
from coreml_sd.bench.measure import Settings, Task, measure_run, new_entry, skipped_entry
from coreml_sd.bench.models import (BenchModel, ConversionFailed, ConvertOptions, converted_folder, is_converted,
                                    resolve_model)
from coreml_sd.bench.targets import RunSpec, unavailable_reason
from coreml_sd.errors import InputError, choices_text

SCHEMA = "coreml-sd.bench"
SCHEMA_VERSION = 1
ISOLATIONS = ("process", "inline")
ATTENTIONS = ("auto", *ATTENTION_IMPLEMENTATIONS)
# `--attention auto`: Apple's advice, split einsum for the Neural Engine and the original layout
# for the GPU and CPU. The mil executor runs on torch devices, where the original layout's batched
# matmuls over all heads are fewer, larger ops (SD 1.5's UNet: 32 softmax vs 256 per-head ones).
AUTO_ATTENTION = {"coreml-ane": "split_einsum_v2"}


@dataclass(frozen=True)
class BenchRequest:
    runs: tuple[RunSpec, ...]
    model: str | None = None  # None: the default random SD 1.5 model
    settings: Settings = field(default_factory=Settings)
    cache_dir: Path | None = None
    attention: str = "auto"  # conversion for mil/coreml-*
    weights: str = "fp16"  # conversion weight compression for mil/coreml-*
    isolation: str = "process"
    command: str = ""

    def validate(self) -> None:
        for name, value, valid in (("isolation", self.isolation, ISOLATIONS),
                                   ("attention", self.attention, ATTENTIONS)):
            if value not in valid:
                raise InputError(f"{name} {value!r} is not one of {choices_text(valid)}")
        if not self.runs:
            raise InputError("no backends to measure")


def convert_options(request: BenchRequest, run: RunSpec) -> ConvertOptions:
    attention = request.attention
    if attention == "auto":
        attention = AUTO_ATTENTION.get(run.backend, "original")
    s = request.settings
    return ConvertOptions(attention=attention, weights=request.weights, width=s.width, height=s.height,
                          img2img=bool(s.img2img_strength))


def _run_in_process(task: Task, progress: Callable[[str], None]) -> dict:
    """Measure in a fresh `python -m coreml_sd.bench.worker` (its stdout goes to our stderr)."""
    with tempfile.TemporaryDirectory(prefix="coreml-sd-bench-") as tmp:
        task_file, out_file = Path(tmp) / "task.json", Path(tmp) / "result.json"
        task_file.write_text(json.dumps(task.to_dict()))
        proc = subprocess.run([sys.executable, "-m", "coreml_sd.bench.worker", "measure", str(task_file),
                               str(out_file)], stdout=sys.stderr, stderr=None)
        if proc.returncode == 0 and out_file.is_file():
            return json.loads(out_file.read_text())
    how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
    hint = " (killed: out of memory?)" if proc.returncode in (-9, 137) else ""
    progress(f"{task.run.label}: worker ended with {how}{hint}")
    return {**new_entry(task.run), "status": "failed", "reason": f"benchmark worker ended with {how}{hint}"}


def _make_random_in_process(folder: Path, config: str, seed: int) -> None:
    """Building SD 1.5 in fp32 takes GBs: a process of its own returns them."""
    subprocess.run([sys.executable, "-m", "coreml_sd.bench.worker", "make-random", str(folder), config, str(seed)],
                   stdout=sys.stderr, check=True)


def _prepare(request: BenchRequest, model: BenchModel, run: RunSpec, progress) -> tuple[str | None, dict | None]:
    """(path the backend loads, conversion record) for one run."""
    if run.spec.engine in ("mil", "coreml"):
        conv = converted_folder(model, convert_options(request, run), request.cache_dir, progress,
                                threads=request.settings.threads)
        return str(conv.path), conv.to_dict()
    return (None if model.path is None else str(model.path)), None


def measure_one(request: BenchRequest, model: BenchModel, run: RunSpec, progress) -> dict:
    reason = unavailable_reason(run)
    if reason:
        progress(f"{run.label}: skipped: {reason}")
        return skipped_entry(run, reason)
    if run.spec.engine in ("torch", "diffusers") and is_converted(model.path):
        reason = f"{model.name} is a converted model folder: {run.backend} needs the source checkpoint"
        progress(f"{run.label}: skipped: {reason}")
        return skipped_entry(run, reason)
    try:
        path, conversion = _prepare(request, model, run, progress)
    except ConversionFailed as exc:
        return {**new_entry(run), "status": "failed", "reason": str(exc)}
    task = Task(run, path, request.settings)
    progress(f"{run.label}: measuring ({request.isolation})")
    entry = _run_in_process(task, progress) if request.isolation == "process" else measure_run(task, progress)
    entry.update(model_path=path, conversion=conversion, isolation=request.isolation)
    return entry


def run_bench(request: BenchRequest, progress: Callable[[str], None] = lambda s: None) -> dict:
    """Measure every run of `request`; returns the result document."""
    from coreml_sd.bench.models import default_cache_dir

    request.validate()
    cache = Path(request.cache_dir or default_cache_dir())
    request = replace(request, cache_dir=cache)
    before, start = load_average(), time.perf_counter()
    make = _make_random_in_process if request.isolation == "process" else None
    if request.model is None or not Path(request.model).exists():
        progress(f"model: {request.model or 'sd15-random'} (cache {cache})")
    model = resolve_model(request.model, cache, make_random=make)
    runs = [measure_one(request, model, run, progress) for run in request.runs]
    return {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": request.command,
        "machine": machine_info(),
        "model": model.to_dict(),
        "settings": {**request.settings.to_dict(), "attention": request.attention, "weights": request.weights,
                     "isolation": request.isolation},
        "load_average": {"before": before, "after": load_average()},
        "busy": busy_note(before),
        "seconds": time.perf_counter() - start,
        "runs": runs,
    }
