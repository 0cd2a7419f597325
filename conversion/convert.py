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
from typing import Any, Callable, Iterator

import numpy as np

from coreml_sd.components import KINDS, PACKAGE_NAMES, TensorSpec, entry_component
from coreml_sd.errors import choices_text
from coreml_sd.families import PROVIDER_WIDTHS
from coreml_sd.model_folder import Manifest, PackageInfo
from coreml_sd.model_source import ModelSource
from conversion.ane.attention import ATTENTION_IMPLEMENTATIONS
from conversion.atomic import atomic_folder, check_target
from conversion.export import (MIN_TARGETS, WEIGHT_MODES, ConversionError, TensorIO, build_program,
                               compile_package, compress, to_mlmodel)
from conversion.gate import GateRun, GateRunner
from conversion.progress import StageRecord, StageTimer, release_memory
from conversion.reference import fp32_compute
from conversion.verify import MIN_PSNR_DB, ExtraIO, PackageRunner, ParityResult, compare

log = logging.getLogger(__name__)

COMPONENTS = tuple(KINDS)  # convertible components, in conversion order
DEFAULT_COMPONENTS = ("text_encoder", "unet", "vae_decoder")  # a model's own list: its family's component_names
# --weights compresses these; the VAE stays fp16 (small, and its errors show directly in pixels).
COMPRESSIBLE = ("text_encoder", "unet")
TEXT_LENGTH = 77
PRECISIONS = ("fp16", "fp32")


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
    components: tuple[str, ...] = DEFAULT_COMPONENTS
    threshold_db: float = MIN_PSNR_DB
    # Gate runs in a worker process beside the conversion; None: when the model's weights exceed
    # BACKGROUND_GATE_BYTES (a worker's start costs more than a small model's checks).
    background_gate: bool | None = None

    def validate(self) -> None:
        for name, value, valid in (("attention", self.attention, ATTENTION_IMPLEMENTATIONS),
                                   ("weights", self.weights, WEIGHT_MODES), ("precision", self.precision, PRECISIONS),
                                   ("min_target", self.min_target, MIN_TARGETS),
                                   ("batch", self.batch, (1, 2))):
            if value not in valid:
                raise ConversionError(f"{name} {value!r} is not supported; valid: {choices_text(valid)}")
        unknown = [c for c in self.components if c not in COMPONENTS]
        if unknown:
            raise ConversionError(f"unknown component {unknown[0]!r}; valid: {choices_text(COMPONENTS)}")
        if self.compile and sys.platform != "darwin":
            raise ConversionError("--compile needs macOS (Core ML's compiler runs only there); convert without "
                                  "--compile here: the packages compile on the Mac when first loaded")

    def weights_for(self, component: str) -> str:
        return self.weights if component in COMPRESSIBLE else "fp16"

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
    width: int
    height: int
    latent: tuple[int, int, int]  # (channels, h, w)
    batch: int
    text_hidden: int


