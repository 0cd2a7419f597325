"""`coreml-sd generate`: unpacks the options (and an image's recipe) and runs the pipeline."""

from __future__ import annotations

import json
import logging
import sys

import click

from coreml_sd.cli_backends import backend_options
from coreml_sd.cli_checkpoint import model_source_options, pop_source_kwargs
from coreml_sd.cli_controlnet import controlnet_options, pop_control_units
from coreml_sd.cli_checks import (MAX_BATCH_SIZE, MAX_NUM_IMAGES, MAX_STEPS, check_seed_range, finite_float,
                                  library_check, seed_value, side, threads_option)
from coreml_sd.backends.torch_compile import COMPILE_MODES
from coreml_sd.config import TIMESTEP_SPACINGS
from coreml_sd.images import FORMATS, save_image, slugify
from coreml_sd.samplers import SAMPLERS
from coreml_sd.schedules import SCHEDULES

log = logging.getLogger("coreml_sd")
RESIZE_MODES = ("stretch", "crop", "fill")
MASKED_CONTENT = ("original", "fill", "latent-noise", "latent-nothing")
EMPHASIS = ("Original", "No norm", "Ignore", "None")


def _sampler(value, name):
    from coreml_sd.sampler_names import resolve_sampler

    resolve_sampler(value)  # checked here; the pipeline resolves it again with --schedule
    return value


def _schedule(value, name):
    from coreml_sd.sampler_names import resolve_schedule

    return resolve_schedule(value)


def _compile_mode(value, name):
    if value is None:
        return None
    from coreml_sd.backends.torch_compile import check_mode

    return check_mode(value)


def _outpaint(value, name):
    from coreml_sd.outpaint import parse_outpaint

    parse_outpaint(value)
    return value


IMAGE_OPTIONS = (
    click.option("--init-image", type=click.Path(dir_okay=False), default=None,
                 help="Start from this picture (img2img; with --mask, inpainting)."),
    click.option("--strength", "--denoising-strength", type=float, default=None, callback=finite_float,
                 help="How much of the picture is redrawn, 0 < S <= 1 (A1111's denoising strength). Default 0.75."),
    click.option("--resize-mode", type=click.Choice(RESIZE_MODES), default="stretch", show_default=True,
                 help="How the picture reaches the size: A1111's Just resize / Crop and resize / Resize and fill."),
    click.option("--mask", type=click.Path(dir_okay=False), default=None,
                 help="Inpainting mask: white = repaint (alpha or grey levels)."),
    click.option("--invert-mask", is_flag=True, help="Repaint what the mask leaves black (A1111's 'Inpaint not masked')."),
    click.option("--mask-blur", type=click.IntRange(0, 64), default=4, show_default=True),
    click.option("--inpaint-full-res", is_flag=True, help="A1111's 'Only masked': the padded box at full size."),
    click.option("--inpaint-padding", type=click.IntRange(0, 256), default=32, show_default=True),
    click.option("--masked-content", type=click.Choice(MASKED_CONTENT), default="original", show_default=True),
    click.option("--outpaint", default=None, callback=library_check(_outpaint),
                 help="Grow the canvas and paint the new area: left=128,right=128,up=0,down=64."),
    click.option("--outpaint-fill", type=click.Choice(("edge", "noise")), default="edge", show_default=True),
    click.option("--hires-scale", type=float, default=None, callback=finite_float,
                 help="A1111's hires fix: generate, upscale by this, img2img at the larger size."),
    click.option("--hires-steps", type=click.IntRange(1, MAX_STEPS), default=None, help="Default: --steps."),
    click.option("--hires-denoise", type=float, default=0.7, show_default=True, callback=finite_float),
    click.option("--hires-upscaler", type=click.Choice(("latent", "lanczos")), default="latent", show_default=True),
)
PROMPT_OPTIONS = (
    click.option("--clip-skip", type=click.IntRange(1, 12), default=None,
                 help="A1111's Clip skip: the text encoder's hidden state N-1 layers before its last. Default: 1, "
                      "or what a converted model was converted with (convert --clip-skip)."),
    click.option("--emphasis", type=click.Choice(EMPHASIS), default="Original", show_default=True,
                 help="How (word:1.2) weights apply, as A1111's emphasis modes."),
    click.option("--recipe", type=click.Path(dir_okay=False, exists=True), default=None,
                 help="Take prompt, seed, sampler, size ... from an image's embedded parameters (A1111, "
                      "Forge, Easy Diffusion, ours); options given here win."),
)


