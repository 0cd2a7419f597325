"""One backend's measurements on one model: load (cold, warm), text encoder, UNet step, VAE
decoder, a full generation, peak memory.

The same workload for every backend, so numbers compare:

* load: the model opened and built for the backend, as `Pipeline.load` does (diffusers:
  `StableDiffusionPipeline.from_pretrained`). Cold is the first load in this process, after the
  model's files were dropped from the page cache where the OS allows; warm is a second load after
  the first was released (files cached, libraries imported, compiled Core ML models cached).
* text encoder: one prompt's token ids -> embeddings.
* UNet step: what one sampler step costs the network: the guided model output, i.e. the UNet on
  the (unconditional, conditional) batch-2 pair and the guidance mix, at the image size's latent
  shape. Warm-up calls first (recorded: a compiled backend compiles there), then timed calls.
* VAE decoder: one latent -> image.
* end to end: one full generation, prompt to PIL image (text encoding, every sampler step, VAE
  decoding: what a user waits for), with a recorded step count; its seconds per step beside it.
* few steps: the same for the few-step recipe of LCM-LoRA and distilled models (LCM, 4 steps,
  guidance 1: one UNet pass per step), the time-to-image they buy.
* img2img (with `img2img_strength` S): the VAE encoder (one image -> latent distribution), and one
  img2img generation of the end-to-end steps from a picture, image in to image out; it runs about
  S x steps sampler steps, and its ratio to the text-to-image figure is recorded.

Device work is synchronised before a timer stops. Peak memory is the process's resident set over
the whole measurement (sampled), plus the CUDA allocator's peak on a CUDA device.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable


from coreml_sd.bench.machine import RSSSampler, evict_page_cache, load_average
from coreml_sd.bench.stats import summarize
from coreml_sd.bench.targets import RunSpec
from coreml_sd.errors import BackendUnavailable

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "a photograph of an astronaut riding a horse"


@dataclass(frozen=True)
class Settings:
    warmup: int = 1  # untimed UNet steps before the timed ones
    steps: int = 5  # timed UNet steps
    runs: int = 3  # timed text-encoder and VAE-decoder calls (after one untimed call each)
    e2e_steps: int = 4  # sampler steps of the end-to-end generation
    few_steps: int = 0  # steps of the few-step generation (0: not measured)
    few_step_sampler: str = "lcm"
    few_step_guidance: float = 1.0  # LCM-LoRA's recipe: <= 1 runs no unconditional pass
    img2img_strength: float = 0.0  # denoising strength of the img2img generation (0: not measured)
    width: int | None = None  # pixels; None: the model's native size
    height: int | None = None
    prompt: str = DEFAULT_PROMPT
    guidance_scale: float = 7.5
    sampler: str = "euler_a"
    torch_compile: str | None = None  # torch.compile mode for torch-* UNets (None: eager)
    threads: int | None = None  # torch intra-op threads (None: torch's default, one per core)
    evict_cache: bool = True  # drop the model's files from the page cache before the cold load

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Task:
    """Everything one measurement needs; JSON-serialisable so a fresh process can run it."""

    run: RunSpec
    model_path: str | None  # what the backend loads: the source, or a converted folder
    settings: Settings

    def to_dict(self) -> dict:
        return {"run": asdict(self.run), "model_path": self.model_path, "settings": self.settings.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "Task":
        return cls(RunSpec(**d["run"]), d["model_path"], Settings(**d["settings"]))


def _sync(value) -> None:
    """Wait for a torch device's queued work (its timings would otherwise end at the launch)."""
    import sys

    if "torch" not in sys.modules:
        return
    import torch

    if isinstance(value, torch.Tensor):
        if value.device.type == "cuda":
            torch.cuda.synchronize(value.device)
        elif value.device.type == "mps":
            torch.mps.synchronize()


def time_calls(fn: Callable[[int], Any], *, warmup: int, n: int) -> dict:
    """Summary of `n` timed calls `fn(i)` after `warmup` untimed ones (whose seconds are kept)."""
    def once(i: int) -> float:
        start = time.perf_counter()
        _sync(fn(i))
        return time.perf_counter() - start

    warm = [once(i) for i in range(warmup)]
    out = summarize([once(warmup + i) for i in range(n)])
    out["warmup_s"] = warm
    return out


def release() -> None:
    gc.collect()
    import sys

    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _timed_load(engine, task) -> tuple[Any, float]:
    start = time.perf_counter()
    handle = engine.load(task)
    return handle, time.perf_counter() - start


