"""`coreml-sd convert`: registered through the `coreml_sd.commands` entry point.

The command only unpacks options and calls `conversion.convert.convert_model`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path

import click

from coreml_sd.cli_checkpoint import model_source_options, source_kwargs
from coreml_sd.apple_layouts import LAYOUTS
from coreml_sd.cli_checks import side, threads_option
from coreml_sd.components import FOLDER_KINDS
# The choices' one (light) owner, so `--help` needs no torch or coremltools import.
from coreml_sd.conversion_names import ATTENTION_IMPLEMENTATIONS as ATTENTIONS
from coreml_sd.conversion_names import MIN_TARGETS
from coreml_sd.conversion_names import WEIGHT_MODES as WEIGHTS

# ControlNets come with --controlnet; unet_refiner is a refiner's UNet (with --refiner)
COMPONENTS = tuple(k for k in FOLDER_KINDS if not FOLDER_KINDS[k].multiple)


def _components(ctx, param, value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    names = tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    bad = [n for n in names if n not in COMPONENTS]
    if bad or not names:
        raise click.BadParameter(f"{bad[0] if bad else value!r} is not a component; choose from "
                                 f"{', '.join(COMPONENTS)} (comma-separated)")
    return names


def _sizes(ctx, param, value):
    """"512x512,512x768" -> ((512, 512), (512, 768)) (width x height, pixels)."""
    if not value:
        return ()
    sizes = []
    for part in (p.strip() for p in value.split(",")):
        width, sep, height = part.lower().partition("x")
        if not sep or not width.strip().isdigit() or not height.strip().isdigit():
            raise click.BadParameter(f"{part!r} is not WIDTHxHEIGHT; write e.g. 512x512,512x768,768x512")
        size = (int(width), int(height))
        for v in size:
            side(ctx, param, v)
        sizes.append(size)
    return tuple(sizes)


@contextlib.contextmanager
def _quiet_libraries(enabled: bool):
    """coremltools/diffusers print a tqdm bar per pass pipeline and warn that Core ML's runtime is
    absent on Linux; the stage lines say what matters. Defaults `disable=True` for tqdm bars
    created meanwhile (an explicit `disable=` still wins) and raises coremltools' log level."""
    if not enabled:
        yield
        return
    from functools import partialmethod

    from tqdm import tqdm

    original = tqdm.__init__
    ct_logger = logging.getLogger("coremltools")
    level = ct_logger.level
    tqdm.__init__ = partialmethod(original, disable=True)
    ct_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        tqdm.__init__ = original
        ct_logger.setLevel(level)


@click.command("convert")
@click.argument("source", required=False, type=click.Path(path_type=Path))
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path),
              help="Model folder to write (must not exist, unless --force).")
@click.option("--attention", type=click.Choice(ATTENTIONS), default="split_einsum_v2", show_default=True,
              help="split_einsum(_v2): Neural Engine; original: GPU.")
@click.option("-W", "--width", type=int, default=None, callback=side, help="Pixels. Default: the model's size.")
@click.option("-H", "--height", type=int, default=None, callback=side, help="Pixels. Default: the model's size.")
@click.option("--sizes", default=None, callback=_sizes,
              help="Several image sizes, WIDTHxHEIGHT,... (e.g. 512x512,512x768,768x512): one UNet/VAE set takes "
                   "each (Core ML enumerated shapes; the first is the default). Instead of --width/--height.")
@click.option("--layout", type=click.Choice(LAYOUTS), default="swift", show_default=True,
              help="Package names: swift (Apple's Swift StableDiffusion resources), python (Apple's Python "
                   "pipeline: Stable_Diffusion_version_<name>_<component>.mlpackage), or both.")
@click.option("--max-prompt-chunks", "prompt_chunks", type=click.IntRange(1, 12), default=1, show_default=True,
              help="Longest prompt the UNet takes, in A1111's 75-token chunks (its text input takes 77 x 1..N tokens; "
                   "Core ML enumerated shapes). Not with several --sizes, --chunk-unet or --controlnet.")
@click.option("--clip-skip", type=click.IntRange(1, 12), default=1, show_default=True,
              help="A1111's 'Clip skip' baked into the text encoder package(s): 2 for most anime/NAI-derived models. "
                   "Generation with another clip skip needs the text encoder on torch.")
@click.option("--batch", type=click.Choice(("2", "1")), default="2", show_default=True,
              help="UNet batch: 2 for classifier-free guidance, 1 without.")
@click.option("--weights", type=click.Choice(WEIGHTS), default="fp16", show_default=True,
              help="UNet and text-encoder weights: fp16, palettized (k-means LUT) or int8.")
@click.option("--precision", type=click.Choice(("fp16", "fp32")), default="fp16", show_default=True,
              help="Program precision. fp32 is for checking and GPU-only use: the Neural Engine computes in fp16.")
@click.option("--chunk-unet", is_flag=True, help="Split the UNet into UnetChunk1/2 (iOS; compressed too).")
@click.option("--min-target", type=click.Choice(MIN_TARGETS), default="macOS13", show_default=True,
              help="Oldest OS the packages must load on.")
@click.option("--compile", "compile_", is_flag=True,
              help="Also write .mlmodelc folders, what Apple's Swift pipeline loads (macOS only): beside the "
                   "packages (swift layout) or in Resources/ (python, both).")
@click.option("--components", default=None, callback=_components,
              help=f"Which packages: {', '.join(COMPONENTS)}. Default: the model's own (its text encoder(s), unet, "
                   "vae_decoder; unet_refiner with --refiner).")
@click.option("--refiner", type=click.Path(exists=True, path_type=Path), default=None,
              help="An SDXL refiner whose UNet goes into the same folder as UnetRefiner (Apple's layout; it shares "
                   "the base's TextEncoder2).")
