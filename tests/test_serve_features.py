"""The server's feature detection and shutdown, against stand-ins that have what the pipeline will
gain (init images, per-step latents), and against the real CLI process for Ctrl-C.

The stand-ins wrap the real built-in pipeline and record what the server hands them; they take the
keyword arguments the lead's redesign announces (init_image, strength, mask, ...; Progress.latents),
so these tests show the server starts using them the moment the pipeline has them.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from helpers_serve import running_server, wait_until
from PIL import Image

from coreml_sd.pipeline import Progress
from coreml_sd.serve.config import ServeConfig
from coreml_sd.serve.preview import SD_LATENT_RGB
from coreml_sd.serve.worker import Worker, load_pipeline

TINY = {"prompt": "a handwritten digit four", "steps": 3, "width": 32, "height": 32}


def png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@dataclass(frozen=True)
class ProgressWithLatents(Progress):
    latents: Any = None


class InitImagePipeline:
    """The built-in pipeline behind a generate() that takes img2img's arguments and records them."""

    def __init__(self, pipe):
        self.pipe, self.info, self.calls = pipe, pipe.info, []

    def generate(self, prompt, *, init_image, strength, mask=None, mask_blur=4, inpaint_full_res=True,
                 inpaint_padding=0, masked_content="original", resize_mode=0, **kwargs):
        self.calls.append(dict(init=np.asarray(init_image), strength=strength, mask=mask, mask_blur=mask_blur,
                               inpaint_full_res=inpaint_full_res, inpaint_padding=inpaint_padding,
                               masked_content=masked_content, resize_mode=resize_mode, **kwargs))
        return self.pipe.generate(prompt, **kwargs)


class GatedPipeline:
    """The built-in pipeline, pausing after step 2 of its first image until `go` is set, so a test
    can act at a known step whatever the machine's speed."""

    def __init__(self, pipe):
        self.pipe, self.info, self.go = pipe, pipe.info, threading.Event()

    def generate(self, prompt, **kwargs):
        for event in self.pipe.generate(prompt, **kwargs):
            yield event
            if isinstance(event, Progress) and event.step == 2 and event.image_index == 0:
                self.go.wait(60)


class LatentsPipeline:
    """The built-in pipeline whose steps report latents: channel (step % 4) is 1, the others 0.
    After step 2 it waits for `go`, so a test can read /progress at a known step."""

    def __init__(self, pipe):
        self.pipe, self.info, self.go = pipe, pipe.info, threading.Event()

    def generate(self, prompt, **kwargs):
        for event in self.pipe.generate(prompt, **kwargs):
            if isinstance(event, Progress):
                latents = np.zeros((event.batch, 4, 4, 4), np.float32)
                latents[:, event.step % 4] = 1.0
                event = ProgressWithLatents(**vars(event), latents=latents)
            yield event
            if isinstance(event, Progress) and event.step == 2:
                self.go.wait(60)  # the server has recorded step 2; the next step waits for the test


def test_img2img_fields_reach_a_pipeline_that_takes_init_images(tmp_path):
    config = ServeConfig(port=0, output=None, device="cpu", precision="fp32")
    worker = Worker(config, loader=lambda entry: InitImagePipeline(load_pipeline(entry, config)))
    with running_server(config, worker) as running:
        assert requests.get(running.url + "/coreml-sd/v1/info").json()["img2img"] is True
        inits = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
        mask = Image.new("L", (32, 32), 0)
        mask.paste(255, (8, 8, 24, 24))
        body = {**TINY, "seed": 7, "n_iter": 3, "init_images": [png_b64(i) for i in inits],
                "denoising_strength": 0.6, "mask": png_b64(mask), "inpainting_mask_invert": 1, "inpainting_fill": 2,
                "mask_blur": 3, "inpaint_full_res": False, "inpaint_full_res_padding": 16, "resize_mode": 1}
        response = requests.post(running.url + "/sdapi/v1/img2img", json=body)
        assert response.status_code == 200, response.text
        info = json.loads(response.json()["info"])
        assert info["all_seeds"] == [7, 8, 9] and len(response.json()["images"]) == 3
        assert info["denoising_strength"] == 0.6 and response.json()["parameters"]["init_images"] is None
        calls = running.worker.pipe.calls
        # one call per image, each with its own init image (A1111: init_images[i % len]) and seed
        assert [c["seed"] for c in calls] == [7, 8, 9] and [c["num_images"] for c in calls] == [1, 1, 1]
        assert [tuple(c["init"][0, 0]) for c in calls] == [(255, 0, 0), (0, 0, 255), (255, 0, 0)]
        call = calls[0]
        assert (call["strength"], call["mask_blur"], call["inpaint_full_res"], call["inpaint_padding"]) == (0.6, 3, False, 16)
        assert (call["masked_content"], call["resize_mode"]) == ("latent noise", 1)
        inverted = np.asarray(call["mask"])
        assert inverted[0, 0] == 255 and inverted[16, 16] == 0  # inpainting_mask_invert applied