def _options(options):
    def apply(command):
        for option in reversed(options):
            command = option(command)
        return command
    return apply


# The generate options a recipe may set, by the name `coreml_sd.recipe` gives them.
RECIPE_KEYS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "seed": "seed", "steps": "steps",
               "sampler": "sampler", "schedule": "schedule", "guidance_scale": "guidance_scale", "width": "width",
               "height": "height", "clip_skip": "clip_skip", "eta": "eta", "eta_noise_seed_delta": "ensd",
               "emphasis": "emphasis", "denoising_strength": "strength"}


def apply_recipe(ctx, kwargs: dict, path: str, model_hash: str | None, model_name: str | None) -> list[str]:
    """Options from the image's recipe where the command line did not give them; the warnings."""
    from coreml_sd.recipe import recipe_options

    options, warnings = recipe_options(path, model_hash=model_hash, model_name=model_name)
    for key, value in options.items():
        name = RECIPE_KEYS.get(key)
        if name is None:
            continue
        if name == "strength" and kwargs.get("init_image") is None:
            continue  # a txt2img recipe's denoising strength belongs to its hires pass
        given = name == "prompt" and kwargs.get("prompt") or (
            name != "prompt" and ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE)
        if not given:
            kwargs[name] = value
    kwargs["a1111"] = True  # a recipe made with AUTOMATIC1111 is reproduced on its plans
    return warnings


@click.command()
@click.argument("prompt", required=False)
@click.option("-m", "--model", default=None,
              help="Model: a converted Core ML folder, a diffusers folder or a .safetensors/.ckpt file. "
                   "Default: the built-in model.")
@click.option("-n", "--negative-prompt", default="", help="What the image should not show.")
@click.option("--refiner", type=click.Path(exists=True), default=None,
              help="A refiner model (e.g. SDXL's refiner: a file, diffusers or converted folder) that takes over "
                   "the last steps; a converted SDXL folder with a UnetRefiner package brings its own.")
@click.option("--refiner-switch", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="A1111's 'Refiner switch at': the fraction of the steps after which the refiner takes over "
                   "(default 0.8; 1 = never).")
@click.option("-s", "--seed", type=int, default=None, callback=seed_value,
              help="Seed of image 1 (image i uses seed+i). Default or -1: random, printed.")
@click.option("--num-images", "--batch-count", type=click.IntRange(1, MAX_NUM_IMAGES), default=1, show_default=True,
              help=f"Images to make (at most {MAX_NUM_IMAGES}, as AUTOMATIC1111's batch count).")
@click.option("--batch-size", type=click.IntRange(1, MAX_BATCH_SIZE), default=1, show_default=True,
              help="Images sampled together in one UNet batch (faster on GPUs; needs memory for each).")
@click.option("--sampler", default="euler_a", show_default=True, callback=library_check(_sampler),
              help=f"{', '.join(SAMPLERS)}; or A1111's names, e.g. 'Euler a', 'DPM++ 2M Karras'.")
@click.option("--schedule", default="default", show_default=True, callback=library_check(_schedule),
              help=f"{', '.join(SCHEDULES)} (A1111's schedule types; 'default': diffusers' for the samplers "
                   "diffusers has, else 'automatic', A1111's choice per sampler).")
@click.option("--eta", type=click.FloatRange(min=0), default=None, callback=finite_float,
              help="A1111's eta for ancestral/SDE samplers (default 1) and DDIM (default 0).")
@click.option("--ensd", type=int, default=0, show_default=True,
              help="A1111's 'Eta noise seed delta': step noise from seed + ENSD.")
@click.option("--a1111", is_flag=True,
              help="A1111's sigmas and noise for every sampler (e.g. 'DPM++ 2M SDE Karras' with its Brownian noise).")
@click.option("--steps", type=click.IntRange(1, MAX_STEPS), default=25, show_default=True,
              help=f"Sampler steps (at most {MAX_STEPS}: the noise schedule has {MAX_STEPS} timesteps).")
@click.option("-g", "--guidance-scale", "--cfg-scale", type=click.FloatRange(min=0), default=7.5, show_default=True,
              callback=finite_float)
@click.option("-W", "--width", type=int, default=None, callback=side,
              help="Multiple of 8. Default: the model's native size (an init image's own).")
@click.option("-H", "--height", type=int, default=None, callback=side,
              help="Multiple of 8. Default: the model's native size (an init image's own).")
