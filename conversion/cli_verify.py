"""`coreml-sd verify`: registered through the `coreml_sd.commands` entry point (it needs the
conversion's torch references, which the runtime package never imports).

The command only unpacks options and calls `conversion.verify_model.verify_model`.
"""

from __future__ import annotations

import json
import sys

import click

from coreml_sd.cli_checks import finite_float
from coreml_sd.cli_paths import InputPath
from conversion.cli import _quiet_libraries

COMPUTE_UNITS = ("cpu", "gpu", "ane", "all")  # coreml_sd.backends.coreml_backend.COMPUTE_UNITS


def _table(report) -> str:
    rows = [("check", "package", "PSNR dB", "pass at", "result")]
    for name, r in report.results.items():
        rows.append((name, report.packages.get(name, ""), f"{r.min_psnr_db:.1f}", f">= {r.threshold_db:g}",
                     "ok" if r.passed else "FAILED"))
    for name, why in report.skipped.items():
        rows.append((name, f"skipped: {why}", "", "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


@click.command("verify")
@click.argument("model_dir", type=InputPath(file_okay=False))
@click.option("--against", type=InputPath(), default=None,
              help="Source model to compare with (a checkpoint or diffusers folder). Default: the manifest's source.")
@click.option("--threshold", type=float, default=35.0, show_default=True, callback=finite_float,
              help="Minimum PSNR in dB for each package and for the end-to-end image.")
@click.option("--steps", type=click.IntRange(min=0), default=8, show_default=True,
              help="Sampler steps of the end-to-end image (0: check the packages only).")
@click.option("--compute-units", type=click.Choice(COMPUTE_UNITS), default="cpu", show_default=True,
              help="Core ML compute units (macOS); elsewhere the mil executor runs the packages (exact mode).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines.")
def verify(model_dir, against, threshold, steps, compute_units, as_json, quiet):
    """Check a converted MODEL_DIR against its source: PSNR per package and for one image.

    Exit status 1 when any check is under its threshold (compressed packages: what the conversion
    measured against the source, less 1 dB).
    """
    from coreml_sd.status import StatusLine
    from conversion.verify_model import VerifyOptions, verify_model

    verbose = click.get_current_context().find_root().params.get("verbose", 0)
    with _quiet_libraries(not verbose), StatusLine.for_terminal(quiet=quiet, as_json=as_json) as status:
        report = verify_model(model_dir, against=against, progress=status,
                              options=VerifyOptions(threshold_db=threshold, steps=steps, compute_units=compute_units))
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(f"{report.folder} against {report.source}\nexecutor: {report.executor}\n")
        click.echo(_table(report))
        if report.failed:
            worst = ", ".join(f"{n} {report.results[n].min_psnr_db:.1f} dB" for n in report.failed)
            click.echo(f"\nFAILED: {worst} (under the threshold)", err=True)
    sys.stdout.flush()
    if not report.passed:
        sys.exit(1)