def test_skip_drops_the_current_image_and_the_rest_are_what_they_would_have_been():
    config = ServeConfig(port=0, output=None, device="cpu", precision="fp32")
    worker = Worker(config, loader=lambda entry: GatedPipeline(load_pipeline(entry, config)))
    with running_server(config, worker) as running:
        done = []
        body = {**TINY, "seed": 40, "n_iter": 3, "steps": 20}
        thread = threading.Thread(target=lambda: done.append(requests.post(running.url + "/sdapi/v1/txt2img", json=body)))
        thread.start()
        wait_until(lambda: requests.get(running.url + "/sdapi/v1/progress").json()["state"]["sampling_step"] == 2)
        assert requests.post(running.url + "/sdapi/v1/skip").ok
        running.worker.pipe.go.set()
        thread.join(60)
        skipped = done[0].json()
        info = json.loads(skipped["info"])
        assert info["skipped_images"] == [0] and info["all_seeds"] == [41, 42] and info["image_indices"] == [1, 2]
        assert not info["interrupted"]
        # the rest were made by a new generate() from seed 41: the images asking for them gives
        alone = requests.post(running.url + "/sdapi/v1/txt2img", json={**body, "seed": 41, "n_iter": 2}).json()
        assert skipped["images"] == alone["images"]  # the same PNG bytes: the same pixels and parameters


def test_progress_preview_comes_from_the_steps_latents():
    config = ServeConfig(port=0, output=None, device="cpu", precision="fp32")
    worker = Worker(config, loader=lambda entry: LatentsPipeline(load_pipeline(entry, config)))
    with running_server(config, worker) as running:
        pipe = running.worker.pipe
        done = []
        thread = threading.Thread(target=lambda: done.append(
            requests.post(running.url + "/sdapi/v1/txt2img", json={**TINY, "seed": 1})))
        thread.start()
        progress = wait_until(lambda: (p := requests.get(running.url + "/sdapi/v1/progress").json())
                              ["state"]["sampling_step"] == 2 and p)
        events = requests.get(running.url + "/coreml-sd/v1/events",
                              params={"task": progress["state"]["job"]}, stream=True)
        event = json.loads(next(line for line in events.iter_lines() if line.startswith(b"data:"))[5:])
        events.close()
        pipe.go.set()
        thread.join(60)
        assert done[0].status_code == 200
    # step 2: latent channel 2 is 1 everywhere -> every pixel is A1111's cheap mix of that channel
    expected = np.round(np.clip(SD_LATENT_RGB[2] * 0.5 + 0.5, 0, 1) * 255)
    for data in (progress["current_image"], event["preview"].split(",", 1)[1]):
        preview = np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))
        assert preview.shape == (4, 4, 3) and (preview == expected).all()
    assert event["state"] == "running" and event["step"] == 2


def test_without_latents_the_preview_is_omitted():
    from coreml_sd.serve.preview import latents_to_rgb

    assert latents_to_rgb(np.zeros((1, 8, 4, 4))) is None  # not SD 4-channel latents: no cheap preview
    x = np.random.default_rng(0).normal(size=(2, 4, 3, 5)).astype(np.float32)
    by_hand = np.stack([sum(x[1, c, i, j] * SD_LATENT_RGB[c] for c in range(4))
                        for i in range(3) for j in range(5)]).reshape(3, 5, 3)
    expected = np.round(np.clip(by_hand * 0.5 + 0.5, 0, 1) * 255)
    assert np.array_equal(latents_to_rgb(x, index=1), expected.astype(np.uint8))


@pytest.mark.slow
def test_ctrl_c_cancels_the_current_image_and_writes_nothing_partial(tmp_path):
    """The real `coreml-sd serve` process: Ctrl-C while image 2 of 2 is sampled."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "coreml_sd", "serve", "--port", "0", "-o", str(out),
                             "--device", "cpu"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        for line in proc.stderr:
            if m := re.search(r"serving on (http://127\.0\.0\.1:\d+)/", line):
                url = m.group(1)
                break
        assert url, "the server did not start"
        threading.Thread(target=lambda: [_ for _ in proc.stderr], daemon=True).start()  # keep the pipe drained
        wait_until(lambda: requests.get(url + "/coreml-sd/v1/info").json()["default_size"])
        answer = []
        body = {**TINY, "seed": 5, "n_iter": 2, "steps": 1000}
        thread = threading.Thread(target=lambda: answer.append(requests.post(url + "/sdapi/v1/txt2img", json=body)))
        thread.start()
        wait_until(lambda: (s := requests.get(url + "/sdapi/v1/progress").json()["state"])["job_no"] == 1
                   and s["sampling_step"] > 2)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        thread.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    info = json.loads(answer[0].json()["info"])
    assert info["interrupted"] and info["all_seeds"] == [5]  # image 1 finished; image 2 was dropped mid-way
    files = sorted(p.name for p in out.iterdir())
    assert files == info["images_saved"] and len(files) == 1  # no .partial- file, no second image
    with Image.open(out / files[0]) as image:
        assert "Seed: 5" in image.info["parameters"]


def test_the_cli_does_not_import_the_server_stack():
    code = ("import sys, coreml_sd, coreml_sd.cli; "
            "print([m for m in ('torch', 'fastapi', 'uvicorn', 'starlette', 'pydantic') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    assert out.stdout.strip() == "[]"
