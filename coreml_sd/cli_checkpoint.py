"""CLI pieces for single-file checkpoints: the `checkpoint` group and the model-modifier options.

`model_source_options` adds `--vae`, `--lora FILE[:STRENGTH]` (repeatable), `--embedding`
(repeatable), `--hypernetwork FILE[:STRENGTH]` and `--prediction-type` to a command;
`source_kwargs(...)` turns their values into `open_model` keyword arguments. Nothing here imports
torch at module load.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import click

from coreml_sd.cli_paths import InputPath
from coreml_sd.config import PREDICTION_TYPES
from coreml_sd.paths import describe_missing

SOURCE_OPTION_NAMES = ("vae", "loras", "embeddings", "hypernetwork", "prediction_type")


def parse_weighted(value: str, what: str) -> tuple[Path, float]:
    """`FILE[:STRENGTH]` -> (path, strength). A file that exists under the whole name wins, so paths
    with colons (C:\\loras\\x.safetensors, a:b.pt) work; the strength is a finite float."""
    if Path(value).expanduser().is_file():
        return Path(value).expanduser(), 1.0
    head, sep, tail = value.rpartition(":")
    if not sep or not head or any(c in tail for c in "/\\"):
        raise click.BadParameter(f"{describe_missing(Path(value).expanduser()) or value + ' is not a file'} "
                                 f"(expected {what} FILE[:STRENGTH])")
    try:
        strength = float(tail)
    except ValueError:
        raise click.BadParameter(f"strength {tail!r} in {value!r} is not a number (expected FILE[:STRENGTH], "
                                 f"e.g. style.safetensors:0.8)") from None
    if not math.isfinite(strength):
        raise click.BadParameter(f"strength in {value!r} must be a finite number; got {tail}")
    path = Path(head).expanduser()
    if not path.is_file():
        raise click.BadParameter(f"{describe_missing(path) or head + ' is not a file'} "
                                 f"(expected {what} FILE[:STRENGTH])")
    return path, strength


def _weighted_many(ctx, param, values):
    return tuple(parse_weighted(v, param.name.rstrip("s")) for v in values or ())


def _weighted_one(ctx, param, value):
    return None if value is None else parse_weighted(value, param.name)


def model_source_options(command):
    """Decorator: the options that modify the model a command opens."""
    options = (
        click.option("--vae", type=InputPath(), default=None,
                     help="Replacement VAE: a .safetensors/.pt file (original or diffusers layout) "
                          "or a diffusers VAE folder."),
        click.option("--lora", "loras", multiple=True, metavar="FILE[:STRENGTH]", callback=_weighted_many,
                     help="kohya/A1111 LoRA or LoCon merged into the weights (strength default 1). Repeatable."),
        click.option("--embedding", "embeddings", multiple=True,
                     type=InputPath(dir_okay=False),
                     help="Textual-inversion embedding; its file name is the trigger word. Repeatable."),
        click.option("--hypernetwork", metavar="FILE[:STRENGTH]", default=None, callback=_weighted_one,
                     help="AUTOMATIC1111 hypernetwork (.pt) on the attention context (strength default 1); "
                          "torch backend only."),
        click.option("--prediction-type", type=click.Choice(PREDICTION_TYPES), default=None,
                     help="Override the model's prediction type (SD 2.x 768 models: v_prediction)."),
    )
    for option in reversed(options):
        command = option(command)
    return command


def source_kwargs(*, vae=None, loras=(), embeddings=(), hypernetwork=None, prediction_type=None) -> dict:
    """`open_model` keyword arguments from the values of `model_source_options`."""
    return {
        "vae": vae,
        "loras": list(loras or ()),
        "embeddings": list(embeddings or ()),
        "hypernetworks": [hypernetwork] if hypernetwork else [],
        "prediction_type": prediction_type,
    }


def pop_source_kwargs(options: dict) -> dict:
    """Remove the model-modifier option values from a command's kwargs and return `open_model` kwargs."""
    return source_kwargs(**{name: options.pop(name, None) for name in SOURCE_OPTION_NAMES})


@click.group("checkpoint")
def checkpoint() -> None:
    """Inspect single-file checkpoints and convert pickles to safetensors."""


@checkpoint.command("inspect")
@click.argument("file", type=InputPath(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--no-probe", is_flag=True, help="Do not run an SD 2.x UNet once to find its prediction type.")
def inspect_command(file: Path, as_json: bool, no_probe: bool) -> None:
    """Say what FILE is: family, prediction type, dtype, parameters, VAE/text encoder/EMA inside, sha256."""
    from coreml_sd.checkpoint.inspect import describe, inspect_file

    report = inspect_file(file, probe=not no_probe)
    click.echo(json.dumps(report, indent=2) if as_json else describe(report))


@checkpoint.command("to-safetensors")
@click.argument("file", type=InputPath(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output file. Default: FILE with the extension .safetensors.")
def to_safetensors_command(file: Path, output: Path | None) -> None:
    """Convert a pickled FILE (.ckpt/.pt/.bin) to .safetensors once, loading it safely."""
    from coreml_sd.checkpoint.inspect import to_safetensors

    click.echo(str(to_safetensors(file, output)))