def _cuda_peak_gib() -> float | None:
    import sys

    if "torch" not in sys.modules:
        return None
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def _measure(task: Task, entry: dict, progress: Callable[[str], None]) -> None:
    from coreml_sd.bench.engines import ENGINES

    engine, s, label = ENGINES[task.run.spec.engine], task.settings, task.run.label
    paths = [task.model_path] if task.model_path else []
    evicted = bool(paths) and s.evict_cache and evict_page_cache(paths)
    progress(f"{label}: load (cold{', page cache dropped' if evicted else ''})")
    handle, cold = _timed_load(engine, task)
    del handle
    release()
    progress(f"{label}: load (warm)")
    handle, warm = _timed_load(engine, task)
    entry["load"] = {"cold_s": cold, "warm_s": warm, "cold_page_cache": "dropped" if evicted else "as found"}
    entry.update(engine.describe(handle, task))
    work = engine.workload(handle, s)
    progress(f"{label}: text encoder ({s.runs} runs)")
    entry["text_encoder"] = time_calls(work.text_encoder, warmup=1, n=s.runs)
    progress(f"{label}: UNet step ({s.warmup} warm-up + {s.steps} timed)")
    entry["unet_step"] = time_calls(work.unet_step, warmup=s.warmup, n=s.steps)
    progress(f"{label}: VAE decoder ({s.runs} runs)")
    entry["vae_decoder"] = time_calls(work.vae_decoder, warmup=1, n=s.runs)
    progress(f"{label}: end to end ({s.e2e_steps} steps, {work.width}x{work.height})")
    entry["end_to_end"] = _time_to_image(work, s.e2e_steps, s.sampler, s.guidance_scale)
    if s.few_steps:
        progress(f"{label}: few steps ({s.few_steps} {s.few_step_sampler} steps, guidance {s.few_step_guidance})")
        entry["few_step"] = _time_to_image(work, s.few_steps, s.few_step_sampler, s.few_step_guidance)
    if s.img2img_strength:
        progress(f"{label}: VAE encoder ({s.runs} runs)")
        entry["vae_encoder"] = time_calls(work.vae_encoder, warmup=1, n=s.runs)
        progress(f"{label}: img2img ({s.e2e_steps} steps at strength {s.img2img_strength:g})")
        start = time.perf_counter()
        ran = work.img2img(s.e2e_steps, strength=s.img2img_strength, sampler=s.sampler,
                           guidance_scale=s.guidance_scale)
        seconds = time.perf_counter() - start
        entry["img2img"] = {"seconds": seconds, "steps": s.e2e_steps, "strength": s.img2img_strength,
                            "unet_steps": ran, "width": work.width, "height": work.height,
                            "vs_end_to_end": seconds / entry["end_to_end"]["seconds"]}
    del work, handle


def _time_to_image(work, steps: int, sampler: str, guidance: float) -> dict:
    """One generation, prompt to image (text encoding, every step, decoding), timed whole."""
    start = time.perf_counter()
    work.generate(steps, sampler=sampler, guidance_scale=guidance)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "steps": steps, "per_step_s": seconds / steps, "sampler": sampler,
            "guidance_scale": guidance, "width": work.width, "height": work.height}


@contextlib.contextmanager
def _threads(n: int | None):
    """torch's intra-op threads for the block. On a machine shared with other busy processes, fewer
    threads than cores can be much faster: each parallel region waits for its slowest thread."""
    if n is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def new_entry(run: RunSpec) -> dict:
    spec = run.spec
    return {"label": run.label, "backend": run.backend, "engine": spec.engine, "device": spec.device,
            "compute_units": spec.compute_units, "precision_requested": run.precision, "status": "ok",
            "reason": None}


def skipped_entry(run: RunSpec, reason: str) -> dict:
    return {**new_entry(run), "status": "skipped", "reason": reason}


def measure_run(task: Task, progress: Callable[[str], None] = lambda s: None) -> dict:
    """Measure one backend; unavailable -> status "skipped", any other error -> "failed" (with the reason)."""
    import sys

    entry = new_entry(task.run)
    entry["torch_compile"] = task.settings.torch_compile if task.run.spec.engine == "torch" else None
    before, start = load_average(), time.perf_counter()
    if "torch" in sys.modules and _cuda_peak_gib() is not None:
        sys.modules["torch"].cuda.reset_peak_memory_stats()
    try:
        with RSSSampler() as rss, _threads(task.settings.threads):
            _measure(task, entry, progress)
    except BackendUnavailable as exc:
        entry.update(status="skipped", reason=str(exc))
    except Exception as exc:  # recorded as a failure; the other backends still run
        log.warning("%s failed", task.run.label, exc_info=True)
        entry.update(status="failed", reason=f"{type(exc).__name__}: {exc}")
    finally:
        release()
    entry["memory"] = {"peak_rss_gib": rss.peak_gib, "peak_cuda_gib": _cuda_peak_gib()}
    entry["load_average"] = {"before": before, "after": load_average()}
    entry["seconds"] = time.perf_counter() - start
    if "torch" in sys.modules:
        entry["torch_threads"] = sys.modules["torch"].get_num_threads()
    if entry["status"] != "ok":
        progress(f"{task.run.label}: {entry['status']}: {entry['reason']}")
    return entry