@_options(IMAGE_OPTIONS)
@_options(PROMPT_OPTIONS)
@click.option("--format", "fmt", type=click.Choice(tuple(FORMATS)), default="jpeg", show_default=True)
@click.option("--quality", type=click.IntRange(1, 100), default=95, show_default=True, help="JPEG/WebP quality.")
@click.option("-o", "--output", type=click.Path(file_okay=False), default="outputs", show_default=True)
@backend_options
@click.option("--reduce-memory", is_flag=True,
              help="Load each component when it is used and free it after (text encoder, UNet, VAE in turn): "
                   "for 8 GB Macs; slower per request.")
@click.option("--compile", "compile_mode", is_flag=False, flag_value="auto", default=None, metavar="[MODE]",
              callback=library_check(_compile_mode),
              help="torch backend: torch.compile the UNet (auto, the default MODE: only where it was measured to "
                   f"pay; or one of {', '.join(COMPILE_MODES)}). Compiled graphs are cached for later runs.")
@click.option("--timestep-spacing", type=click.Choice(TIMESTEP_SPACINGS), default=None,
              help="Override the model's: 'trailing' for SD-Turbo/Hyper-SD-style few-step models.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@threads_option
@model_source_options
@controlnet_options
@click.pass_context
def generate(ctx, model, fmt, quality, output, backend, device, precision, compute_units, reduce_memory, compile_mode,
             as_json, quiet, threads, recipe, **kwargs):
    """Generate images from PROMPT (or from an image's --recipe)."""
    from coreml_sd.outputs import check_output_dir
    from coreml_sd.pipeline import Pipeline, random_seed
    from coreml_sd.threads import apply_threads, estimate_params

    kwargs["controlnets"] = pop_control_units(kwargs)
    source_kwargs = pop_source_kwargs(kwargs)
    refiner = kwargs.pop("refiner")
    check_seed_range(kwargs["seed"], kwargs["num_images"])  # before anything loads (and after a recipe)
    check_output_dir(output)  # -o somefile/sub or a read-only folder fails now, not after sampling
    if recipe is None and not kwargs.get("prompt"):
        raise click.UsageError("give a PROMPT (or --recipe IMAGE to take it from an image)")
    pipe = Pipeline.load(model, backend=backend, device=device, precision=precision, compute_units=compute_units,
                         reduce_memory=reduce_memory, refiner=refiner, compile=compile_mode, **source_kwargs)
    if recipe is not None:
        for warning in apply_recipe(ctx, kwargs, recipe, pipe.info.hash, pipe.info.name):
            log.warning("recipe: %s", warning)
    check_seed_range(kwargs["seed"], kwargs["num_images"])
    apply_threads(threads, estimate_params(pipe.info.path))
    kwargs["seed"] = random_seed() if kwargs["seed"] is None else kwargs["seed"]
    if not as_json:
        click.echo(f"seed {kwargs['seed']}", err=True)
    written, last = _run(pipe, kwargs, output, fmt, quality, as_json, quiet)
    if as_json:
        params = last.to_dict()
        params.pop("seed")
        summary = {"model": pipe.info.name, "runs_on": pipe.components.runs_on, "seed": kwargs["seed"],
                   "parameters": params, "images": written}
        click.echo(json.dumps(summary, indent=2))


def _run(pipe, kwargs: dict, output, fmt: str, quality: int, as_json: bool, quiet: bool):
    """Generate, saving each image as it comes; a progress bar per image (or batch) on stderr."""
    from tqdm import tqdm

    from coreml_sd.pipeline import GeneratedImage

    prompt = kwargs.pop("prompt")
    bar, written, last = None, [], None
    for event in pipe.generate(prompt, **kwargs):
        if isinstance(event, GeneratedImage):
            if bar:
                bar.close()
                bar = None
            path = save_image(event.image, output, f"{slugify(prompt)}-s{event.seed}-{event.index}", fmt,
                              event.params, quality)
            written.append({"path": str(path), "seed": event.seed, "index": event.index})
            last = event.params
            if not as_json:
                click.echo(str(path))
        elif not quiet:
            if bar is None:
                first, end = event.image_index + 1, event.image_index + event.batch
                which = f"image {first}" if first == end else f"images {first}-{end}"
                which += " (hires)" if event.phase == "hires" else ""
                bar = tqdm(total=event.steps, desc=f"{which}/{event.num_images}", unit="step", file=sys.stderr,
                           leave=False)
            bar.update(1)
    return written, last
