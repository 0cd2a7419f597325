"""The FastAPI application: A1111's /sdapi/v1 subset, coreml-sd's own /coreml-sd/v1 routes for the
page (server info, a server-sent event stream per task, saved outputs), and the page at /.

`create_app(config)` builds it around one `Worker`; the handlers validate, queue and answer, the
worker thread generates. Errors keep FastAPI's JSON shape (`{"detail": ...}`), as A1111's do.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from coreml_sd import __version__
from coreml_sd.errors import InputError, ModelError
from coreml_sd.serve import catalog, codec, runner, translate
from coreml_sd.serve.config import ServeConfig
from coreml_sd.serve.errors import ApiError, field_error
from coreml_sd.serve.preview import preview_png
from coreml_sd.serve.schemas import (
    Img2ImgBody,
    PNGInfoBody,
    PNGInfoResponse,
    ProgressResponse,
    Txt2ImgBody,
)
from coreml_sd.serve.security import BodyLimit, Guard
from coreml_sd.serve.worker import JobResult, Task, Worker

STATIC = Path(__file__).resolve().parent / "static"
SHUTDOWN_WAIT_S = 30.0


def create_app(config: ServeConfig, worker: Worker | None = None, *, preload: bool = True) -> FastAPI:
    worker = worker or Worker(config)

    @asynccontextmanager
    async def lifespan(app):
        worker.start(preload=preload)
        yield
        worker.begin_shutdown()
        await run_in_threadpool(worker.join, SHUTDOWN_WAIT_S)

    app = FastAPI(title="coreml-sd", version=__version__, lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.worker = worker
    add_error_handlers(app)
    add_generation_routes(app, config, worker)
    add_state_routes(app, config, worker)
    add_model_routes(app, config, worker)
    add_page_routes(app, config, worker)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(Guard, config=config)  # added last: runs first
    return app


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(InputError)
    async def input_error(request, exc: InputError):
        return JSONResponse({"detail": [{"loc": ["body"], "msg": str(exc), "type": "value_error"}]}, status_code=422)

    @app.exception_handler(ModelError)
    async def model_error(request, exc: ModelError):
        return JSONResponse({"detail": f"model error: {exc}"}, status_code=500)


# -- generation -------------------------------------------------------------------------------------
def add_generation_routes(app: FastAPI, config: ServeConfig, worker: Worker) -> None:
    @app.post("/sdapi/v1/txt2img")
    async def txt2img(body: Txt2ImgBody):
        request = translate.base_request(body, config, "txt2img")
        return await generate(worker, config, request)

    @app.post("/sdapi/v1/img2img")
    async def img2img(body: Img2ImgBody):
        request = translate.base_request(body, config, "img2img")
        images, options, warnings = await run_in_threadpool(translate.img2img_options, body, config)
        params = dict(request.parameters, init_images=body.init_images if body.include_init_images else None,
                      mask=body.mask if body.include_init_images else None)
        request = replace(request, init_images=images, image_options=options, parameters=params,
                          warnings=request.warnings + tuple(warnings))
        runner.check_supported(worker.pipe or pipeline_class(), request)  # 501 before it waits in the queue
        return await generate(worker, config, request)


def pipeline_class():
    from coreml_sd.pipeline import Pipeline

    return Pipeline


def check_model(worker: Worker, title: str | None, field=("override_settings", "sd_model_checkpoint")) -> None:
    """422 for a model name the catalog does not list (before the request waits in the queue)."""
    if title is not None:
        try:
            catalog.resolve(worker.entries, title)
        except InputError as exc:
            raise field_error(field, str(exc)) from None


async def generate(worker: Worker, config: ServeConfig, request: translate.GenerationRequest) -> dict:
    check_model(worker, request.model)
    result: JobResult = await asyncio.wrap_future(worker.submit(Task(request.task_id, "generate", request)))
    images = [image for _, image in result.outcome.images]
    encoded = await run_in_threadpool(lambda: [codec.encode_png(i.image, i.params) for i in images]) \
        if request.send_images else []
    info = info_dict(request, result, config)
    return {"images": encoded, "parameters": request.parameters, "info": json.dumps(info)}


def info_dict(request: translate.GenerationRequest, result: JobResult, config: ServeConfig) -> dict:
    """A1111's Processed.js() fields for what was made, plus coreml-sd's warnings and saved files."""
    from coreml_sd.samplers import SAMPLERS

    made = [image for _, image in result.outcome.images]
    first = made[0].params if made else None
    n = len(made)
    return {
        "prompt": request.prompt, "all_prompts": [request.prompt] * n,
        "negative_prompt": request.negative_prompt, "all_negative_prompts": [request.negative_prompt] * n,
        "seed": made[0].seed if made else request.seed, "all_seeds": [i.seed for i in made],
        "subseed": -1, "all_subseeds": [-1] * n, "subseed_strength": 0,
        "width": first.width if first else request.width, "height": first.height if first else request.height,
        "sampler_name": SAMPLERS[request.sampler].display_name, "scheduler": request.schedule,
        "cfg_scale": request.guidance_scale, "steps": request.steps, "batch_size": request.batch_size,
        "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": first.model if first else None, "sd_model_hash": first.model_hash if first else None,
        "sd_model_checkpoint": result.model_title, "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": request.image_options.get("strength") if request.kind == "img2img" else None,
        "extra_generation_params": dict(first.extras) if first else {},
        "index_of_first_image": 0, "infotexts": [i.params.to_a1111() for i in made], "styles": [],
        "clip_skip": 1, "is_using_inpainting_conditioning": False, "version": f"coreml-sd {__version__}",
        "image_indices": [index for index, _ in result.outcome.images],
        "images_saved": [result.saved[i].name for i, _ in result.outcome.images if i in result.saved],
        "interrupted": result.outcome.interrupted, "skipped_images": result.outcome.skipped,
        "warnings": list(request.warnings),
    }


# -- state: progress, interrupt and skip; models, options ---------------------------------------------------
def add_state_routes(app: FastAPI, config: ServeConfig, worker: Worker) -> None:
    @app.get("/sdapi/v1/progress", response_model=ProgressResponse)
    async def progress(skip_current_image: bool = False):
        return await run_in_threadpool(progress_response, worker, skip_current_image)

    @app.post("/sdapi/v1/interrupt")
    async def interrupt():
        worker.interrupt()
        return {}

    @app.post("/sdapi/v1/skip")
    async def skip():
        worker.skip()
        return {}


def add_model_routes(app: FastAPI, config: ServeConfig, worker: Worker) -> None:
    @app.get("/sdapi/v1/sd-models")
    async def sd_models():
        return [model_item(worker, entry) for entry in worker.entries]

    @app.post("/sdapi/v1/refresh-checkpoints")
    async def refresh_checkpoints():
        await run_in_threadpool(worker.rescan)
        return {}

    @app.get("/sdapi/v1/samplers")
    async def samplers():
        return [{"name": names[0], "aliases": names[1:], "options": {}}
                for names in translate.sampler_names().values()]

    @app.get("/sdapi/v1/schedulers")
    async def schedulers():
        return scheduler_items()

    @app.get("/sdapi/v1/options")
    async def get_options():
        return options_dict(worker, config)

    @app.post("/sdapi/v1/options")
    async def set_options(body: dict):
        return await set_options_dict(worker, config, body)

    @app.post("/sdapi/v1/png-info", response_model=PNGInfoResponse)
    async def png_info(body: PNGInfoBody):
        text, items = await run_in_threadpool(codec.png_info, body.image, config.max_image_pixels)
        return {"info": text, "items": items, "parameters": codec.parameters_dict(text)}

    @app.get("/sdapi/v1/scripts")
    async def scripts():
        return {"txt2img": [], "img2img": []}


def progress_response(worker: Worker, skip_image: bool) -> dict:
    """A1111's ProgressResponse; `current_image` from the last step's latents when the pipeline
    reports them (and the model's latents have a cheap preview)."""
    live, waiting = worker.snapshot()
    generating = live.task_id is not None and live.job != "switch"
    state = {"skipped": live.skipped, "interrupted": live.interrupted, "job": live.task_id or "",
             "job_count": live.num_images if generating else 0, "job_timestamp": live.timestamp or "0",
             "job_no": live.first, "sampling_step": live.step, "sampling_steps": live.steps, "queued": waiting}
    if not generating:
        return {"progress": 0.0, "eta_relative": 0.0, "state": state, "textinfo": "Waiting..."
                if waiting else None}
    fraction = live.fraction
    elapsed = time.monotonic() - live.started
    eta = elapsed / max(fraction, 0.01) - elapsed
    image = None
    if live.latents is not None and not skip_image:
        png = preview_png(live.latents)
        image = base64.b64encode(png).decode() if png else None
    text = f"image {live.first + 1}/{live.num_images}, step {live.step}/{live.steps}" if live.step else "starting"
    return {"progress": fraction, "eta_relative": eta, "state": state, "current_image": image, "textinfo": text}


def model_item(worker: Worker, entry: catalog.ModelEntry) -> dict:
    loaded = worker.pipe if worker.pipe_title == entry.title else None
    short = getattr(getattr(loaded, "info", None), "hash", None)
    return {"title": entry.title, "model_name": entry.model_name, "hash": short, "sha256": None,
            "filename": entry.title, "config": None, "type": entry.kind}


def scheduler_items() -> list[dict]:
    from coreml_sd.schedules import KARRAS_RHO

    items = [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1.0,
              "need_inner_model": False}]
    for name in translate.schedule_names():
        if name != "default":
            items.append({"name": name, "label": name.replace("_", " ").title(), "aliases": None,
                          "default_rho": KARRAS_RHO if name == "karras" else -1.0, "need_inner_model": False})
    return items


