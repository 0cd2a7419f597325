"""The parity gate: each converted package against the upstream torch module, on seeded inputs.

The reference is the *upstream* module (diffusers / transformers) computing in fp32, not our
rewrite, so the gate covers the rewrite and the conversion together. Packages run in Core ML on macOS where
its runtime is present, elsewhere in the `mil` executor in `exact` mode (fp16 rounding after
every fp16 op, as Core ML computes). PSNR is Apple's definition, 20 log10(max|ref| / RMSE); a
component below 35 dB fails the conversion.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)

MIN_PSNR_DB = 35.0
PSNR_CAP_DB = 200.0  # identical arrays: a finite number keeps the manifest plain JSON
VERIFY_PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, 8k"
VERIFY_TIMESTEP = 501.0


def psnr(reference: np.ndarray, test: np.ndarray) -> float:
    """20 log10(max|reference| / RMSE(reference - test)) in dB (capped at 200)."""
    reference = np.asarray(reference, dtype=np.float64)
    test = np.asarray(test, dtype=np.float64)
    if reference.shape != test.shape:
        raise ValueError(f"psnr: shapes differ: reference {reference.shape}, test {test.shape}")
    if not np.all(np.isfinite(test)):
        return -math.inf
    rmse = math.sqrt(float(np.mean((reference - test) ** 2)))
    peak = float(np.max(np.abs(reference)))
    if rmse == 0.0:
        return PSNR_CAP_DB
    return min(PSNR_CAP_DB, 20.0 * math.log10(max(peak, 1e-12) / rmse))


@dataclass(frozen=True)
class ParityResult:
    component: str
    psnr_db: dict[str, float]  # per output
    threshold_db: float
    executor: str

    @property
    def min_psnr_db(self) -> float:
        return min(self.psnr_db.values())

    @property
    def passed(self) -> bool:
        return self.min_psnr_db >= self.threshold_db

    def to_dict(self) -> dict:
        return {"psnr_db": {k: _finite(v) for k, v in self.psnr_db.items()}, "min_psnr_db": _finite(self.min_psnr_db),
                "threshold_db": self.threshold_db, "executor": self.executor, "passed": self.passed}


def _finite(v: float) -> float | None:
    return round(v, 2) if math.isfinite(v) else None


class PackageRunner:
    """Runs packages: Core ML on macOS when its runtime loads, else the `mil` executor (exact)."""

    def __init__(self, *, prefer_coreml: bool = True):
        self.use_coreml = prefer_coreml and sys.platform == "darwin" and _coreml_runtime_present()
        self.name = "coreml (cpu)" if self.use_coreml else "mil exact (cpu)"

    def run(self, package: Path, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.use_coreml:
            import coremltools as ct

            model = ct.models.MLModel(str(package), compute_units=ct.ComputeUnit.CPU_ONLY)
            return {k: np.asarray(v, dtype=np.float32) for k, v in model.predict(dict(inputs)).items()}
        from coreml_sd.mil.executor import Executor
        from coreml_sd.mil.package import load_program

        executor = Executor(load_program(package), device="cpu", precision_mode="exact")
        outputs = executor({k: np.ascontiguousarray(v) for k, v in inputs.items()})
        return {k: v.float().numpy() for k, v in outputs.items()}


def _coreml_runtime_present() -> bool:
    try:
        import coremltools.libcoremlpython  # noqa: F401
    except ImportError:
        return False
    return True


def compare(component: str, outputs: Mapping[str, np.ndarray], references: Mapping[str, np.ndarray], *,
            executor: str, threshold_db: float = MIN_PSNR_DB) -> ParityResult:
    figures = {name: psnr(ref, outputs[name]) for name, ref in references.items()}
    return ParityResult(component, figures, threshold_db, executor)


# -- seeded inputs and upstream references ------------------------------------------------------
def _randn(shape: Sequence[int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(tuple(shape)).astype(np.float32)


def text_encoder_case(module, tokenizer, *, extra_words: Sequence[str] = ()):
    """(package inputs, references) for the text encoder: a real prompt's token ids.

    `extra_words` (e.g. textual-inversion trigger words) are appended so their vectors are checked.
    """
    import torch

    ids = np.asarray([tokenizer(" ".join([VERIFY_PROMPT, *extra_words]))], dtype=np.int64)
    with torch.inference_mode():
        out = module(torch.from_numpy(ids))
    refs = {"last_hidden_state": out.last_hidden_state.float().numpy(),
            "pooled_outputs": out.pooler_output.float().numpy()}
    return {"input_ids": ids.astype(np.float32)}, refs


def unet_case(module, *, batch: int, latent_shape: tuple[int, int, int], context_dim: int, seq_len: int = 77,
              seed: int = 0):
    """(package inputs, references): seeded latents and text embedding, a mid-schedule timestep."""
    import torch

    sample = _randn((batch, *latent_shape), seed)
    context = _randn((batch, seq_len, context_dim), seed + 1)
    timestep = np.full((batch,), VERIFY_TIMESTEP, dtype=np.float32)
    with torch.inference_mode():
        out = module(torch.from_numpy(sample), torch.from_numpy(timestep),
                     encoder_hidden_states=torch.from_numpy(context)).sample
    inputs = {"sample": sample.astype(np.float16), "timestep": timestep.astype(np.float16),
              "encoder_hidden_states": context.transpose(0, 2, 1)[:, :, None, :].astype(np.float16)}
    return inputs, {"noise_pred": out.float().numpy()}


def vae_decoder_case(vae, *, latent_shape: tuple[int, int, int], seed: int = 0):
    import torch

    z = _randn((1, *latent_shape), seed + 2)
    with torch.inference_mode():
        image = vae.decode(torch.from_numpy(z)).sample
    return {"z": z}, {"image": image.float().numpy()}


def vae_encoder_case(vae, *, image_shape: tuple[int, int, int], seed: int = 0):
    import torch

    x = np.clip(_randn((1, *image_shape), seed + 3) * 0.5, -1, 1).astype(np.float32)
    with torch.inference_mode():
        moments = vae.encode(torch.from_numpy(x)).latent_dist.parameters
    return {"x": x}, {"latent": moments.float().numpy()}
