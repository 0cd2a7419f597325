"""`coreml-sd bench`: per-step latency, load time and memory of several backends on one model.

The command only unpacks options and calls `coreml_sd.bench`; nothing heavy is imported until it runs.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import click

from coreml_sd.backends.torch_compile import COMPILE_MODES
from coreml_sd.bench.models import DEFAULT_MODEL
from coreml_sd.bench.runner import ATTENTIONS, ISOLATIONS
from coreml_sd.bench.targets import BACKENDS, PRECISIONS, parse_precisions, parse_runs
from coreml_sd.conversion_names import WEIGHT_MODES as WEIGHTS
from coreml_sd.errors import InputError

ALL_BACKENDS = ",".join(BACKENDS)


def _precisions(ctx, param, value: str) -> tuple[str, ...]:
    try:
        return parse_precisions(value)
    except InputError as exc:
        raise click.BadParameter(str(exc)) from None


def _backends(ctx, param, value: str) -> str:
    try:
        parse_runs(value)
    except InputError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


def _size(ctx, param, value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    w, sep, h = value.lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit() or int(w) < 64 or int(h) < 64 or int(w) % 64 or int(h) % 64:
        raise click.BadParameter(f"expected WIDTHxHEIGHT in pixels, multiples of 64 (e.g. 512x512); got {value!r}")
    return int(w), int(h)


def _write_atomic(path: Path, text: str) -> None:
    from coreml_sd.outputs import replacing

    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _command(params: dict) -> str:
    """The command line that reproduces this run, from the parsed options."""
    parts = ["coreml-sd", "bench"]
    for name, value in params.items():
        if value is None or value is False or name in ("as_json", "compare"):
            continue
        flag = "--" + name.replace("_", "-")
        if name == "size":
            value = f"{value[0]}x{value[1]}"
        elif name == "precision":
            value = ",".join(value)
        parts += [flag] if value is True else [flag, str(value)]
    return shlex.join(parts)


def _show_comparison(paths: tuple[str, str], as_json: bool) -> None:
    from coreml_sd.bench.report import compare, compare_text, read_result

    a, b = (read_result(Path(p)) for p in paths)
    result = compare(a, b)
    if as_json:
        click.echo(json.dumps({"a": paths[0], "b": paths[1], **result}, indent=2))
    else:
        click.echo(compare_text(result, paths[0], paths[1]), nl=False)


@click.command("bench")
@click.option("-m", "--model", default=None,
              help=f"{DEFAULT_MODEL} (default: SD 1.5's architecture with random weights, written once to the "
                   "cache), builtin, or a path: diffusers folder, .safetensors/.ckpt file, converted model folder.")
@click.option("--backends", default=ALL_BACKENDS, show_default=True, callback=_backends,
              help="Comma-separated; `name:precision` for one precision. Unavailable ones are reported skipped.")
@click.option("--precision", default="auto", show_default=True, callback=_precisions,
              help=f"For torch-* and mil: one or a comma-separated list of {', '.join(PRECISIONS)}. Core ML runs "
                   "the package's precision; diffusers its default for the device (fp32 CPU, fp16 GPU).")
@click.option("--steps", type=click.IntRange(min=1), default=5, show_default=True, help="Timed UNet steps.")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True,
              help="Untimed UNet steps first (compiled backends compile here: use 3 with --torch-compile).")
@click.option("--runs", type=click.IntRange(min=1), default=3, show_default=True,
              help="Timed text-encoder and VAE-decoder calls.")
@click.option("--e2e-steps", type=click.IntRange(min=1), default=4, show_default=True,
              help="Sampler steps of the end-to-end generation (prompt to image: text encoding, steps, decoding).")
@click.option("--img2img-strength", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Also time the VAE encoder and an img2img generation of --e2e-steps steps at this denoising "
                   "strength (0: not measured).")
@click.option("--few-steps", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also time a few-step generation (LCM at guidance 1, LCM-LoRA's recipe) of this many steps; "
                   "0: not measured.")
@click.option("--size", default=None, callback=_size, help="WIDTHxHEIGHT, e.g. 512x512. Default: the model's.")
@click.option("--prompt", default=None, help="Prompt for the text encoder and the generation.")
@click.option("--attention", type=click.Choice(ATTENTIONS), default="auto", show_default=True,
              help="Conversion for mil/coreml-*: auto = split_einsum_v2 for coreml-ane, original for the others.")
@click.option("--weights", type=click.Choice(WEIGHTS), default="fp16", show_default=True,
              help="Conversion weight compression for mil/coreml-*.")
@click.option("--torch-compile", type=click.Choice(tuple(COMPILE_MODES)), default=None,
              help="torch.compile the torch-* UNets in this mode (GPU; see coreml_sd/backends/torch_compile.py).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch threads (default: one per core). On a busy shared machine fewer can be much faster.")
@click.option("--isolation", type=click.Choice(ISOLATIONS), default="process", show_default=True,
              help="process: each backend in a fresh process (honest cold load and memory); inline: one process.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Random model and conversions. Default: the cache folder ($COREML_SD_CACHE, ~/Library/Caches/coreml-sd on macOS, ~/.cache/coreml-sd elsewhere) + /bench.")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), default=Path("bench-results"),
              show_default=True, help="Folder for NAME.json, NAME.md and NAME.png.")
@click.option("--name", default="bench", show_default=True, help="File name stem of the outputs.")
@click.option("--json", "as_json", is_flag=True, help="Print the result JSON on stdout (progress stays on stderr).")
@click.option("--compare", nargs=2, type=click.Path(exists=True, dir_okay=False), default=None,
              metavar="A.json B.json", help="Only compare two result files: B/A per backend and metric.")
def bench(model, backends, precision, steps, warmup, runs, e2e_steps, img2img_strength, few_steps, size, prompt, attention, weights,
          torch_compile, threads, isolation, cache_dir, output, name, as_json, compare):
    """Measure load time, per-step latency and memory of each backend on one model."""
    if compare:
        _show_comparison(compare, as_json)
        return
    from coreml_sd.bench.measure import DEFAULT_PROMPT, Settings
    from coreml_sd.bench.report import markdown_table, write_chart
    from coreml_sd.bench.runner import BenchRequest, run_bench

    command = _command(click.get_current_context().params)
    settings = Settings(warmup=warmup, steps=steps, runs=runs, e2e_steps=e2e_steps, img2img_strength=img2img_strength, few_steps=few_steps,
                        width=size[0] if size else None, height=size[1] if size else None,
                        prompt=prompt or DEFAULT_PROMPT, torch_compile=torch_compile, threads=threads)
    request = BenchRequest(runs=tuple(parse_runs(backends, precision)), model=model, settings=settings,
                           cache_dir=cache_dir, attention=attention, weights=weights, isolation=isolation,
                           command=command)
    result = run_bench(request, lambda line: click.echo(f"[bench] {line}", err=True))

    output.mkdir(parents=True, exist_ok=True)
    table = markdown_table(result)
    _write_atomic(output / f"{name}.json", json.dumps(result, indent=2) + "\n")
    _write_atomic(output / f"{name}.md", table)
    chart = write_chart(result, output / f"{name}.png")
    for path in (output / f"{name}.json", output / f"{name}.md", chart):
        if path:
            click.echo(f"wrote {path}", err=True)
    click.echo(json.dumps(result, indent=2) if as_json else table)
    if result.get("busy"):
        click.echo(f"Warning: {result['busy']}", err=True)
    failed = [r["label"] for r in result["runs"] if r["status"] == "failed"]
    if failed:
        click.echo(f"Error: {len(failed)} backend(s) failed: {', '.join(failed)} (reasons in the result)", err=True)
        sys.exit(1)
