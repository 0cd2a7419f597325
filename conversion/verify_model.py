"""Verify a converted model folder against its source: `coreml-sd verify`.

The same check as the conversion's parity gate (`conversion.verify`: the same seeded inputs, the
same upstream torch references computed in fp32 with the weights the package stores, the same
PSNR), run again at any later time — after copying a folder to another machine, or to find out
whether a package was damaged — plus an end-to-end check: one image generated from the same seed
through the packages and through the source model in torch.

Packages run in Core ML where its runtime is present (macOS, on the chosen compute units), else in
the `mil` executor in exact mode (Core ML's fp16 rounding). The source is the manifest's (with
the VAE, LoRAs and embeddings that were baked in), or another path given with `against`.

A compressed package (palettized, int8) cannot match the source to 35 dB by construction; the
conversion measured how close it came (`psnr_vs_source_db` in the manifest), and such a package
passes when it still comes that close (less a 1 dB margin for a different executor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from coreml_sd import arrays
from coreml_sd.components import FOLDER_KINDS, role
from coreml_sd.errors import ModelError
from coreml_sd.model_folder import ConvertedModel, Manifest
from conversion.verify import (MIN_PSNR_DB, VERIFY_PROMPT, ParityResult, compare, package_runner, psnr, to_8bit,
                               text_encoder_case, unet_case, vae_decoder_cases, vae_encoder_case)

COMPRESSED_MARGIN_DB = 1.0


def _silent(text: str) -> None:
    pass


IMAGE = "image"


@dataclass(frozen=True)
class VerifyOptions:
    threshold_db: float = MIN_PSNR_DB
    steps: int = 8  # end-to-end image: sampler steps (0: no image check)
    seed: int = 0
    guidance_scale: float = 7.5
    compute_units: str = "cpu"  # Core ML only (macOS)


@dataclass
class VerifyReport:
    folder: Path
    source: str
    executor: str
    results: dict[str, ParityResult] = field(default_factory=dict)  # components, then "image"
    packages: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # check -> why it did not run

    @property
    def failed(self) -> list[str]:
        return [name for name, r in self.results.items() if not r.passed]

    @property
    def passed(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "source": self.source, "executor": self.executor, "passed": self.passed,
                "failed": self.failed, "skipped": dict(self.skipped),
                "results": {k: {**v.to_dict(), "package": self.packages.get(k)} for k, v in self.results.items()}}


# -- package execution ----------------------------------------------------------------------------
def _coreml_here() -> bool:
    from coreml_sd.backends.coreml_backend import runtime_unavailable_reason

    return runtime_unavailable_reason() is None


def _run(runner, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from coreml_sd.backends.packages import call_package

    return {k: arrays.to_numpy(v).astype(np.float32) for k, v in call_package(runner, inputs).items()}


# -- the source -----------------------------------------------------------------------------------
def open_source(manifest: Manifest, against: str | Path | None):
    """The model the folder was converted from, with the modifiers that were baked in."""
    from coreml_sd.sources import open_model

    record = manifest.source or {}
    path = against or record.get("path")
    if not path or not Path(path).exists():
        raise ModelError(f"the manifest's source model {path or '(none recorded)'} is not there; pass the source "
                         f"checkpoint or diffusers folder with --against SOURCE")
    modifiers = dict(record.get("modifiers") or {})
    if "loras" in modifiers:
        modifiers["loras"] = [tuple(x) for x in modifiers["loras"]]
    return open_model(path, **modifiers)


def open_refiner_source(manifest: Manifest):
    """The refiner a folder's UnetRefiner was converted from (manifest.refiner's source record)."""
    from coreml_sd.sources import open_model

    record = (manifest.refiner or {}).get("source") or {}
    path = record.get("path")
    if not path or not Path(path).exists():
        raise ModelError(f"the manifest's refiner source {path or '(none recorded)'} is not there")
    return open_model(path, **dict(record.get("modifiers") or {}))


def _expected(manifest: Manifest, component: str, threshold: float) -> float:
    """The component's pass mark: the threshold, or for a compressed package what the conversion
    measured against the source (less a margin), whichever is lower."""
    figures = (manifest.parity.get("components", {}).get(component, {}) or {}).get("psnr_vs_source_db")
    if not figures:
        return threshold
    return min(threshold, min(v for v in figures.values() if v is not None) - COMPRESSED_MARGIN_DB)


# -- the checks -----------------------------------------------------------------------------------
def _cases(component: str, mods, source, manifest: Manifest) -> list[tuple[str, dict, dict, bool]]:
    """(label, package inputs, references, compare as 8-bit pixels too) per size the package takes (one
    for a text encoder; the VAE decoder's test latents at each size)."""
    if role(component) == "text_encoder":  # textual-inversion words baked in: checked too
        spec = source.info.spec.text_encoder(component)
        return [("", *text_encoder_case(mods.module(component), source.tokenizer(component),
                                        extra_words=list(source.trigger_ids()),
                                        hidden_layer=spec.hidden_layer - (manifest.clip_skip - 1),
                                        final_norm=spec.final_norm), False)]
    sizes = manifest.all_sizes
    cases = []
    for w, h in sizes:
        label = "" if len(sizes) == 1 else f" {w}x{h}"
        if role(component) == "vae_decoder":
            latent = (manifest.latent_channels, h // manifest.vae_scale_factor, w // manifest.vae_scale_factor)
            cases += [(label + (f" ({name})" if name else ""), inputs, refs, bool(name))
                      for name, inputs, refs in vae_decoder_cases(mods.vae, latent_shape=latent)]
        else:
            cases.append((label, *_case(component, mods, source, manifest, w, h), False))
    if role(component) == "unet":  # the default size with each longer text context the UNet takes
        w, h = sizes[0]
        label = "" if len(sizes) == 1 else f" {w}x{h}"
        cases += [(f"{label} {77 * k} tokens", *_case(component, mods, source, manifest, w, h, 77 * k), False)
                  for k in range(2, manifest.prompt_chunks + 1)]
    return cases


def _case(component: str, mods, source, manifest: Manifest, width: int, height: int, seq_len: int = 77):
    from conversion.convert import unet_extra_inputs

    latent = (manifest.latent_channels, height // manifest.vae_scale_factor, width // manifest.vae_scale_factor)
    kind = role(component)
    if kind == "unet":  # the base's (or ControlledUnet), or (unet_refiner) the refiner's from its own source
        from conversion.ane.config import UNetConfig
        from conversion.ane.unet import residual_shapes

        sample = (int(mods.unet.config.in_channels), *latent[1:])  # 9 channels for inpainting UNets
        residuals = (residual_shapes(UNetConfig.from_diffusers(mods.unet.config), manifest.batch, latent[1:])
                     if component == "controlled_unet" else ())  # its ControlNet residual inputs, seeded
        return unet_case(mods.unet, batch=manifest.batch, latent_shape=sample, context_dim=source.info.text_hidden_size,
                         seq_len=seq_len, extra=unet_extra_inputs(source, mods.unet.config, manifest.batch), residuals=residuals)
    return vae_encoder_case(mods.vae, image_shape=(3, height, width))


# Output names other tools' packages use for the same tensor (Apple's SDXL text encoders).
REFERENCE_NAMES = {"hidden_embeds": "last_hidden_state"}


def _reference_named(outputs: dict[str, np.ndarray], references: dict) -> dict[str, np.ndarray]:
    return {(REFERENCE_NAMES.get(k, k) if k not in references else k): v for k, v in outputs.items()}


def manifest_packages(folder: ConvertedModel) -> dict[str, list[Path]]:
    """component -> its package path(s) (a chunked UNet: both chunks, in order), as converted."""
    return {c: folder.package_paths(c) for c in FOLDER_KINDS if folder.has(c)}


def check_components(folder: ConvertedModel, source, options: VerifyOptions, report: VerifyReport,
                     progress: Callable[[str], None] = _silent) -> None:
    """Each package against the upstream module on the conversion gate's seeded inputs."""
    import torch

    manifest = folder.manifest
    dtype = torch.float16 if manifest.precision == "fp16" else torch.float32
    # Loaded in the package precision, then computed in fp32: the weights the package stores.
    progress(f"loading the source model's weights ({source.info.path})")
    mods = source.torch_modules(device="cpu", dtype=dtype)
    with torch.inference_mode():
        for entry, paths in manifest_packages(folder).items():
            progress(f"{entry}: computing the torch reference and running {', '.join(p.name for p in paths)}")
            src, m, component = source, mods, entry
            if entry == "unet_refiner":  # the refiner's UNet, against the refiner's recorded source
                src = open_refiner_source(manifest)
                m, component = src.torch_modules(device="cpu", dtype=dtype), "unet"
            module = m.module(component).float()
            cases = _cases(component, m, src, manifest)
            module.to(dtype)
            runner = package_runner(paths, options.compute_units)
            report.executor = runner.describe()
            report.packages[entry] = ", ".join(p.name for p in paths)
            outputs, refs = {}, {}
            for label, inputs, case_refs, pixels in cases:  # several cases gated as one, as at conversion
                got = _reference_named(_run(runner, inputs), case_refs)
                for k, ref in case_refs.items():
                    outputs[k + label], refs[k + label] = got[k], ref
                    if pixels:
                        outputs[f"{k}{label} 8-bit"], refs[f"{k}{label} 8-bit"] = to_8bit(got[k]), to_8bit(ref)
            del runner, m
            report.results[entry] = compare(entry, outputs, refs, executor=report.executor,
                                            threshold_db=_expected(manifest, entry, options.threshold_db))


def check_image(folder: ConvertedModel, source, options: VerifyOptions, report: VerifyReport,
                progress: Callable[[str], None] = _silent) -> None:
    """One image from the same seed through the packages and through the source in torch (fp32)."""
    from coreml_sd.backends import LoadOptions
    from coreml_sd.backends.selection import load_components, parse_backend
    from coreml_sd.pipeline import Pipeline

    kwargs = dict(seed=options.seed, steps=options.steps, sampler="euler", guidance_scale=options.guidance_scale,
                  width=folder.manifest.width, height=folder.manifest.height)
    progress(f"end-to-end image: {options.steps} euler steps through the source model in torch")
    reference = Pipeline(source, load_components(source, parse_backend("torch"),
                                                 LoadOptions(device="cpu", precision="fp32")))
    expected = np.asarray(reference(VERIFY_PROMPT, **kwargs)[0].image, dtype=np.float64)
    del reference
    progress(f"end-to-end image: {options.steps} euler steps through the packages")
    image = np.asarray(Pipeline(folder, _package_components(folder, options))(VERIFY_PROMPT, **kwargs)[0].image,
                       dtype=np.float64)
    result = ParityResult(IMAGE, {IMAGE: psnr(expected, image)}, options.threshold_db, report.executor)
    report.results[IMAGE] = result
    report.packages[IMAGE] = f"{options.steps} euler steps, seed {options.seed}, guidance {options.guidance_scale:g}"


def _package_components(folder: ConvertedModel, options: VerifyOptions):
    from coreml_sd.backends import LoadOptions
    from coreml_sd.backends.selection import load_components, parse_backend

    if _coreml_here():
        return load_components(folder, parse_backend("coreml"), LoadOptions(compute_units=options.compute_units,
                                                                            check_hashes=False))
    return load_components(folder, parse_backend("mil"), LoadOptions(device="cpu", mil_mode="exact",
                                                                     check_hashes=False))


def open_folder(folder: Path, against: str | Path | None):
    """(the folder as a source, the source model): a converted folder and its recorded (or given)
    source; a folder of another tool's Core ML models and the source given with `against`, whose
    prediction type and scheduler replace the folder's assumed ones."""
    from coreml_sd.model_folder import is_core_ml_folder

    if not is_core_ml_folder(folder):
        manifest = Manifest.read(folder)
        missing = [p.package for p in manifest.components.values() if not (folder / p.package).is_dir()]
        if missing:
            raise ModelError(f"{folder}: the manifest lists {', '.join(missing)}, which is not in the folder")
        return ConvertedModel(folder, partial=True), open_source(manifest, against)
    from coreml_sd.foreign_folder import ForeignFolder

    if against is None:
        raise ModelError(f"{folder} has no coreml-sd manifest, so no source model is recorded; pass the checkpoint or "
                         "diffusers folder it was converted from with --against SOURCE")
    from coreml_sd.sources import open_model

    source = open_model(against)
    converted = ForeignFolder(folder, partial=True, prediction_type=source.info.prediction_type)
    converted.info = replace(converted.info, scheduler=source.info.scheduler)
    return converted, source


def verify_model(folder: str | Path, *, against: str | Path | None = None,
                 options: VerifyOptions = VerifyOptions(), progress: Callable[[str], None] = _silent) -> VerifyReport:
    """Check every package of a converted folder (ours, or another tool's given its source), and an
    end-to-end image, against the torch source.

    `progress(text)` is told what each phase is doing as it starts (the CLI shows it on a terminal)."""
    if not math.isfinite(options.threshold_db):
        raise ModelError(f"threshold must be a finite number of dB; got {options.threshold_db}")
    folder = Path(folder)
    progress("opening the folder and the source model")
    converted, source = open_folder(folder, against)
    manifest = converted.manifest
    lacking = manifest.missing_for_generation()
    report = VerifyReport(folder, str(source.info.path), executor="")
    check_components(converted, source, options, report, progress)
    if options.steps <= 0:
        report.skipped[IMAGE] = "--steps 0"
    elif lacking:
        report.skipped[IMAGE] = f"a partial conversion (no {', '.join(lacking)} package) cannot generate"
    else:
        check_image(converted, source, options, report, progress)
    return report