def options_dict(worker: Worker, config: ServeConfig) -> dict:
    loaded = worker.pipe if worker.pipe_title == worker.option_title else None
    return {"sd_model_checkpoint": worker.option_title,
            "sd_checkpoint_hash": getattr(getattr(loaded, "info", None), "hash", None),
            "samples_save": config.output is not None, "samples_format": config.fmt,
            "outdir_samples": str(config.output) if config.output else "", "live_previews_enable": True,
            "show_progress_every_n_steps": 1, "CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic"}


async def set_options_dict(worker: Worker, config: ServeConfig, body: dict) -> dict:
    """Only sd_model_checkpoint changes anything; it loads the model now (in the queue, after the
    requests before it) and frees the previous one. Other keys are answered with a warning."""
    current = options_dict(worker, config)
    warnings = [f"option {key!r} cannot be changed on coreml-sd and was ignored" for key, value in body.items()
                if key != "sd_model_checkpoint" and current.get(key, object()) != value]
    title = body.get("sd_model_checkpoint")
    if title is not None:
        if not isinstance(title, str):
            raise field_error("sd_model_checkpoint", "expected a model title (a string)")
        check_model(worker, title, "sd_model_checkpoint")
        await asyncio.wrap_future(worker.submit(Task(f"switch-{uuid.uuid4().hex[:12]}", "switch", title)))
    return {"warnings": warnings}


