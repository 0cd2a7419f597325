"""CLI pieces about backends: the `--backend/--device/--precision/--compute-units` options and `info`.

Nothing here imports torch or coremltools at module load.
"""

from __future__ import annotations

import json

import click

from coreml_sd.backends.coreml_backend import COMPUTE_UNITS
from coreml_sd.backends.selection import BACKEND_HELP
from coreml_sd.errors import InputError


def _backend(ctx, param, value):
    from coreml_sd.backends.selection import parse_backend

    try:
        parse_backend(value)
    except InputError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


def backend_options(command):
    """Decorator: --backend, --device, --precision, --compute-units."""
    options = (
        click.option("--backend", default="auto", show_default=True, callback=_backend, metavar="SPEC",
                     help=BACKEND_HELP),
        click.option("--device", type=click.Choice(("auto", "cpu", "cuda", "mps")), default="auto", show_default=True,
                     help="torch and mil backends."),
        click.option("--precision", type=click.Choice(("auto", "fp32", "fp16", "bf16")), default="auto",
                     show_default=True, help="torch and mil backends. auto: fp16 on GPUs, bf16 on CPUs with native "
                                             "bf16, else fp32."),
        click.option("--compute-units", type=click.Choice(tuple(COMPUTE_UNITS)), default="all", show_default=True,
                     help="coreml backend: ane = CPU_AND_NE (Neural Engine), gpu = CPU_AND_GPU, cpu = CPU_ONLY, "
                          "all = ALL (Core ML decides)."),
    )
    for option in reversed(options):
        command = option(command)
    return command


@click.command("info")
@click.argument("model", required=False)
@backend_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines.")
def info(model, backend, device, precision, compute_units, as_json, quiet):
    """What MODEL is (default: the built-in model), its manifest if converted, and what would run where.

    Nothing is loaded: the backends only check whether they could run each component here.
    """
    from coreml_sd.backends import LoadOptions
    from coreml_sd.backends.selection import parse_backend
    from coreml_sd.info import model_report, render_text
    from coreml_sd.sources import open_model
    from coreml_sd.status import StatusLine

    with StatusLine.for_terminal(quiet=quiet, as_json=as_json) as status:
        status(f"opening {model or 'the built-in model'}")
        source = open_model(model)
        status("checking which backend could run each component here (imports torch and coremltools)")
        report = model_report(source, parse_backend(backend),
                              LoadOptions(device=device, precision=precision, compute_units=compute_units))
    click.echo(json.dumps(report, indent=2) if as_json else render_text(report))
