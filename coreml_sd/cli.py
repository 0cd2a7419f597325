"""The `coreml-sd` command line. It only unpacks options and calls the library."""

from __future__ import annotations

import json
import logging
import sys

import click

from coreml_sd import __version__
from coreml_sd.errors import CoreMLSDError, InputError
from coreml_sd.cli_backends import backend_options, info
from coreml_sd.cli_bench import bench
from coreml_sd.cli_checkpoint import checkpoint, model_source_options, pop_source_kwargs
from coreml_sd.cli_control import control
from coreml_sd.cli_recipe import recipe
from coreml_sd.cli_serve import serve
from coreml_sd.images import FORMATS, save_image, slugify
from coreml_sd.samplers import SAMPLERS
from coreml_sd.backends.torch_compile import COMPILE_MODES
from coreml_sd.config import TIMESTEP_SPACINGS
from coreml_sd.schedules import SCHEDULES


class Group(click.Group):
    """Prints a CoreMLSDError as one line and exits 1, instead of a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CoreMLSDError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(1)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="coreml-sd")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """Convert Stable Diffusion checkpoints to Core ML once, then generate images anywhere."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _sampler_name(ctx, param, value):
    from coreml_sd.sampler_names import resolve_sampler

    try:
        resolve_sampler(value)  # checked here (exit 2); the pipeline resolves it again with --schedule
    except InputError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


def _schedule_name(ctx, param, value):
    from coreml_sd.sampler_names import resolve_schedule

    try:
        return resolve_schedule(value)
    except InputError as exc:
        raise click.BadParameter(str(exc)) from None


def _compile_mode(ctx, param, value):
    if value is None:
        return None
    from coreml_sd.backends.torch_compile import check_mode

    try:
        return check_mode(value)
    except InputError as exc:
        raise click.BadParameter(str(exc)) from None


def _side(ctx, param, value):
    if value is None:
        return None
    from coreml_sd.pipeline import check_side

    try:
        return check_side(value, param.name)
    except InputError as exc:
        raise click.BadParameter(str(exc)) from None


@main.command()
@click.argument("prompt")
@click.option("-m", "--model", default=None,
              help="Model: a converted Core ML folder, a diffusers folder or a .safetensors/.ckpt file. "
                   "Default: the built-in model.")
@click.option("-n", "--negative-prompt", default="", help="What the image should not show.")
@click.option("-s", "--seed", type=click.IntRange(0, 2**64 - 1), default=None,
              help="Seed of image 1 (image i uses seed+i). Default: random, printed.")
@click.option("--num-images", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="Images sampled together in one UNet batch (faster on GPUs; needs memory for each).")
@click.option("--sampler", default="euler_a", show_default=True, callback=_sampler_name,
              help=f"{', '.join(SAMPLERS)}; or A1111's names, e.g. 'Euler a', 'DPM++ 2M Karras'.")
@click.option("--schedule", default="default", show_default=True, callback=_schedule_name,
              help=f"{', '.join(SCHEDULES)} (A1111's schedule types; 'default': diffusers' for the samplers "
                   "diffusers has, else 'automatic', A1111's choice per sampler).")
@click.option("--eta", type=click.FloatRange(min=0), default=None,
              help="A1111's eta for ancestral/SDE samplers (default 1) and DDIM (default 0).")
@click.option("--ensd", type=int, default=0, show_default=True,
              help="A1111's 'Eta noise seed delta': step noise from seed + ENSD.")
@click.option("--a1111", is_flag=True,
              help="A1111's sigmas and noise for every sampler (e.g. 'DPM++ 2M SDE Karras' with its Brownian noise).")
@click.option("--steps", type=click.IntRange(min=1), default=25, show_default=True)
@click.option("-g", "--guidance-scale", "--cfg-scale", type=click.FloatRange(min=0), default=7.5, show_default=True)
@click.option("-W", "--width", type=int, default=None, callback=_side,
              help="Multiple of 8. Default: the model's native size.")
@click.option("-H", "--height", type=int, default=None, callback=_side,
              help="Multiple of 8. Default: the model's native size.")
@click.option("--format", "fmt", type=click.Choice(tuple(FORMATS)), default="jpeg", show_default=True)
@click.option("--quality", type=click.IntRange(1, 100), default=95, show_default=True, help="JPEG/WebP quality.")
@click.option("-o", "--output", type=click.Path(file_okay=False), default="outputs", show_default=True)
@backend_options
@click.option("--reduce-memory", is_flag=True,
              help="Load each component when it is used and free it after (text encoder, UNet, VAE in turn): "
                   "for 8 GB Macs; slower per request.")
