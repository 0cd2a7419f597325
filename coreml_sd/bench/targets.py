"""What `--backends` names: the engine, device and compute units behind each benchmark backend.

A run is one backend at one precision, labelled `backend` or `backend:precision` (the label is how
`--compare` matches runs across result files, so it names what was asked, not what `auto` chose
on this machine; the run records the resolved precision too).
"""

from __future__ import annotations

from dataclasses import dataclass

from coreml_sd.errors import InputError, choices_text

PRECISIONS = ("auto", "fp32", "fp16", "bf16")


@dataclass(frozen=True)
class BackendSpec:
    name: str
    engine: str  # "coreml" | "mil" | "torch" | "diffusers"
    device: str  # torch device ("auto" | "cpu" | "cuda" | "mps"); Core ML: the compute units decide
    compute_units: str | None = None  # Core ML MLComputeUnits name
    # --precision applies to the engine (torch dtype, mil executor dtype). Core ML packages run at
    # the precision they were converted with; diffusers' baseline at its default for the device.
    takes_precision: bool = True
    description: str = ""


BACKENDS: dict[str, BackendSpec] = {spec.name: spec for spec in (
    BackendSpec("coreml-ane", "coreml", "ane", "CPU_AND_NE", False, "Core ML, Neural Engine (and CPU)"),
    BackendSpec("coreml-gpu", "coreml", "gpu", "CPU_AND_GPU", False, "Core ML, GPU (and CPU)"),
    BackendSpec("coreml-cpu", "coreml", "cpu", "CPU_ONLY", False, "Core ML, CPU only"),
    BackendSpec("coreml-all", "coreml", "all", "ALL", False, "Core ML, all compute units"),
    BackendSpec("mil", "mil", "auto", description="the converted packages run by coreml-sd's mil executor"),
    BackendSpec("torch-cpu", "torch", "cpu", description="coreml-sd's torch backend on the CPU"),
    BackendSpec("torch-cuda", "torch", "cuda", description="coreml-sd's torch backend on a CUDA GPU"),
    BackendSpec("torch-mps", "torch", "mps", description="coreml-sd's torch backend on Apple's Metal GPU"),
    BackendSpec("diffusers", "diffusers", "auto", takes_precision=False,
                description="diffusers' StableDiffusionPipeline, eager, at its default precision for the device "
                            "(fp32 on a CPU, fp16 on a GPU)"),
)}


@dataclass(frozen=True)
class RunSpec:
    """One backend at one requested precision ("auto" = the engine's choice for the device)."""

    backend: str
    precision: str = "auto"

    @property
    def spec(self) -> BackendSpec:
        return BACKENDS[self.backend]

    @property
    def label(self) -> str:
        return self.backend if self.precision == "auto" else f"{self.backend}:{self.precision}"


def _check_precision(value: str, where: str) -> str:
    if value not in PRECISIONS:
        raise InputError(f"{where}: unknown precision {value!r}; valid precisions: {choices_text(PRECISIONS)}")
    return value


def parse_precisions(text: str) -> tuple[str, ...]:
    """`--precision`: one precision or a comma-separated list."""
    items = tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    if not items:
        raise InputError(f"--precision is empty; valid precisions: {choices_text(PRECISIONS)}")
    return tuple(_check_precision(p, "--precision") for p in items)


def parse_runs(backends: str, precisions: tuple[str, ...] = ("auto",)) -> list[RunSpec]:
    """`--backends a,b:fp16,...` x `--precision`: one run per backend and precision, in order.

    A `backend:precision` item names its own precision; other items that take a precision get
    each of `precisions`, and those that do not (coreml-*, diffusers) run once.
    """
    runs: list[RunSpec] = []
    items = [b.strip() for b in backends.split(",") if b.strip()]
    if not items:
        raise InputError(f"--backends is empty; valid backends: {choices_text(BACKENDS)}")
    for item in items:
        name, _, precision = item.partition(":")
        if name not in BACKENDS:
            raise InputError(f"unknown backend {name!r}; valid backends: {choices_text(BACKENDS)}")
        spec = BACKENDS[name]
        if precision:
            _check_precision(precision, item)
            if spec.engine == "coreml":
                raise InputError(f"{item}: Core ML runs a package at the precision it was converted with; "
                                 f"name it without ':{precision}' (convert with --precision for another)")
            wanted = (precision,)
        else:
            wanted = precisions if spec.takes_precision else ("auto",)
        runs.extend(RunSpec(name, p) for p in wanted)
    return list(dict.fromkeys(runs))


def coreml_unavailable_reason() -> str | None:
    """Why Core ML cannot run here, known without loading anything (the coreml backend's own
    check); None where it may. Checked before converting a model for it."""
    from coreml_sd.backends import backend_names

    if "coreml" not in backend_names():
        return "this coreml-sd has no coreml backend registered"
    from coreml_sd.backends.coreml_backend import runtime_unavailable_reason

    return runtime_unavailable_reason()


def torch_device_unavailable_reason(device: str) -> str | None:
    """Why torch cannot use `device` here (imports torch); None where it can."""
    if device in ("cpu", "auto"):
        return None
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        return "torch sees no CUDA GPU on this machine"
    if device == "mps" and not torch.backends.mps.is_available():
        return "torch sees no Metal GPU (MPS needs macOS on Apple silicon)"
    return None


def unavailable_reason(run: RunSpec) -> str | None:
    """Cheap check before any model is prepared (no conversion for a backend that cannot run)."""
    spec = run.spec
    if spec.engine == "coreml":
        return coreml_unavailable_reason()
    if spec.engine == "torch":
        return torch_device_unavailable_reason(spec.device)
    return None
