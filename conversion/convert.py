"""Convert a model source into a verified Core ML model folder.

The source's modules are loaded in the package precision (fp16 by default: half the memory of
fp32). Then for each component, one at a time, so that only one component's work is in memory:
compute the upstream module's reference in fp32 on seeded inputs (an exact upcast of the stored
weights, and back), build the Neural-Engine rewrite on the same tensors, emit the ML program
("trace"), optionally compress it, let coremltools convert and serialize it straight into the
output, then run the package (Core ML on macOS, the `mil` executor elsewhere) against the
reference: the parity gate. On a full-size model the packages' gate runs go to a worker process
(`conversion.gate`) while the next component converts, and the references are computed from the
fp16 weights in fp32 without an fp32 copy (`conversion.reference`). The folder is written under a
hidden name and renamed only when every gate run passed.
"""

from __future__ import annotations

import contextlib
import contextvars
import gc
import logging
import shutil
import sys
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from coreml_sd.apple_layouts import LAYOUTS, WrittenNames, controlnet_written_names, written_names
from coreml_sd.components import FOLDER_KINDS, TensorSpec, entry_component
from coreml_sd.errors import choices_text
from coreml_sd.families import PROVIDER_WIDTHS
from coreml_sd.model_folder import ControlNetPackage, Manifest, PackageInfo
from coreml_sd.model_source import ModelSource
from conversion.ane.attention import ATTENTION_IMPLEMENTATIONS
from conversion.atomic import atomic_folder, check_target, link_copy
from conversion.export import (MIN_TARGETS, WEIGHT_MODES, ConversionError, TensorIO, build_program,
                               compile_package, compress, to_mlmodel)
from conversion.gate import GateRun, GateRunner
from conversion.progress import StageRecord, StageTimer, release_memory
from conversion.reference import fp32_compute
from conversion.verify import MIN_PSNR_DB, ExtraIO, PackageRunner, ParityResult, compare, to_8bit

log = logging.getLogger(__name__)

# Convertible components of a model, in conversion order (ControlNets, one per file, are given apart;
# unet_refiner: a refiner's UNet beside the base's, Apple's UnetRefiner).
COMPONENTS = tuple(k for k in FOLDER_KINDS if not FOLDER_KINDS[k].multiple)
# --weights compresses these (Apple's converter quantizes the ControlledUnet and ControlNets too); the
# VAE stays fp16 (small, and its errors show directly in pixels).
COMPRESSIBLE = ("text_encoder", "text_encoder_2", "unet", "unet_refiner", "controlled_unet", "controlnet")
CONTROLNET_KEY = "controlnet:"  # a ControlNet's component key during conversion: controlnet:<Name>
TEXT_LENGTH = 77
PRECISIONS = ("fp16", "fp32")
MAX_ENUMERATED = 128  # Core ML's limit on enumerated shapes (coremltools' flexible-inputs guide)


def format_sizes(sizes) -> str:
    return ", ".join(f"{w}x{h}" for w, h in sizes)


@dataclass(frozen=True)
class ConvertOptions:
    attention: str = "split_einsum_v2"
    width: int | None = None  # pixels; default: the model's native size
    height: int | None = None
    batch: int = 2  # 2: guidance pair, 1: no guidance
    weights: str = "fp16"
    precision: str = "fp16"  # fp32: for checking and GPU-only use (the Neural Engine computes in fp16)
    chunk_unet: bool = False
    min_target: str = "macOS13"
    compile: bool = False
    # None: the model's own (its family's text encoders, unet, vae_decoder; unet_refiner with a refiner)
    components: tuple[str, ...] | None = None
    threshold_db: float = MIN_PSNR_DB
    # Rescale the VAE decoder's activations where fp16 would overflow (conversion.vae_fp16); off
    # only to show the failure it prevents.
    vae_fp16_fix: bool = True
    # (width, height) pixels: one UNet/VAE set taking each (Core ML enumerated shapes); the first
    # is the default. Empty: the one size width x height.
    sizes: tuple[tuple[int, int], ...] = ()
    layout: str = "swift"  # package names: Apple's Swift resources, its Python pipeline's, or both
    # Gate runs in a worker process beside the conversion; None: when the model's weights exceed
    # BACKGROUND_GATE_BYTES (a worker's start costs more than a small model's checks).
    background_gate: bool | None = None
    # The UNet takes a text context of 77 * k tokens for k = 1 .. prompt_chunks (enumerated shapes).
    prompt_chunks: int = 1
    clip_skip: int = 1  # A1111's clip skip baked into the text encoder packages

    def validate(self) -> None:
        for name, value, valid in (("attention", self.attention, ATTENTION_IMPLEMENTATIONS),
                                   ("weights", self.weights, WEIGHT_MODES), ("precision", self.precision, PRECISIONS),
                                   ("min_target", self.min_target, MIN_TARGETS),
                                   ("batch", self.batch, (1, 2)), ("layout", self.layout, LAYOUTS)):
            if value not in valid:
                raise ConversionError(f"{name} {value!r} is not supported; valid: {choices_text(valid)}")
        unknown = [c for c in self.components or () if c not in COMPONENTS]
        if unknown:
            raise ConversionError(f"unknown component {unknown[0]!r}; valid: {choices_text(COMPONENTS)}")
        self._validate_sizes()
        self._validate_prompt_chunks()
        if self.compile and sys.platform != "darwin":
            raise ConversionError("--compile needs macOS (Core ML's compiler runs only there); convert without "
                                  "--compile here: the packages compile on the Mac when first loaded")

    def _validate_sizes(self) -> None:
        if not self.sizes:
            return
        if self.width or self.height:
            raise ConversionError("give either --sizes or --width/--height, not both (the first of --sizes is the "
                                  "default size)")
        if len(set(self.sizes)) != len(self.sizes):
            raise ConversionError(f"--sizes lists a size twice: {format_sizes(self.sizes)}")
        if len(self.sizes) > 1 and self.chunk_unet:
            raise ConversionError("--sizes with --chunk-unet is not supported: every input of the second chunk would "
                                  "have a flexible size, and Core ML takes several enumerated inputs only from "
                                  "iOS 18 / macOS 15 on")
        if len(self.sizes) > MAX_ENUMERATED:
            raise ConversionError(f"--sizes lists {len(self.sizes)} sizes; Core ML takes at most {MAX_ENUMERATED} "
                                  "enumerated shapes")

    def _validate_prompt_chunks(self) -> None:
        from coreml_sd.model_folder import MAX_PROMPT_CHUNKS

        for name, value in (("max prompt chunks", self.prompt_chunks), ("clip skip", self.clip_skip)):
            if not 1 <= value <= MAX_PROMPT_CHUNKS:
                raise ConversionError(f"{name} must be from 1 to {MAX_PROMPT_CHUNKS}; got {value}")
        if self.prompt_chunks > 1 and len(self.sizes) > 1:
            raise ConversionError("--max-prompt-chunks with several --sizes is not supported: the UNet's latent and "
                                  "text inputs would both have flexible shapes, and Core ML takes several enumerated "
                                  "inputs only from iOS 18 / macOS 15 on; convert one size with long prompts, or "
                                  "several sizes with --max-prompt-chunks 1")
        if self.prompt_chunks > 1 and self.chunk_unet:
            raise ConversionError("--max-prompt-chunks with --chunk-unet is not supported: the second chunk's inputs "
                                  "would have flexible shapes too (Core ML: one enumerated input before macOS 15)")

    def weights_for(self, component: str) -> str:
        return self.weights if component.split(":")[0] in COMPRESSIBLE else "fp16"

    @property
    def torch_dtype(self):
        import torch

        return torch.float16 if self.precision == "fp16" else torch.float32

    def cast(self, module):
        """The upstream module in the package precision (in place)."""
        return module.to(self.torch_dtype)