def _shapes(source: ModelSource, options: ConvertOptions, unet_downscale: int) -> Shapes:
    info = source.info
    f = info.vae_scale_factor
    multiple = f * unet_downscale
    width = options.width or info.sample_size
    height = options.height or info.sample_size
    for name, v in (("width", width), ("height", height)):
        if v < multiple or v % multiple:
            raise ConversionError(f"{name} must be a positive multiple of {multiple} for this model "
                                  f"(VAE factor {f} x UNet downscale {unet_downscale}); got {v}")
    return Shapes(width, height, (info.latent_channels, height // f, width // f), options.batch,
                  info.text_hidden_size)


def _check_source(source: ModelSource) -> None:
    if source.origin.modifiers.get("hypernetworks"):
        raise ConversionError("hypernetworks change the UNet's attention at run time and cannot be baked into "
                              "Core ML packages; convert without --hypernetwork (use it with the torch backend)")


BACKGROUND_GATE_BYTES = 500 * 2**20


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
        self.expected: dict[str, tuple[dict, dict | None]] = {}  # component -> (references, dequantized)
        self.last_component: str | None = None  # the gate run submitted last may use every core

    def collect_gates(self, runs: list[GateRun]) -> None:
        """Judge finished gate runs (raises ConversionError on the first that fails)."""
        for run in runs:
            if self.gates.background:
                self.timer.base.record(StageRecord(run.component, "verify", run.seconds, run.peak_rss_gib,
                                                   f"{self.runner.name}, beside the conversion"))
            refs, deq = self.expected.pop(run.component)
            self.gate(run.component, run.outputs, refs, dequantized_reference=deq)

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
        package = self.folder / f"{PACKAGE_NAMES[component]}.mlpackage"
        with self.timer(component, "convert"):
            to_mlmodel(prog, min_target=opts.min_target, package_dir=package,
                       description=f"coreml-sd {component} of {self.source.info.name}",
                       metadata={"coreml_sd.component": component, "coreml_sd.attention": opts.attention,
                                 "coreml_sd.weights": weights})
        del prog
        release_memory()
        self.packages[component] = PackageInfo(
            package=package.name, inputs=tuple(_spec(io) for io in inputs),
            outputs=tuple(_spec(io) for io in outputs), weights=weights, size_bytes=_folder_size(package))
        return outputs, dense

    def gate(self, component: str, outputs: dict[str, np.ndarray], references: dict[str, np.ndarray],
             *, dequantized_reference: dict[str, np.ndarray] | None = None) -> ParityResult:
        """Record parity; the gate compares with the reference of the weights the package holds."""
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


def _reference_outputs(rewrite, inputs: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    """The rewrite in fp32 compute (weights as they are) on the package inputs."""
    import torch

    rewrite.compute_dtype_override = torch.float32
    try:
        with torch.inference_mode():
            out = rewrite(*[torch.from_numpy(np.asarray(v, dtype=np.float32)) for v in inputs.values()])
    finally:
        rewrite.compute_dtype_override = None
    out = out if isinstance(out, tuple) else (out,)
    return {n: o.float().numpy() for n, o in zip(names, out)}


# -- the components ---------------------------------------------------------------------------
def _verify(conv: Converter, component: str, chain: list[str], inputs: dict[str, np.ndarray],
            refs: dict[str, np.ndarray], dequantized_ref: dict[str, np.ndarray] | None) -> None:
    """Run the packages of `chain` in order (each taking its inputs by name from the inputs and the
    earlier outputs) and gate the last one's outputs: now, or in the gate worker (judged when it
    finishes, and before anything is written)."""
    steps = [(conv.folder / conv.packages[c].package, [(s.name, s.dtype) for s in conv.packages[c].inputs])
             for c in chain]
    outputs = [s.name for s in conv.packages[chain[-1]].outputs]
    conv.expected[component] = (refs, dequantized_ref)
    if conv.gates.background:
        conv.gates.submit(component, steps, inputs, outputs, last=component == conv.last_component)
        return
    with conv.timer(component, "verify", conv.runner.name):
        conv.gates.submit(component, steps, inputs, outputs)
        conv.collect_gates(conv.gates.take())


def _dequantized_reference(conv: Converter, component: str, rewrite, dense: dict[str, np.ndarray],
                           inputs: dict[str, np.ndarray], names: list[str]):
    if not dense:
        return None
    with conv.timer(component, "reference", "dequantized weights"):
        _set_weights(rewrite, dense)
        return _reference_outputs(rewrite, inputs, names)


def convert_text_encoder(conv: Converter, mods, shapes: Shapes) -> None:
    from conversion.ane import text_encoder_from_transformers
    from conversion.verify import text_encoder_case

    module, mods.text_encoder = mods.text_encoder, None
    with conv.timer("text_encoder", "reference"), in_fp32(module, conv.options):
        inputs, refs = text_encoder_case(module, conv.source.tokenizer(), extra_words=list(conv.source.trigger_ids()))
    rewrite = text_encoder_from_transformers(module, attention=conv.options.attention)
    del module
    c = shapes.text_hidden
    ins = [TensorIO("input_ids", (1, TEXT_LENGTH), "fp32")]
    outs = [TensorIO("last_hidden_state", (1, TEXT_LENGTH, c), "fp32"), TensorIO("pooled_outputs", (1, c), "fp32")]
    _, dense = conv.export("text_encoder", rewrite, lambda ops, ids: rewrite(ids, ops), ins, outs)
    deq = _dequantized_reference(conv, "text_encoder", rewrite, dense, inputs, list(refs))
    del rewrite
    release_memory()
    _verify(conv, "text_encoder", ["text_encoder"], inputs, refs, deq)


def convert_unet(conv: Converter, mods, shapes: Shapes) -> None:
    from conversion.ane import unet_from_diffusers
    from conversion.verify import unet_case

    module, mods.unet = mods.unet, None
    extras = unet_extra_inputs(conv.source, module.config, shapes.batch)
    with conv.timer("unet", "reference"), in_fp32(module, conv.options):
        inputs, refs = unet_case(module, batch=shapes.batch, latent_shape=shapes.latent,
                                 context_dim=shapes.text_hidden, extra=extras)
    rewrite = unet_from_diffusers(module, attention=conv.options.attention)
    del module
    release_memory()
    b, latent, p = shapes.batch, shapes.latent, conv.options.precision
    ins = [TensorIO("sample", (b, *latent), p), TensorIO("timestep", (b,), p),
           TensorIO("encoder_hidden_states", (b, shapes.text_hidden, 1, TEXT_LENGTH), p),
           *(TensorIO(e.name, e.shape, p) for e in extras)]
    out = TensorIO("noise_pred", (b, *latent), "fp32")
    if conv.options.chunk_unet:
        chain, dense = _export_unet_chunks(conv, rewrite, ins, out)
    else:
        chain = ["unet"]
        _, dense = conv.export("unet", rewrite, lambda ops, s, t, c, *x: [rewrite(s, t, c, *x, ops=ops)], ins, [out])
    deq = _dequantized_reference(conv, "unet", rewrite, dense, inputs, list(refs))
    del rewrite
    release_memory()
    _verify(conv, "unet", chain, inputs, refs, deq)


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


def _export_unet_chunks(conv: Converter, rewrite, ins: list[TensorIO], out: TensorIO):
    """UnetChunk1 (inputs -> features, time embedding, open skips) and UnetChunk2 (-> noise_pred)."""
    from conversion.ane.unet import UNetState, chunk_boundary

    stages = rewrite.stages()
    k = chunk_boundary(rewrite)
    open_skips = 1 + sum({"down": 1, "downsample": 1, "up": -1}.get(s.kind, 0) for s in stages[1:k])
    # After a down stage the features are also the newest skip: send them once.
    h_is_skip = stages[k - 1].kind in ("down", "downsample")

    def first(ops, sample, timestep, context, *extra):
        state = rewrite.run(rewrite.begin(sample, timestep, extra, ops), context, stages[1:k], ops)
        return ([] if h_is_skip else [state.h]) + [state.emb, *state.skips]

    names = ([] if h_is_skip else ["hidden_states"]) + ["time_embedding"] + [f"skip_{i}" for i in range(open_skips)]
    outs1, dense1 = conv.export("unet_chunk1", rewrite, first, ins,
                                [TensorIO(n, None, conv.options.precision) for n in names])

    def second(ops, *values):
        values, context = list(values[:-1]), values[-1]
        h = values[-1] if h_is_skip else values.pop(0)
        emb, skips = values[0], tuple(values[1:])
        return [rewrite.run(UNetState(h, emb, skips), context, stages[k:], ops).h]

    _, dense2 = conv.export("unet_chunk2", rewrite, second, outs1 + [ins[2]], [out])
    return ["unet_chunk1", "unet_chunk2"], {**dense1, **dense2}


def convert_vae(conv: Converter, mods, shapes: Shapes, components: list[str]) -> None:
    from conversion.ane import vae_decoder_from_diffusers, vae_encoder_from_diffusers
    from conversion.verify import vae_decoder_case, vae_encoder_case

    vae, mods.vae = mods.vae, None
    c, h, w = shapes.latent
    cases = {}
    with in_fp32(vae, conv.options):
        for component in components:
            with conv.timer(component, "reference"):
                if component == "vae_decoder":
                    cases[component] = vae_decoder_case(vae, latent_shape=shapes.latent)
                else:
                    cases[component] = vae_encoder_case(vae, image_shape=(3, shapes.height, shapes.width))
    for component in components:
        if component == "vae_decoder":
            rewrite = vae_decoder_from_diffusers(vae, attention=conv.options.attention)
            ins, outs = [TensorIO("z", (1, c, h, w), "fp32")], [TensorIO("image", (1, 3, shapes.height, shapes.width), "fp32")]
        else:
            rewrite = vae_encoder_from_diffusers(vae, attention=conv.options.attention)
            ins, outs = [TensorIO("x", (1, 3, shapes.height, shapes.width), "fp32")], [TensorIO("latent", (1, 2 * c, h, w), "fp32")]
        conv.export(component, rewrite, lambda ops, x: [rewrite(x, ops)], ins, outs)
        del rewrite
        release_memory()
        inputs, refs = cases[component]
        _verify(conv, component, [component], inputs, refs, None)


# -- the whole model --------------------------------------------------------------------------
def convert_model(source: ModelSource, out_dir: Path, options: ConvertOptions = ConvertOptions(), *,
                  force: bool = False, on_stage: Callable[[StageRecord], None] | None = None) -> ConversionResult:
    """Convert `source` into a verified model folder at `out_dir` (see the module docstring)."""
    import torch

    options.validate()
    _check_source(source)
    target = check_target(Path(out_dir), force=force)
    timer = StageTimer(on_stage)
    components = [c for c in COMPONENTS if c in options.components]
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
        order = [c for c in ("text_encoder", *vae_parts, "unet") if c in components]
        conv.last_component = order[-1] if order else None
        token = _REBALANCE.set(conv.gates.balance_threads)
        try:
            with torch.no_grad():
                if "text_encoder" in components:
                    convert_text_encoder(conv, mods, shapes)
                if vae_parts:
                    convert_vae(conv, mods, shapes, vae_parts)
                mods.vae = mods.text_encoder = None
                release_memory()
                if "unet" in components:
                    convert_unet(conv, mods, shapes)
            del mods
            gc.collect()
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
            manifest = _manifest(conv, shapes, record)
            _copy_tokenizer(source, folder)
            manifest.write(folder)
    return ConversionResult(target, manifest, conv.parity, timer.records, timer.summary())


def _background_gate(options: ConvertOptions, mods) -> bool:
    if options.background_gate is not None:
        return options.background_gate
    size = sum(p.numel() * p.element_size() for m in (getattr(mods, n, None) for n in ("text_encoder", "unet", "vae"))
               if m is not None
               for p in m.parameters())
    return size > BACKGROUND_GATE_BYTES


def _compile_all(conv: Converter) -> None:
    for component, info in list(conv.packages.items()):
        with conv.timer(component, "compile"):
            compiled = compile_package(conv.folder / info.package, conv.folder)
        conv.packages[component] = replace(info, compiled=compiled.name)


def _copy_tokenizer(source: ModelSource, folder: Path) -> None:
    files = source.info.tokenizer_files
    shutil.copyfile(files.vocab, folder / "vocab.json")
    shutil.copyfile(files.merges, folder / "merges.txt")


def _manifest(conv: Converter, shapes: Shapes, source: dict) -> Manifest:
    info, opts = conv.source.info, conv.options
    packages = {k: replace(v, psnr_db=round(conv.parity[_parity_key(k)].min_psnr_db, 2))
                for k, v in conv.packages.items()}
    parity = {"threshold_db": opts.threshold_db, "executor": conv.runner.name,
              "reference": "upstream torch modules (diffusers/transformers) computing in fp32 with the weights "
                           "the package stores (fp16/fp32), seeded inputs; compressed packages: the rewritten "
                           "modules with the dequantized weights, in fp32",
              "components": {k: {**v.to_dict(), **conv.extra_parity.get(k, {})} for k, v in conv.parity.items()}}
    return Manifest(
        name=info.name, family=info.family, scheduler=info.scheduler, width=shapes.width, height=shapes.height,
        batch=shapes.batch, latent_channels=info.latent_channels, vae_scale_factor=info.vae_scale_factor,
        scaling_factor=info.scaling_factor, text_hidden_size=info.text_hidden_size, attention=opts.attention,
        weights=opts.weights, precision=opts.precision, min_target=opts.min_target, components=packages, pad_token=info.pad_token,
        max_length=TEXT_LENGTH, trigger_words=conv.source.trigger_ids(), source=source,
        tools=tool_versions(), parity=parity, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
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