@click.option("--img2img", is_flag=True,
              help="Also convert the VAE encoder (img2img, inpainting, hires fix need it): adds vae_encoder to "
                   "--components.")
@click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
@click.option("--controlnet", "controlnets", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="Also convert this ControlNet (.pth/.safetensors or diffusers folder) into controlnet/<Name>."
                   "mlpackage, with the ControlledUnet that takes its residuals. Repeatable.")
@model_source_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines.")
@threads_option
def convert(source, output, attention, width, height, sizes, layout, prompt_chunks, clip_skip, batch, weights, precision, chunk_unet, min_target,
            compile_, components, refiner, img2img, force, controlnets, vae, loras, embeddings, hypernetwork,
            prediction_type, as_json, quiet, threads):
    """Convert SOURCE (a .safetensors/.ckpt checkpoint or a diffusers folder) into Core ML packages.

    Every package is checked against the torch model before the folder appears (PSNR >= 35 dB).
    """
    from coreml_sd.outputs import check_output_dir
    from coreml_sd.sources import open_model
    from coreml_sd.threads import apply_threads, estimate_params
    from conversion.atomic import check_target
    from conversion.convert import ConvertOptions, convert_model

    if img2img and components is not None and "vae_encoder" not in components:
        components = (*components, "vae_encoder")
    options = ConvertOptions(attention=attention, width=width, height=height, batch=int(batch), weights=weights,
                             precision=precision, chunk_unet=chunk_unet, min_target=min_target, compile=compile_,
                             components=components, sizes=sizes, layout=layout, prompt_chunks=prompt_chunks,
                             clip_skip=clip_skip)
    options.validate()

    show = _stage_printer(quiet)

    check_target(output, force=force)  # an existing or unwritable -o fails before the model is opened
    check_output_dir(output.expanduser().absolute().parent)
    verbose = click.get_current_context().find_root().params.get("verbose", 0)
    with _quiet_libraries(not verbose):
        model = open_model(source, **source_kwargs(vae=vae, loras=loras, embeddings=embeddings,
                                                   hypernetwork=hypernetwork, prediction_type=prediction_type))
        refined = open_model(refiner) if refiner is not None else None
        if components is None:  # the model's own, known once it is open
            from dataclasses import replace

            from conversion.convert import model_components

            components = tuple(model_components(model, options, refined)) + (("vae_encoder",) if img2img else ())
            options = replace(options, components=components)
        apply_threads(threads, estimate_params(model.info.path))
        if not quiet:
            nets = "".join(f", ControlNet {Path(c).name}" for c in controlnets)
            click.echo(f"converting {model.info.name} -> {output} ({', '.join(components)}{nets}; {attention}, "
                       f"{weights}, batch {batch})", err=True)
        result = convert_model(model, output, options, force=force, on_stage=show, controlnets=controlnets,
                               refiner=refined)
    if as_json:
        click.echo(json.dumps({
            "path": str(result.path), "components": {k: v.to_dict() for k, v in result.manifest.components.items()},
            "parity": {k: v.to_dict() for k, v in result.parity.items()}, "stages": [r.to_dict() for r in result.stages],
            "summary": result.summary,
        }, indent=2))
    else:
        for name, p in result.parity.items():
            click.echo(f"{name:<13} PSNR {p.min_psnr_db:6.1f} dB (>= {p.threshold_db:g})  {p.executor}", err=True)
        click.echo(str(result.path))
    sys.stdout.flush()


def _stage_printer(quiet: bool):
    def show(r) -> None:
        if not quiet:
            detail = f"  ({r.detail})" if r.detail else ""
            click.echo(f"  {r.component:<13} {r.stage:<10} {r.seconds:7.1f} s   peak {r.peak_rss_gib:5.2f} GiB{detail}",
                       err=True)

    return show


@click.command("convert-controlnet")
@click.argument("controlnet", type=click.Path(exists=True, path_type=Path))
@click.option("--into", "folder", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A folder written by `coreml-sd convert`; the ControlNet is added to it.")
@click.option("--force", is_flag=True, help="Replace a ControlNet of the same name in the folder.")
@click.option("--compile", "compile_", is_flag=True, help="Also write .mlmodelc folders (macOS only).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines.")
def convert_controlnet(controlnet, folder, force, compile_, as_json, quiet):
    """Add CONTROLNET (.pth/.safetensors or diffusers folder) to a converted model folder.

    It is converted with the folder's own size, batch, attention and weights, checked against the torch
    ControlNet (PSNR >= 35 dB), and written as controlnet/<Name>.mlpackage (with a ControlledUnet if the
    folder has none yet); the folder's other packages are not touched, and a failure changes nothing.
    """
    from conversion.controlnet import add_controlnet

    if compile_ and sys.platform != "darwin":
        raise click.UsageError("--compile needs macOS (Core ML's compiler runs only there)")
    verbose = click.get_current_context().find_root().params.get("verbose", 0)
    with _quiet_libraries(not verbose):
        result = add_controlnet(folder, controlnet, force=force, compile=compile_, on_stage=_stage_printer(quiet))
    if as_json:
        click.echo(json.dumps({"path": str(result.path), "name": result.name, "added": result.added,
                               "parity": result.parity}, indent=2))
    else:
        for name, p in result.parity.items():
            click.echo(f"{name:<13} PSNR {p['min_psnr_db']:6.1f} dB (>= {p['threshold_db']:g})  {p['executor']}",
                       err=True)
        click.echo(str(result.path / f"controlnet/{result.name}.mlpackage"))
    sys.stdout.flush()
