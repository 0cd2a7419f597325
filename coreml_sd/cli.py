"""The `coreml-sd` command line. It only unpacks options and calls the library."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from coreml_sd import __version__
from coreml_sd.errors import CoreMLSDError
from coreml_sd.cli_backends import info
from coreml_sd.cli_bench import bench
from coreml_sd.cli_doctor import register as register_doctor
from coreml_sd.cli_checkpoint import checkpoint
from coreml_sd.cli_control import control
from coreml_sd.cli_generate import generate
from coreml_sd.cli_recipe import recipe
from coreml_sd.cli_serve import serve
from coreml_sd.quiet_imports import quiet_third_party


class Group(click.Group):
    """Prints a CoreMLSDError as one line and exits 1, instead of a traceback; Ctrl-C exits 130 (the
    shell's code for SIGINT) with one line."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CoreMLSDError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM/SIGHUP during a conversion
            why = str(exc) or "interrupted (Ctrl-C)"
            click.echo(f"Stopped: {why}; outputs are written whole or not at all, nothing partial was left", err=True)
            sys.exit(130)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="coreml-sd")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """Convert Stable Diffusion checkpoints to Core ML once, then generate images anywhere."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    quiet_third_party(verbose)


@main.command()
@click.argument("paths", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
def models(paths, as_json):
    """List the built-in model (used when --model is not given) and the models at PATHS.

    A PATH is a model (a Core ML folder, ours or another tool's, a diffusers folder or a checkpoint)
    or a folder of models. For Core ML folders: components, sizes, compression, chunking, ControlNet
    support, and who converted it.
    """
    from coreml_sd.checkpoint.config import CheckpointConfig, sidecar_path
    from coreml_sd.info import model_summary, render_summary
    from coreml_sd.sources import BUILTIN, BUILTIN_NAMES, builtin_checkpoint, model_paths, open_model

    path = builtin_checkpoint()
    config = CheckpointConfig.from_json(sidecar_path(path))
    entry = {"name": BUILTIN, "aliases": [n for n in BUILTIN_NAMES if n != BUILTIN], "default": True,
             "path": str(path), "size_bytes": path.stat().st_size,
             "family": config.family, "native_size": f"{config.sample_size}x{config.sample_size}",
             "prediction_type": config.scheduler.prediction_type, "description": config.description}
    found = [model_summary(open_model(p)) for p in model_paths(paths)]
    if as_json:
        click.echo(json.dumps([entry, *found], indent=2))
        return
    also = ", ".join(entry["aliases"])
    click.echo(f"{entry['name']} (default; also: {also})  {entry['native_size']}  {entry['size_bytes'] / 1e6:.1f} MB  "
               f"{path}")
    click.echo(f"  {entry['description']}")
    for summary in found:
        click.echo(render_summary(summary))


def _load_plugin_commands() -> None:
    """Add commands packaged outside the runtime (e.g. `convert`), declared as entry points."""
    from importlib.metadata import entry_points

    for ep in entry_points(group="coreml_sd.commands"):
        if ep.name not in main.commands:
            main.add_command(ep.load(), ep.name)


main.add_command(generate)
main.add_command(checkpoint)
main.add_command(info)
main.add_command(bench)
register_doctor(main)
main.add_command(control)
main.add_command(recipe)
main.add_command(serve)
_load_plugin_commands()


if __name__ == "__main__":
    main()
