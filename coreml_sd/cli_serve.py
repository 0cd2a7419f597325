"""`coreml-sd serve`: the web page and the AUTOMATIC1111-compatible API on a warm model.

Only click is imported here; FastAPI, uvicorn and the model load when the command runs.
"""

from __future__ import annotations

from pathlib import Path

import click

from coreml_sd.cli_backends import backend_options


@click.command("serve")
@click.option("-m", "--model", default=None,
              help="Model to load first: a title from --models-dir, or a path (converted folder, diffusers folder, "
                   ".safetensors/.ckpt). Default: the built-in model.")
@click.option("--models-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder whose converted folders, diffusers folders and checkpoints the page and "
                   "/sdapi/v1/sd-models offer.")
@click.option("--host", default=None, help="Address to bind. Default: 127.0.0.1 (this machine only).")
@click.option("--port", type=click.IntRange(0, 65535), default=7860, show_default=True)
@click.option("--listen", is_flag=True, help="Bind 0.0.0.0 (other machines can connect): needs --api-key "
                                             "or --insecure-no-auth.")
@click.option("--api-key", envvar="COREML_SD_API_KEY", default=None,
              help="Required from every client (Authorization: Bearer KEY, or HTTP Basic with KEY as the password). "
                   "Also read from $COREML_SD_API_KEY.")
@click.option("--insecure-no-auth", is_flag=True, help="Allow --listen without an API key.")
@backend_options
@click.option("--reduce-memory", is_flag=True, help="Load each component only while it is used (8 GB Macs).")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), default=Path("outputs"),
              show_default=True, help="Where every image is saved, with its parameters.")
@click.option("--no-save", is_flag=True, help="Do not save images (clients still receive them).")
@click.option("--format", "fmt", type=click.Choice(("png", "jpeg", "webp")), default="png", show_default=True,
              help="Format of saved images (the API always returns PNG).")
@click.option("--max-body-mb", type=click.FloatRange(min=0.001), default=32, show_default=True,
              help="Largest request body; larger ones get 413.")
@click.option("--max-image-pixels", type=click.IntRange(min=64), default=4096 * 4096, show_default=True,
              help="Largest uploaded or requested image, in pixels; larger uploads get 413.")
@click.option("--rate-limit", type=click.IntRange(min=0), default=120, show_default=True,
              help="POST requests per minute per client address (0: no limit); more get 429.")
@click.option("--max-queue", type=click.IntRange(min=1), default=256, show_default=True,
              help="Requests that may wait for the device; more get 503.")
@click.option("--log-level", type=click.Choice(("debug", "info", "warning", "error")), default="info",
              show_default=True, help="Server log level (info logs every request).")
def serve(model, models_dir, host, port, listen, api_key, insecure_no_auth, backend, device, precision,
          compute_units, reduce_memory, output, no_save, fmt, max_body_mb, max_image_pixels, rate_limit, max_queue,
          log_level):
    """Serve a web page and an AUTOMATIC1111-compatible API (/sdapi/v1/...) on a warm model.

    One generation runs at a time; the others wait in a first-in, first-out queue. Ctrl-C stops
    the image being sampled between steps (nothing partial is written) and exits.
    """
    from coreml_sd.errors import InputError
    from coreml_sd.serve.config import ServeConfig, check_exposure

    config = ServeConfig(model=model, models_dir=models_dir, host=host or ("0.0.0.0" if listen else "127.0.0.1"),
                         port=port, api_key=api_key or None, insecure_no_auth=insecure_no_auth, backend=backend,
                         device=device, precision=precision, compute_units=compute_units,
                         reduce_memory=reduce_memory, output=None if no_save else output, fmt=fmt,
                         max_body_bytes=int(max_body_mb * 2**20), max_image_pixels=max_image_pixels,
                         rate_limit=rate_limit, max_queue=max_queue)
    try:
        check_exposure(config)
    except InputError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        import uvicorn  # noqa: F401
    except ImportError:
        raise click.ClickException("coreml-sd serve needs FastAPI and uvicorn: pip install 'coreml-sd[serve]'") from None
    from coreml_sd.serve.server import serve as run

    run(config, log_level=log_level, on_ready=lambda server: click.echo(f"coreml-sd serving on http://{_url_host(config.host)}:"
                                                    f"{_bound_port(server, port)}/", err=True))


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _bound_port(server, default: int) -> int:
    """The port really bound (with --port 0 the system picks one)."""
    for s in getattr(server, "servers", []):
        for sock in getattr(s, "sockets", []) or []:
            return sock.getsockname()[1]
    return default