@dataclass
class ConversionResult:
    path: Path
    manifest: Manifest
    parity: dict[str, ParityResult]
    stages: list[StageRecord] = field(default_factory=list)
    summary: dict[str, dict] = field(default_factory=dict)


@dataclass(frozen=True)
class Shapes:
    sizes: tuple[tuple[int, int], ...]  # (width, height) pixels, the default first
    vae_factor: int
    latent_channels: int
    batch: int
    text_hidden: int

    @property
    def width(self) -> int:
        return self.sizes[0][0]

    @property
    def height(self) -> int:
        return self.sizes[0][1]

    @property
    def latent(self) -> tuple[int, int, int]:
        """(channels, h, w) at the default size."""
        return self.latents[0]

    @property
    def latents(self) -> list[tuple[int, int, int]]:
        """(channels, h, w) at each size."""
        f = self.vae_factor
        return [(self.latent_channels, h // f, w // f) for w, h in self.sizes]

    def label(self, i: int) -> str:
        """How a figure of size i is named in the parity record (plain when there is one size)."""
        return "" if len(self.sizes) == 1 else " {}x{}".format(*self.sizes[i])


def _shapes(source: ModelSource, options: ConvertOptions, unet_downscale: int) -> Shapes:
    info = source.info
    f = info.vae_scale_factor
    multiple = f * unet_downscale
    sizes = options.sizes or ((options.width or info.sample_size, options.height or info.sample_size),)
    for width, height in sizes:
        for name, v in (("width", width), ("height", height)):
            if v < multiple or v % multiple:
                raise ConversionError(f"{name} must be a positive multiple of {multiple} for this model "
                                      f"(VAE factor {f} x UNet downscale {unet_downscale}); got {v}")
    return Shapes(tuple(sizes), f, info.latent_channels, options.batch, info.text_hidden_size)


def _check_source(source: ModelSource) -> None:
    if source.origin.modifiers.get("hypernetworks"):
        raise ConversionError("hypernetworks change the UNet's attention at run time and cannot be baked into "
                              "Core ML packages; convert without --hypernetwork (use it with the torch backend)")


BACKGROUND_GATE_BYTES = 500 * 2**20
# A UNet this large (SDXL's: 5.1 GB in fp16) computes its reference only after the gate runs before
# it have finished: its reference (~1.2x its weights) beside the VAE decoder's exact-mode check
# (~4 GiB at 1024x1024) would add up past the 9 GiB a conversion may take (issue 12).
SERIAL_UNET_BYTES = 3 * 2**30


class Converter:
    """One conversion run: the source's modules, the output folder, the options, the timer."""

    def __init__(self, source: ModelSource, folder: Path, options: ConvertOptions, timer: StageTimer,
                 *, background_gate: bool = False):
        self.source, self.folder, self.options = source, folder, options
        self.runner = PackageRunner()
        self.gates = GateRunner(background=background_gate)
        self.timer = _Balanced(timer, self)
        self.packages: dict[str, PackageInfo] = {}
        self.parity: dict[str, ParityResult] = {}
        self.extra_parity: dict[str, dict] = {}
        self.controlnets: dict[str, tuple[dict, dict]] = {}  # package name -> (source record, config)
        # component -> (references, dequantized references, outputs also compared as 8-bit pixels)
        self.expected: dict[str, tuple[dict, dict | None, list[str]]] = {}
        # Components whose gate run nothing else runs beside (the last one; the one before a large
        # UNet, which waits for the checks): they may use every core.
        self.alone: set[str] = set()

    def collect_gates(self, runs: list[GateRun]) -> None:
        """Judge finished gate runs (raises ConversionError on the first that fails)."""
        for run in runs:
            if self.gates.background:
                cores = "every core" if run.every_core else "one thread"
                self.timer.base.record(StageRecord(run.component, "verify", run.seconds, run.peak_rss_gib,
                                                   f"{self.runner.name}, beside the conversion, {cores}"))
            refs, deq, pixels = self.expected.pop(run.component)
            outputs, refs = dict(run.outputs), dict(refs)
            for key in pixels:  # an image's pass mark is its pixels as well as its floats
                outputs[f"{key} 8-bit"], refs[f"{key} 8-bit"] = to_8bit(outputs[key]), to_8bit(refs[key])
            self.gate(run.component, outputs, refs, dequantized_reference=deq)

    def finish_gates(self) -> None:
        self.collect_gates(self.gates.wait())

    # -- one component ------------------------------------------------------------------------
    def export(self, component: str, rewrite, forward: Callable, inputs: list[TensorIO],
               outputs: list[TensorIO]) -> tuple[list[TensorIO], dict[str, np.ndarray]]:
        """Emit, compress and convert one package; returns its outputs and dequantized weights."""
        opts = self.options
        weights = opts.weights_for(component.split("_chunk")[0])
        with self.timer(component, "trace"):
            prog, outputs, const_names = build_program(forward, rewrite, inputs, outputs, min_target=opts.min_target)
        dense: dict[str, np.ndarray] = {}
        if weights != "fp16":
            with self.timer(component, "compress", weights):
                compress(prog, weights)
                dense = _dequantized(prog, const_names)
        names = package_names(opts.layout, self.source.info.name, component)
        package = self.folder / names.package
        package.parent.mkdir(parents=True, exist_ok=True)
        with self.timer(component, "convert"):
            to_mlmodel(prog, min_target=opts.min_target, package_dir=package,
                       description=f"coreml-sd {component} of {self.source.info.name}",
                       metadata={"coreml_sd.component": component, "coreml_sd.attention": opts.attention,
                                 "coreml_sd.weights": weights}, inputs=inputs)
            for alias in names.aliases:
                link_copy(package, self.folder / alias)
        del prog
        release_memory()
        self.packages[component] = PackageInfo(
            package=package.relative_to(self.folder).as_posix(), inputs=tuple(_spec(io) for io in inputs),
            outputs=tuple(_spec(io) for io in outputs), weights=weights, size_bytes=_folder_size(package),
            aliases=names.aliases)
        return outputs, dense

    def gate(self, component: str, outputs: dict[str, np.ndarray], references: dict[str, np.ndarray],
             *, dequantized_reference: dict[str, np.ndarray] | None = None) -> ParityResult:
        """Record parity; the gate compares with the reference of the weights the package holds."""
        bad = {k: int(np.size(v) - np.isfinite(v).sum()) for k, v in outputs.items() if not np.isfinite(v).all()}
        if bad:
            raise ConversionError(f"parity gate failed for {component}: the package returns NaN/inf values ("
                                  + ", ".join(f"{k}: {n} of {np.size(outputs[k])}" for k, n in bad.items())
                                  + ") — an fp16 overflow; nothing was written")
        ref = dequantized_reference if dequantized_reference is not None else references
        result = compare(component, outputs, ref, executor=self.runner.name, threshold_db=self.options.threshold_db)
        self.parity[component] = result
        if dequantized_reference is not None:
            vs_source = compare(component, outputs, references, executor=self.runner.name)
            self.extra_parity[component] = {"psnr_vs_source_db": vs_source.to_dict()["psnr_db"]}
        if not result.passed:
            figures = ", ".join(f"{k} {v:.1f} dB" for k, v in result.psnr_db.items())
            raise ConversionError(f"parity gate failed for {component}: {figures} (minimum {result.threshold_db:g} dB) "
                                  f"against the torch reference; nothing was written")
        return result


def package_names(layout: str, version: str, component: str) -> WrittenNames:
    """Where a component's package (and its compiled model) goes in the folder, in `layout`: Apple's
    Swift resource names (a ControlNet's in controlnet/) or its Python pipeline's."""
    if component.startswith(CONTROLNET_KEY):
        return controlnet_written_names(layout, component[len(CONTROLNET_KEY):])
    return written_names(layout, version, component)


def _dequantized(prog, const_names: dict[str, str]) -> dict[str, np.ndarray]:
    """Parameter name -> the dense fp16 values the compressed program's weights decode to."""
    out, unmapped = {}, []
    for op in prog.functions["main"].operations:
        if not op.op_type.startswith("constexpr_"):
            continue
        base = op.name.rsplit("_", 1)[0]  # "<const>_palettized" / "<const>_quantized"
        if base in const_names:
            out[const_names[base]] = np.asarray(op.materialized_val_inference())
        else:
            unmapped.append(op.name)
    if unmapped:  # the gate's reference would silently keep these weights uncompressed
        raise ConversionError(f"compressed weights without a parameter to check them against: {', '.join(unmapped)}")
    return out


def _set_weights(module, dense: dict[str, np.ndarray]) -> None:
    """Replace parameters of `module` by the given arrays (by parameter name)."""
    import torch

    for name, value in dense.items():
        owner, _, attr = name.rpartition(".")
        sub = module.get_submodule(owner) if owner else module
        old = getattr(sub, attr)
        setattr(sub, attr, torch.nn.Parameter(torch.from_numpy(value.copy()).reshape(old.shape).to(old.dtype),
                                              requires_grad=False))


class _Balanced:
    """The stage timer, first giving this process its torch threads for what the gate worker does
    (`GateRunner.balance_threads`) and judging the gate runs that finished meanwhile."""

    def __init__(self, base: StageTimer, conv: Converter):
        self.base, self.conv = base, conv

    def __call__(self, component: str, stage: str, detail: str = ""):
        self.conv.collect_gates(self.conv.gates.take())
        self.conv.gates.balance_threads()
        return self.base(component, stage, detail)


@contextlib.contextmanager
def in_fp32(module, options: ConvertOptions) -> Iterator[Any]:
    """The upstream module computing in fp32 for its reference, with the weights it holds.

    Weights were loaded in the package precision (fp16: half the memory of fp32 for the whole
    conversion); `fp32_compute` upcasts each where it is used (exact), so the reference is the
    upstream model with the weights the package stores, computed in fp32, and no fp32 copy of the
    model ever exists.
    """
    with fp32_compute(every=_REBALANCE.get()):
        yield module
    release_memory()


# The running conversion's thread re-balancing (Converter.rebalance), for references computed
# while the gate worker runs or finishes: a context variable, so in_fp32's callers stay as they are.
_REBALANCE: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar("rebalance", default=None)


def _spec(io: TensorIO) -> TensorSpec:
    return TensorSpec(io.name, tuple(io.shape), io.dtype)


def _folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _reference_outputs(rewrite, inputs: dict[str, np.ndarray], names: list[str],
                       call: Callable | None = None) -> dict[str, np.ndarray]:
    """The rewrite in fp32 compute (weights as they are) on the package inputs (`call(rewrite, *inputs)`:
    how to call it, default positionally)."""
    import torch

    rewrite.compute_dtype_override = torch.float32
    call = call or (lambda module, *xs: module(*xs))
    try:
        with torch.inference_mode():
            out = call(rewrite, *[torch.from_numpy(np.asarray(v, dtype=np.float32)) for v in inputs.values()])
    finally:
        rewrite.compute_dtype_override = None
    out = out if isinstance(out, tuple) else (out,)
    return {n: o.float().numpy() for n, o in zip(names, out)}


# -- the components ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One seeded parity check: package inputs and the upstream references (`label`: its size)."""

    label: str
    inputs: dict[str, np.ndarray]
    refs: dict[str, np.ndarray]
    pixels: bool = False  # also compare the outputs as 8-bit pixels (an image's pass mark is its pixels)


def _labelled(values: dict[str, np.ndarray], label: str) -> dict[str, np.ndarray]:
    return {f"{k}{label}": v for k, v in values.items()}


def _verify(conv: Converter, component: str, chain: list[str], cases: list[Case],
            dequantized_refs: list[dict[str, np.ndarray]] | None) -> None:
    """Run every case through the packages of `chain` in order (each taking its inputs by name from
    the inputs and the earlier outputs) and gate the last one's outputs, all cases as one record
    (per output and size): now, or in the gate worker (judged when it finishes, and before anything
    is written)."""
    steps = [(conv.folder / conv.packages[c].package, [(s.name, s.dtype) for s in conv.packages[c].inputs])
             for c in chain]
    outputs = [s.name for s in conv.packages[chain[-1]].outputs]
    refs = {k: v for case in cases for k, v in _labelled(case.refs, case.label).items()}
    deq = None if dequantized_refs is None else {
        k: v for case, d in zip(cases, dequantized_refs) for k, v in _labelled(d, case.label).items()}
    pixels = [f"{k}{case.label}" for case in cases if case.pixels for k in case.refs]
    conv.expected[component] = (refs, deq, pixels)
    runs = [(case.label, case.inputs) for case in cases]
    if conv.gates.background:
        conv.gates.submit(component, steps, runs, outputs, last=component in conv.alone)
        return
    with conv.timer(component, "verify", conv.runner.name):
        conv.gates.submit(component, steps, runs, outputs)
        conv.collect_gates(conv.gates.take())


def _dequantized_reference(conv: Converter, component: str, rewrite, dense: dict[str, np.ndarray],
                           cases: list[Case], call: Callable | None = None) -> list[dict[str, np.ndarray]] | None:
    if not dense:
        return None
    with conv.timer(component, "reference", "dequantized weights"):
        _set_weights(rewrite, dense)
        return [_reference_outputs(rewrite, c.inputs, list(c.refs), call) for c in cases]


def convert_text_encoder(conv: Converter, mods, component: str) -> None:
    """One text encoder of the family (TextEncoder, TextEncoder2): the hidden state its spec feeds the
    UNet (SDXL: `hidden_embeds`, the penultimate layer's) and its (projected) pooled output."""
    from conversion.ane import text_encoder_from_transformers
    from conversion.verify import text_encoder_case

    spec = conv.source.info.spec.text_encoder(component)
    hidden_layer = spec.hidden_layer - (conv.options.clip_skip - 1)  # A1111's clip skip, as the torch backend
    module = mods.module(component)
    setattr(mods, component, None)
    with conv.timer(component, "reference"), in_fp32(module, conv.options):
        case = Case("", *text_encoder_case(module, conv.source.tokenizer(component), hidden_layer=hidden_layer,
                                           final_norm=spec.final_norm, extra_words=list(conv.source.trigger_ids())))
    rewrite = text_encoder_from_transformers(module, attention=conv.options.attention, hidden_layer=hidden_layer,
                                             final_norm=spec.final_norm)
    del module
    (hidden, hidden_ref), (pooled, pooled_ref) = case.refs.items()
    ins = [TensorIO("input_ids", (1, TEXT_LENGTH), "fp32")]
    outs = [TensorIO(hidden, tuple(hidden_ref.shape), "fp32"), TensorIO(pooled, tuple(pooled_ref.shape), "fp32")]
    _, dense = conv.export(component, rewrite, lambda ops, ids: rewrite(ids, ops), ins, outs)
    deq = _dequantized_reference(conv, component, rewrite, dense, [case])
    del rewrite
    release_memory()
    _verify(conv, component, [component], [case], deq)


def convert_unet(conv: Converter, mods, shapes: Shapes, component: str = "unet",
                 source: ModelSource | None = None) -> None:
    """The UNet, or (component "controlled_unet") Apple's ControlledUnet: the same network taking
    ControlNet residuals as inputs additional_residual_0..N, or (component "unet_refiner", from the
    refiner's `source`) a refiner's, Apple's UnetRefiner. The UNet module is freed by the last."""
    from conversion.ane import unet_from_diffusers
    from conversion.ane.config import UNetConfig
    from conversion.ane.unet import residual_shapes
    from conversion.verify import unet_case

    module = mods.unet
    if component != "controlled_unet":
        mods.unet = None
    extras = unet_extra_inputs(source or conv.source, module.config, shapes.batch)
    b, p = shapes.batch, conv.options.precision
    # An inpainting UNet takes mask and masked-image latents beside the latents: 9 input channels.
    channels = int(module.config.in_channels)
    config = UNetConfig.from_diffusers(module.config)
    residuals = [residual_shapes(config, b, latent[1:]) if component == "controlled_unet" else []
                 for latent in shapes.latents]
    # Every size with one prompt chunk, and the default size with each longer context.
    contexts = [TEXT_LENGTH * k for k in range(1, conv.options.prompt_chunks + 1)]
    runs = [(shapes.label(i), i, TEXT_LENGTH) for i in range(len(shapes.latents))]
    runs += [(f"{shapes.label(0)} {n} tokens", 0, n) for n in contexts[1:]]
    with conv.timer(component, "reference"), in_fp32(module, conv.options):
        cases = [Case(label, *unet_case(module, batch=b, latent_shape=(channels, *shapes.latents[i][1:]),
                                        context_dim=shapes.text_hidden, seq_len=n, extra=extras,
                                        residuals=residuals[i]))
                 for label, i, n in runs]
    rewrite = unet_from_diffusers(module, attention=conv.options.attention)
    del module
    release_memory()
    ins = [TensorIO.enumerated("sample", [(b, channels, *latent[1:]) for latent in shapes.latents], p),
           TensorIO("timestep", (b,), p),
           TensorIO.enumerated("encoder_hidden_states", [(b, shapes.text_hidden, 1, n) for n in contexts], p),
           *(TensorIO(e.name, e.shape, p) for e in extras),
           *(TensorIO(f"additional_residual_{i}", shape, p) for i, shape in enumerate(residuals[0]))]
    out = TensorIO.enumerated("noise_pred", [(b, *latent) for latent in shapes.latents], "fp32")
    out = TensorIO(out.name, out.shape, out.dtype)  # an output: its flexible sizes as the program computes them
    n = len(extras)

    def call(module, s, t, c, *rest):
        return module(s, t, c, *rest[:n], residuals=rest[n:])

    if conv.options.chunk_unet:
        chain, dense = _export_unet_chunks(conv, rewrite, ins, out, component, n)
    else:
        chain = [component]
        _, dense = conv.export(component, rewrite, lambda ops, *xs: [rewrite(*xs[:3 + n], residuals=xs[3 + n:],
                                                                             ops=ops)], ins, [out])
    deq = _dequantized_reference(conv, component, rewrite, dense, cases, call)
    del rewrite
    release_memory()
    _verify(conv, component, chain, cases, deq)


def unet_extra_inputs(source: ModelSource, unet_config, batch: int) -> list[ExtraIO]:
    """The family's extra UNet inputs with their widths from the UNet's config; they must be the
    inputs the rewritten UNet computes with (conversion.ane.config.UNetConfig.extra_inputs)."""
    from conversion.ane.config import UNetConfig

    family = source.info.spec
    wanted = tuple(e.name for e in family.extra_inputs)
    rewrite_inputs = UNetConfig.from_diffusers(unet_config).extra_inputs
    if tuple(sorted(wanted)) != tuple(sorted(rewrite_inputs)):
        raise ConversionError(f"family {family.name} declares UNet inputs {choices_text(wanted) or 'none'} beyond "
                              f"the text, but this UNet's config computes with {choices_text(rewrite_inputs) or 'none'}")
    cfg = dict(unet_config)
    time_widths = sum(PROVIDER_WIDTHS[e.provider] for e in family.extra_inputs if e.provider != "pooled")
    out = []
    for name in rewrite_inputs:  # the rewrite's call order
        item = next(e for e in family.extra_inputs if e.name == name)
        if item.provider == "pooled":
            add = time_widths * int(cfg.get("addition_time_embed_dim") or 0)
            out.append(ExtraIO(name, (batch, int(cfg["projection_class_embeddings_input_dim"]) - add),
                               item.diffusers_arg))
        else:
            out.append(ExtraIO(name, (batch, PROVIDER_WIDTHS[item.provider]), item.diffusers_arg))
    return out


def _export_unet_chunks(conv: Converter, rewrite, ins: list[TensorIO], out: TensorIO, component: str = "unet",
                        n_extra: int = 0):
    """<Unet>Chunk1 (inputs -> features, time embedding, open skips) and <Unet>Chunk2 (-> noise_pred);
    a ControlledUnet's residual inputs go to the chunk that runs the middle block."""
    from conversion.ane.unet import UNetState, chunk_boundary

    stages = rewrite.stages()
    k = chunk_boundary(rewrite)
    open_skips = 1 + sum({"down": 1, "downsample": 1, "up": -1}.get(s.kind, 0) for s in stages[1:k])
    # After a down stage the features are also the newest skip: send them once.
    h_is_skip = stages[k - 1].kind in ("down", "downsample")
    base, residual_ins = ins[:3 + n_extra], ins[3 + n_extra:]
    mid_first = any(s.kind == "mid" for s in stages[1:k])

    def first(ops, sample, timestep, context, *rest):
        extra, residuals = rest[:n_extra], rest[n_extra:]
        state = rewrite.run(rewrite.begin(sample, timestep, extra, ops), context, stages[1:k], ops, residuals)
        return ([] if h_is_skip else [state.h]) + [state.emb, *state.skips]

    names = ([] if h_is_skip else ["hidden_states"]) + ["time_embedding"] + [f"skip_{i}" for i in range(open_skips)]
    outs1, dense1 = conv.export(f"{component}_chunk1", rewrite, first, base + (residual_ins if mid_first else []),
                                [TensorIO(n, None, conv.options.precision) for n in names])
    late = [] if mid_first else residual_ins

    def second(ops, *values):
        values, residuals = list(values[:len(values) - len(late)]), values[len(values) - len(late):]
        values, context = values[:-1], values[-1]
        h = values[-1] if h_is_skip else values.pop(0)
        emb, skips = values[0], tuple(values[1:])
        return [rewrite.run(UNetState(h, emb, skips), context, stages[k:], ops, residuals).h]

    _, dense2 = conv.export(f"{component}_chunk2", rewrite, second, outs1 + [ins[2]] + late, [out])
    return [f"{component}_chunk1", f"{component}_chunk2"], {**dense1, **dense2}


def convert_vae(conv: Converter, mods, shapes: Shapes, components: list[str]) -> None:
    from conversion.ane import vae_decoder_from_diffusers, vae_encoder_from_diffusers
    from conversion.verify import vae_decoder_cases, vae_encoder_case
    from conversion.vae_fp16 import calibration_latents

    vae, mods.vae = mods.vae, None
    cases: dict[str, list[Case]] = {}
    calibration = None
    fix = conv.options.vae_fp16_fix and conv.options.precision == "fp16"
    with in_fp32(vae, conv.options):
        for component in components:
            with conv.timer(component, "reference"):
                if component == "vae_decoder":
                    # A test image's latents and noise (where big activations live), at each size.
                    cases[component] = [
                        Case(shapes.label(i) + f" ({name})", inputs, refs, pixels=True)
                        for i, latent in enumerate(shapes.latents)
                        for name, inputs, refs in vae_decoder_cases(vae, latent_shape=latent)]
                    if fix:
                        calibration = calibration_latents(vae, *calibration_side(shapes))
                else:
                    cases[component] = [Case(shapes.label(i), *vae_encoder_case(vae, image_shape=(3, h, w)))
                                        for i, (w, h) in enumerate(shapes.sizes)]
    p = conv.options.precision
    for component in components:
        if component == "vae_decoder":
            # z in the program precision (fp16: as Apple's VAEDecoder takes it), so folders interchange
            rewrite = vae_decoder_from_diffusers(vae, attention=conv.options.attention)
            if calibration is not None:
                _fp16_safe_decoder(conv, rewrite, calibration)
            ins = [TensorIO.enumerated("z", [(1, *latent) for latent in shapes.latents], p)]
            outs = [TensorIO("image", (1, 3, *_spatial(shapes, 1)), "fp32")]
        else:
            rewrite = vae_encoder_from_diffusers(vae, attention=conv.options.attention)
            ins = [TensorIO.enumerated("x", [(1, 3, h, w) for w, h in shapes.sizes], "fp32")]
            outs = [TensorIO("latent", (1, 2 * shapes.latent_channels, *_spatial(shapes, shapes.vae_factor)), "fp32")]
        conv.export(component, rewrite, lambda ops, x: [rewrite(x, ops)], ins, outs)
        del rewrite
        release_memory()
        _verify(conv, component, [component], cases[component], None)


# Pixels: the activation peaks of a VAE hardly depend on the image size, and the gate then checks
# the fp16 decode of test latents at every size the package takes. 128: 4 s of a 2-core machine
# for SD 1.5's decoder, 20 s at 256 (issue 18). A site left at scale 1 peaked at <= 64 (RISK), half
# of where GroupNorm's squares can overflow; a scaled one at <= 16, an eighth.
CALIBRATION_SIDE = 128


def calibration_side(shapes: Shapes) -> tuple[int, int]:
    f = shapes.width // shapes.latent[2]
    return tuple(min(side, CALIBRATION_SIDE) // f * f for side in (shapes.height, shapes.width))


def _fp16_safe_decoder(conv: Converter, rewrite, calibration: np.ndarray) -> None:
    """Scale the decoder's big activations down where fp16 would overflow (conversion.vae_fp16)."""
    from conversion.vae_fp16 import fp16_safe

    with conv.timer("vae_decoder", "fp16 rescale"):
        scales = fp16_safe(rewrite, calibration)
    conv.extra_parity["vae_decoder"] = {"fp16_rescale": scales.to_dict()}
    if not scales.identity:
        log.info("VAE decoder: activations up to %.0f would overflow fp16; carried at scales %s (largest now %.1f)",
                 max(scales.peaks.values()), scales.streams, scales.scaled_peak())


def _spatial(shapes: Shapes, factor: int) -> tuple:
    """(h, w) of an output at the pixel size divided by `factor`; flexible (None) with several sizes."""
    return (shapes.height // factor, shapes.width // factor) if len(shapes.sizes) == 1 else (None, None)


# -- the whole model --------------------------------------------------------------------------
def model_components(source: ModelSource, options: ConvertOptions, refiner: ModelSource | None) -> list[str]:
    """The components to convert, in conversion order: those asked for, else the model's own."""
    own = source.info.spec.component_names + (("unet_refiner",) if refiner is not None else ())
    wanted = options.components or own
    convertible = set(own) | {"vae_encoder", "controlled_unet"}
    bad = [c for c in wanted if c not in convertible]
    if bad:
        hint = " (a refiner's UNet: pass the refiner with --refiner FILE)" if bad[0] == "unet_refiner" else ""
        raise ConversionError(f"a {source.info.family} model has no {bad[0]} to convert{hint}; its components: "
                              f"{choices_text(c for c in COMPONENTS if c in convertible)}")
    return [c for c in COMPONENTS if c in wanted]


def convert_model(source: ModelSource, out_dir: Path, options: ConvertOptions = ConvertOptions(), *,
                  force: bool = False, on_stage: Callable[[StageRecord], None] | None = None,
                  controlnets: Sequence[Any] = (), refiner: ModelSource | None = None) -> ConversionResult:
    """Convert `source` into a verified model folder at `out_dir` (see the module docstring).
    `controlnets`: ControlNet files or folders to convert too (controlnet/<Name>.mlpackage each, and the
    ControlledUnet that takes their residuals; see conversion/controlnet.py). `refiner`: an SDXL
    refiner whose UNet goes into the same folder as UnetRefiner (Apple's layout: it shares the
    base's TextEncoder2, so its text encoder must be the base's)."""
    import torch

    from conversion.controlnet import convert_controlnet, open_controlnets

    options.validate()
    _check_source(source)
    nets = open_controlnets(controlnets, source)
    if nets and options.prompt_chunks > 1:
        raise ConversionError("--max-prompt-chunks with --controlnet is not supported: the ControlNets take a "
                              "77-token context; convert ControlNet models with --max-prompt-chunks 1")
    if nets and len(options.sizes) > 1:
        raise ConversionError("--sizes with --controlnet is not supported: the ControlledUnet's residual inputs would "
                              "all have flexible sizes, and Core ML takes several enumerated inputs only from iOS 18 / "
                              "macOS 15 on")
    target = check_target(Path(out_dir), force=force)
    timer = StageTimer(on_stage)
    components = model_components(source, options, refiner)
    if nets and "controlled_unet" not in components:
        components = [c for c in COMPONENTS if c in {*components, "controlled_unet"}]
    if refiner is not None:
        _check_source(refiner)
        from coreml_sd.refiner import check_compatible

        check_compatible(source.info, refiner.info)
    with atomic_folder(target, force=force) as folder:
        with timer("model", "load"):
            mods = source.torch_modules(device="cpu", dtype=options.torch_dtype)
        from conversion.ane.config import UNetConfig

        shapes = _shapes(source, options, UNetConfig.from_diffusers(mods.unet.config).downscale)
        if options.weights != "fp16" and not set(components) & set(COMPRESSIBLE):
            log.warning("--weights %s compresses only %s; none of them is converted", options.weights,
                        choices_text(COMPRESSIBLE))
        conv = Converter(source, folder, options, timer, background_gate=_background_gate(options, mods))
        vae_parts = [c for c in components if c.startswith("vae_")]
        encoders = [spec.component for spec in source.info.spec.text_encoders if spec.component in components]
        order = [c for c in (*encoders, *vae_parts, "controlled_unet", "unet") if c in components]
        # A large UNet (SDXL's) starts only after the earlier checks: its reference and a check would not fit.
        serial = conv.gates.background and _module_bytes(mods.unet) > SERIAL_UNET_BYTES
        conv.alone = set() if nets or "unet_refiner" in components or not order else {order[-1]}
        before_unet = [c for c in order if c not in ("controlled_unet", "unet")]
        if serial and before_unet:  # the conversion waits while this one's check runs
            conv.alone.add(before_unet[-1])
        shared = {}  # digests of the base's text encoders a refiner must share
        token = _REBALANCE.set(conv.gates.balance_threads)
        try:
            with torch.no_grad():
                for spec in source.info.spec.text_encoders:
                    if refiner is not None and mods.module(spec.component) is not None:
                        shared[spec.component] = module_digest(mods.module(spec.component))
                    if spec.component in components:
                        convert_text_encoder(conv, mods, spec.component)
                if vae_parts:
                    convert_vae(conv, mods, shapes, vae_parts)
                mods.vae = mods.text_encoder = mods.text_encoder_2 = None
                release_memory()
                if serial:
                    with timer("model", "gate wait", "before the UNet: its reference and a check would not fit"):
                        conv.finish_gates()
                if "controlled_unet" in components:  # before the UNet, which frees the module
                    convert_unet(conv, mods, shapes, "controlled_unet")
                if "unet" in components:
                    convert_unet(conv, mods, shapes)
                del mods
                gc.collect()
                for net in nets:
                    convert_controlnet(conv, net, shapes)
                refined = convert_refiner(conv, refiner, shapes, shared) if "unet_refiner" in components else {}
            with timer("model", "hash"):  # beside the last gate run
                record = source_record(source)
            with timer("model", "gate wait"):
                conv.finish_gates()
        finally:
            _REBALANCE.reset(token)
            conv.gates.close()
        if options.compile:
            _compile_all(conv)
        with timer("model", "write"):
            manifest = _manifest(conv, shapes, record, refined)
            _copy_tokenizer(source, folder, conv.packages)
            manifest.write(folder)
    return ConversionResult(target, manifest, conv.parity, timer.records, timer.summary())


def module_digest(module) -> str:
    """sha256 of a module's parameter names and bytes (to tell whether two text encoders are the same)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().contiguous().cpu().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()


def convert_refiner(conv: Converter, refiner: ModelSource, shapes: Shapes, shared: dict[str, str]) -> dict:
    """The refiner's UNet as UnetRefiner; its text encoders must be packages of this folder already."""
    info = refiner.info
    with conv.timer("unet_refiner", "load"):
        mods = refiner.torch_modules(device="cpu", dtype=conv.options.torch_dtype)
    for spec in info.spec.text_encoders:
        if shared.get(spec.component) != module_digest(mods.module(spec.component)):
            raise ConversionError(f"the refiner's {spec.component} differs from {conv.source.info.name}'s; in Apple's "
                                  f"layout the refiner uses the base's, so convert the refiner into a folder of its "
                                  f"own and give it at generation with --refiner FOLDER")
        setattr(mods, spec.component, None)
    mods.vae = None
    release_memory()
    convert_unet(conv, mods, replace(shapes, text_hidden=info.text_hidden_size), "unet_refiner", refiner)
    return {"name": info.name, "family": info.family, "hash": info.hash, "scheduler": info.scheduler.to_dict(),
            "text_hidden_size": info.text_hidden_size, "pad_token": info.pad_token, "source": source_record(refiner)}


def _background_gate(options: ConvertOptions, mods) -> bool:
    if options.background_gate is not None:
        return options.background_gate
    size = sum(_module_bytes(getattr(mods, n, None)) for n in ("text_encoder", "text_encoder_2", "unet", "vae"))
    return size > BACKGROUND_GATE_BYTES


def _module_bytes(module) -> int:
    return 0 if module is None else sum(p.numel() * p.element_size() for p in module.parameters())


def _compile_all(conv: Converter) -> None:
    """`.mlmodelc` of every package where Apple's Swift pipeline looks for it: beside the packages
    (swift layout) or in Resources/ (python and both: Apple's Python pipeline refuses a folder
    mixing packages and compiled models), under its Swift resource name."""
    for component, info in list(conv.packages.items()):
        target = conv.folder / package_names(conv.options.layout, conv.source.info.name, component).compiled
        target.parent.mkdir(parents=True, exist_ok=True)
        with conv.timer(component, "compile"):
            compile_package(conv.folder / info.package, target)
        conv.packages[component] = replace(info, compiled=target.relative_to(conv.folder).as_posix())


def _copy_tokenizer(source: ModelSource, folder: Path, packages: dict[str, PackageInfo]) -> None:
    """vocab.json and merges.txt beside the packages, and beside compiled models kept in a subfolder."""
    files = source.info.tokenizer_files
    places = {folder} | {(folder / p.compiled).parent for p in packages.values() if p.compiled}
    for place in places:
        shutil.copyfile(files.vocab, place / "vocab.json")
        shutil.copyfile(files.merges, place / "merges.txt")


def _manifest(conv: Converter, shapes: Shapes, source: dict, refiner: dict | None = None) -> Manifest:
    info, opts = conv.source.info, conv.options
    from coreml_sd.model_folder import package_hash

    measured = {k: replace(v, psnr_db=round(conv.parity[_parity_key(k)].min_psnr_db, 2),
                           sha256=package_hash(conv.folder / v.package))
                for k, v in conv.packages.items()}
    packages = {k: v for k, v in measured.items() if not k.startswith(CONTROLNET_KEY)}
    controlnets = {k[len(CONTROLNET_KEY):]: ControlNetPackage(v, *conv.controlnets[k[len(CONTROLNET_KEY):]])
                   for k, v in measured.items() if k.startswith(CONTROLNET_KEY)}
    parity = {"threshold_db": opts.threshold_db, "executor": conv.runner.name,
              "reference": "upstream torch modules (diffusers/transformers) computing in fp32 with the weights "
                           "the package stores (fp16/fp32), seeded inputs; compressed packages: the rewritten "
                           "modules with the dequantized weights, in fp32",
              "components": {k: {**v.to_dict(), **conv.extra_parity.get(k, {})} for k, v in conv.parity.items()}}
    return Manifest(
        name=info.name, family=info.family, scheduler=info.scheduler, width=shapes.width, height=shapes.height,
        sizes=[list(size) for size in shapes.sizes], layout=opts.layout, prompt_chunks=opts.prompt_chunks,
        clip_skip=opts.clip_skip,
        batch=shapes.batch, latent_channels=info.latent_channels, vae_scale_factor=info.vae_scale_factor,
        scaling_factor=info.scaling_factor, text_hidden_size=info.text_hidden_size, attention=opts.attention,
        weights=opts.weights, precision=opts.precision, min_target=opts.min_target, components=packages,
        pad_token=info.pad_token,
        max_length=TEXT_LENGTH, trigger_words=conv.source.trigger_ids(), source=source,
        tools=tool_versions(), parity=parity, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        controlnets=controlnets, refiner=refiner or {},
    )


def _parity_key(component: str) -> str:
    return entry_component(component)


def tool_versions() -> dict[str, str]:
    import platform

    import coreml_sd

    out = {"coreml_sd": coreml_sd.__version__, "python": platform.python_version()}
    for mod in ("coremltools", "torch", "diffusers", "transformers", "numpy"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return out


def source_record(source: ModelSource) -> dict[str, Any]:
    """Where the model came from: path, kind, sha256 and the modifiers baked in (to reopen it)."""
    origin = source.origin
    return {"path": str(Path(origin.path).absolute()), "kind": origin.kind,
            "sha256": source_sha256(Path(origin.path)), "hash": origin.hash,
            "modifiers": {k: v for k, v in origin.modifiers.items() if k != "hypernetworks"},
            "generation_extras": dict(source.generation_extras)}


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".json", ".txt")


def source_sha256(path: Path) -> str:
    """sha256 of a single file; of a folder, the sha256 of "<relative path> <file sha256>" lines."""
    import hashlib

    from coreml_sd.checkpoint.safeload import sha256_file

    if path.is_file():
        return sha256_file(path)
    lines = [f"{p.relative_to(path).as_posix()} {sha256_file(p)}\n"
             for p in sorted(path.rglob("*")) if p.is_file() and p.suffix in WEIGHT_SUFFIXES]
    return hashlib.sha256("".join(lines).encode()).hexdigest()
