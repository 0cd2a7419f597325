"""`coreml-sd control ...`: ControlNet helpers. `preprocess` shows the map a ControlNet will see."""

from __future__ import annotations

import json
from pathlib import Path

import click

from coreml_sd.errors import InputError, choices_text

# The output format follows the file name, as people expect from `-o edges.png`.
_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


@click.group()
def control() -> None:
    """ControlNet helpers."""


def _preprocessor(ctx, param, value: str) -> str:
    from coreml_sd.control_preprocess import get_preprocessor

    try:
        return get_preprocessor(value).name
    except InputError as exc:
        raise click.BadParameter(str(exc)) from None


def _output(ctx, param, value: str) -> Path:
    path = Path(value)
    if path.suffix.lower() not in _FORMATS:
        raise click.BadParameter(f"{value}: the name must end in one of {choices_text(_FORMATS)}")
    if not path.parent.is_dir():
        raise click.BadParameter(f"{value}: folder {path.parent} does not exist")
    return path


@control.command("preprocess")
@click.argument("preprocessor", callback=_preprocessor)
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, callback=_output, help="Where to write the map (.png/.jpg/.webp).")
@click.option("--low", type=click.IntRange(0, 255), default=None, help="Canny low threshold (default 100).")
@click.option("--high", type=click.IntRange(0, 255), default=None, help="Canny high threshold (default 200).")
@click.option("--threshold", type=click.IntRange(0, 255), default=None, help="Threshold preprocessor's level (default 127).")
@click.option("--resolution", type=click.IntRange(min=0), default=512, show_default=True,
              help="A1111's \"Preprocessor resolution\" (short side); 0 = the image's own size.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def preprocess_command(preprocessor, image, output, low, high, threshold, resolution, as_json):
    """Run PREPROCESSOR (canny, scribble, threshold, invert, none) on IMAGE and write the map."""
    from coreml_sd.control_preprocess import preprocess
    from coreml_sd.image_input import load_image

    options = {k: v for k, v in (("low", low), ("high", high), ("threshold", threshold)) if v is not None}
    try:
        picture = load_image(image)
    except InputError as exc:
        raise click.BadParameter(str(exc), param_hint="IMAGE") from None
    try:
        result = preprocess(preprocessor, picture, resolution=resolution or None, **options)
    except InputError as exc:
        raise click.UsageError(str(exc)) from None
    write_atomically(result, output)
    if as_json:
        click.echo(json.dumps({"path": str(output), "preprocessor": preprocessor,
                               "size": list(result.size), "options": options, "resolution": resolution}))
    else:
        click.echo(str(output))


def write_atomically(image, path: Path) -> None:
    """Write to a temporary name beside `path`, then rename: never a half-written file at `path`."""
    from coreml_sd.outputs import replacing

    with replacing(path) as tmp:
        with open(tmp, "wb") as fh:
            image.save(fh, format=_FORMATS[path.suffix.lower()])