# -- the page and its helpers -----------------------------------------------------------------------
def add_page_routes(app: FastAPI, config: ServeConfig, worker: Worker) -> None:
    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/coreml-sd/v1/info")
    async def server_info():
        return info_for_page(worker, config)

    @app.get("/coreml-sd/v1/events")
    async def events(task: str, request: Request):
        return StreamingResponse(task_events(worker, task, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/coreml-sd/v1/outputs/{name}")
    async def output_file(name: str):
        return FileResponse(output_path(config, name))


def info_for_page(worker: Worker, config: ServeConfig) -> dict:
    pipe = worker.pipe
    reason = runner.img2img_unavailable(pipe or pipeline_class())
    size = getattr(getattr(pipe, "info", None), "sample_size", None)
    return {"version": __version__, "img2img": reason is None, "img2img_reason": reason,
            "model": worker.option_title, "models": [e.title for e in worker.entries],
            "samplers": [names[0] for names in translate.sampler_names().values()],
            "schedulers": [item["name"] for item in scheduler_items()],
            "default_size": size, "saves": config.output is not None}


async def task_events(worker: Worker, task: str, request: Request):
    """Server-sent events for one task: its queue position, then progress (with a preview when
    the pipeline gives latents), then "done". Ends if the task is unknown for 30 s."""
    last, unknown_for, idle = None, 0.0, 0.0
    while not await request.is_disconnected():
        status = worker.status(task)
        event = {"state": status}
        if status == "queued":
            event["position"] = worker.position(task)
        elif status == "running":
            live, _ = worker.snapshot()
            event.update(progress=live.fraction, step=live.step, steps=live.steps, image=live.first,
                         num_images=live.num_images)
            if live.latents is not None and live.step != (last or {}).get("step"):
                png = await run_in_threadpool(preview_png, live.latents)
                event["preview"] = "data:image/png;base64," + base64.b64encode(png).decode() if png else None
        unknown_for = unknown_for + 0.1 if status == "unknown" else 0.0
        if event != last or status in ("done",) or unknown_for > 30:
            yield f"data: {json.dumps(event)}\n\n"
            last, idle = event, 0.0
            if status == "done" or unknown_for > 30:
                return
        idle += 0.1
        if idle > 15:
            yield ": keep-alive\n\n"
            idle = 0.0
        await asyncio.sleep(0.1)


def output_path(config: ServeConfig, name: str) -> Path:
    """A saved image by its file name; nothing outside --output, no hidden or partial files."""
    from coreml_sd.images import FORMATS

    missing = ApiError(404, f"no saved image named {name!r}")
    if config.output is None or not name or name.startswith(".") or Path(name).name != name or "\\" in name:
        raise missing
    root = Path(config.output).resolve()
    path = (root / name).resolve()
    if path.parent != root or not path.is_file() or path.suffix.lower() not in FORMATS.values():
        raise missing
    return path