@click.option("--compile", "compile_mode", is_flag=False, flag_value="auto", default=None, metavar="[MODE]",
              callback=_compile_mode,
              help="torch backend: torch.compile the UNet (auto, the default MODE: only where it was measured to "
                   f"pay; or one of {', '.join(COMPILE_MODES)}). Compiled graphs are cached for later runs.")
@click.option("--timestep-spacing", type=click.Choice(TIMESTEP_SPACINGS), default=None,
              help="Override the model's: 'trailing' for SD-Turbo/Hyper-SD-style few-step models.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@model_source_options
def generate(prompt, model, negative_prompt, seed, num_images, batch_size, sampler, schedule, eta, ensd, a1111, steps,
             guidance_scale, width, height, fmt, quality, output, backend, device, precision, compute_units,
             reduce_memory, compile_mode, timestep_spacing, as_json, quiet, **source_options):
    """Generate images from PROMPT."""
    from tqdm import tqdm

    from coreml_sd.pipeline import GeneratedImage, Pipeline, random_seed

    pipe = Pipeline.load(model, backend=backend, device=device, precision=precision, compute_units=compute_units,
                         reduce_memory=reduce_memory, compile=compile_mode, **pop_source_kwargs(source_options))
    seed = random_seed() if seed is None else seed
    if not as_json:
        click.echo(f"seed {seed}", err=True)
    bar, written = None, []
    for event in pipe.generate(prompt, negative_prompt=negative_prompt, seed=seed, num_images=num_images,
                               batch_size=batch_size, sampler=sampler, schedule=schedule, steps=steps, guidance_scale=guidance_scale,
                               width=width, height=height, eta=eta, ensd=ensd, a1111=a1111,
                               timestep_spacing=timestep_spacing):
        if isinstance(event, GeneratedImage):
            if bar:
                bar.close()
                bar = None
            stem = f"{slugify(prompt)}-s{event.seed}-{event.index}"
            path = save_image(event.image, output, stem, fmt, event.params, quality)
            written.append({"path": str(path), "seed": event.seed, "index": event.index})
            if not as_json:
                click.echo(str(path))
        elif not quiet:
            if bar is None:
                first, last = event.image_index + 1, event.image_index + event.batch
                which = f"image {first}" if first == last else f"images {first}-{last}"
                bar = tqdm(total=event.steps, desc=f"{which}/{event.num_images}",
                           unit="step", file=sys.stderr, leave=False)
            bar.update(1)
    if as_json:
        params = event.params.to_dict()
        params.pop("seed")
        summary = {"model": pipe.info.name, "runs_on": pipe.components.runs_on, "seed": seed,
                   "parameters": params, "images": written}
        click.echo(json.dumps(summary, indent=2))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
def models(as_json):
    """List the built-in models (used when --model is not given)."""
    from coreml_sd.checkpoint.config import CheckpointConfig, sidecar_path
    from coreml_sd.sources import BUILTIN, builtin_checkpoint

    path = builtin_checkpoint()
    config = CheckpointConfig.from_json(sidecar_path(path))
    entry = {"name": BUILTIN, "default": True, "path": str(path), "size_bytes": path.stat().st_size,
             "family": config.family, "native_size": f"{config.sample_size}x{config.sample_size}",
             "prediction_type": config.scheduler.prediction_type, "description": config.description}
    if as_json:
        click.echo(json.dumps([entry], indent=2))
        return
    click.echo(f"{entry['name']} (default)  {entry['native_size']}  {entry['size_bytes'] / 1e6:.1f} MB  {path}")
    click.echo(f"  {entry['description']}")


def _load_plugin_commands() -> None:
    """Add commands packaged outside the runtime (e.g. `convert`), declared as entry points."""
    from importlib.metadata import entry_points

    for ep in entry_points(group="coreml_sd.commands"):
        if ep.name not in main.commands:
            main.add_command(ep.load(), ep.name)


main.add_command(checkpoint)
main.add_command(info)
main.add_command(bench)
main.add_command(control)
main.add_command(recipe)
main.add_command(serve)
_load_plugin_commands()


if __name__ == "__main__":
    main()
