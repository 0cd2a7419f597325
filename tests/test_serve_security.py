"""`coreml-sd serve` security: where it binds, who may call it, what it reads and how much.

The issue's list: 127.0.0.1 by default; --listen without a key refuses to start; path parameters
(model names, output names) cannot leave their folders; oversized bodies and images get 413; a
burst of 50 concurrent requests is queued and served with nothing lost. Plus the API key, Host and
Origin checks, the rate limit and the queue's order.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import threading

import pytest
import requests
from click.testing import CliRunner
from helpers_serve import running_server, wait_until
from PIL import Image

from coreml_sd.cli import main
from coreml_sd.serve.config import ServeConfig

TINY = {"prompt": "a handwritten digit one", "steps": 1, "width": 32, "height": 32}


def png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    config = ServeConfig(port=0, output=out, max_body_bytes=2**20, max_image_pixels=200 * 200, rate_limit=1000,
                         device="cpu", precision="fp32")
    with running_server(config) as running:
        yield running


# -- binding and starting ------------------------------------------------------------------------
def capture_serve(monkeypatch, *args):
    """Run `coreml-sd serve ARGS` up to the point where it would start serving; return its config."""
    import coreml_sd.serve.server as server_module

    seen = {}
    monkeypatch.setattr(server_module, "serve", lambda config, **kw: seen.setdefault("config", config))
    result = CliRunner().invoke(main, ["serve", *args])
    return result, seen.get("config")


def test_binds_loopback_by_default(monkeypatch, server):
    result, config = capture_serve(monkeypatch)
    assert result.exit_code == 0 and config.host == "127.0.0.1" and config.port == 7860
    # and the running server really listens on the loopback address only
    assert server.server.servers[0].sockets[0].getsockname()[0] == "127.0.0.1"


@pytest.mark.parametrize("args", [["--listen"], ["--host", "0.0.0.0"], ["--host", "192.168.1.20"]])
def test_listen_without_a_key_refuses_to_start(monkeypatch, args):
    result, config = capture_serve(monkeypatch, *args)
    assert result.exit_code == 2 and config is None
    assert "--api-key" in result.output and "--insecure-no-auth" in result.output


def test_listen_with_a_key_or_explicit_opt_out_starts(monkeypatch):
    result, config = capture_serve(monkeypatch, "--listen", "--api-key", "k")
    assert result.exit_code == 0 and (config.host, config.api_key) == ("0.0.0.0", "k")
    result, config = capture_serve(monkeypatch, "--listen", "--insecure-no-auth")
    assert result.exit_code == 0 and config.insecure_no_auth


# -- who may call --------------------------------------------------------------------------------
def test_api_key_is_required_everywhere(tmp_path):
    import webuiapi

    config = ServeConfig(port=0, output=None, api_key="s3cret", device="cpu", precision="fp32")
    with running_server(config) as running:
        for path in ("/", "/sdapi/v1/options", "/coreml-sd/v1/info", "/static/app.js"):
            response = requests.get(running.url + path)
            assert response.status_code == 401 and "Basic" in response.headers["WWW-Authenticate"], path
        assert requests.get(running.url + "/sdapi/v1/options", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert requests.get(running.url + "/sdapi/v1/options", headers={"Authorization": "Bearer s3cret"}).ok
        assert requests.get(running.url + "/sdapi/v1/options", headers={"X-API-Key": "s3cret"}).ok
        assert requests.get(running.url + "/", auth=("anyone", "s3cret")).ok  # what a browser sends
        api = webuiapi.WebUIApi(port=running.port, username="user", password="s3cret")  # A1111's --api-auth way
        assert api.txt2img(seed=1, **TINY).image.size == (32, 32)


def test_host_and_origin_checks(server):
    # DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1
    assert requests.get(server.url + "/sdapi/v1/options", headers={"Host": "evil.example"}).status_code == 421
    assert requests.get(server.url + "/sdapi/v1/options", headers={"Host": f"localhost:{server.port}"}).ok
    # another site open in the browser posting to the local server
    forged = requests.post(server.url + "/sdapi/v1/interrupt", headers={"Origin": "http://evil.example"})
    assert forged.status_code == 403
    same = requests.post(server.url + "/sdapi/v1/interrupt", headers={"Origin": server.url})
    assert same.status_code == 200


def test_rate_limit_answers_429_with_retry_after():
    config = ServeConfig(port=0, output=None, rate_limit=3, device="cpu", precision="fp32")
    with running_server(config, wait_for_model=False) as running:
        codes = [requests.post(running.url + "/sdapi/v1/png-info", json={"image": "x"}).status_code for _ in range(5)]
        assert codes[:3] == [422, 422, 422] and codes[3:] == [429, 429]
        refused = requests.post(running.url + "/sdapi/v1/png-info", json={"image": "x"})
        assert int(refused.headers["Retry-After"]) >= 1 and "--rate-limit" in refused.json()["detail"]
        assert requests.get(running.url + "/sdapi/v1/progress").ok  # reading progress is not limited


# -- what it reads -------------------------------------------------------------------------------
def test_saved_images_are_served_and_nothing_outside_the_output_folder(server, tmp_path):
    result = requests.post(server.url + "/sdapi/v1/txt2img", json={**TINY, "seed": 4}).json()
    (name,) = json.loads(result["info"])["images_saved"]
    served = requests.get(f"{server.url}/coreml-sd/v1/outputs/{name}")
    assert served.ok and served.content == (server.worker.config.output / name).read_bytes()
    secret = tmp_path / "secret.png"
    Image.new("RGB", (4, 4)).save(secret)
    (server.worker.config.output / "link.png").symlink_to(secret)
    (server.worker.config.output / ".partial-x.png").write_bytes(b"half")
    for bad in ("link.png", ".partial-x.png", "..%2Fsecret.png", "%2E%2E/secret.png", "..\\secret.png",
                f"..%2F{server.worker.config.output.name}%2F{name}", "%2Fetc%2Fpasswd", "missing.png"):
        response = requests.get(f"{server.url}/coreml-sd/v1/outputs/{bad}")
        assert response.status_code == 404, bad
    assert requests.get(f"{server.url}/static/..%2F..%2F__init__.py").status_code == 404
    assert requests.get(f"{server.url}/static/%2E%2E/app.py").status_code == 404


def test_model_names_only_select_listed_models(tmp_path):
    from coreml_sd.serve import catalog

    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"not really")
    models = tmp_path / "models"
    (models / "sub").mkdir(parents=True)
    (models / "sub" / "a.safetensors").write_bytes(b"x")
    (models / "converted").mkdir()
    (models / "converted" / "manifest.json").write_text("{}")
    (models / "converted" / "Unet.mlpackage").mkdir()
    (models / "sub" / "deep" / "diffusers-model" / "unet").mkdir(parents=True)
    (models / "sub" / "deep" / "diffusers-model" / "model_index.json").write_text("{}")
    (models / "sub" / "deep" / "diffusers-model" / "unet" / "x.safetensors").write_bytes(b"x")  # part of a model
    (models / "sub" / "notes.txt").write_text("not a model")
    entries = catalog.scan(models)
    assert [(e.title, e.kind) for e in entries] == [
        ("builtin", "builtin"), ("converted", "coreml"), ("sub/a.safetensors", "checkpoint"),
        ("sub/deep/diffusers-model", "diffusers")]
    assert catalog.resolve(entries, "sub/a.safetensors [0123456789]").path == models / "sub" / "a.safetensors"
    for name in ("../outside.safetensors", str(outside), "sub/../../outside.safetensors", "/etc/passwd"):
        with pytest.raises(Exception, match="unknown model"):
            catalog.resolve(entries, name)


def test_a_model_that_is_not_there_stops_the_server_before_it_starts(tmp_path):
    result = CliRunner().invoke(main, ["serve", "--model", str(tmp_path / "missing.safetensors"), "--port", "0"])
    assert result.exit_code == 1 and "no such file" in result.output


def test_reduce_memory_is_honoured(tmp_path):
    config = ServeConfig(port=0, output=None, reduce_memory=True, device="cpu", precision="fp32")
    with running_server(config) as running:
        assert running.worker.pipe.reduce_memory is True
        response = requests.post(running.url + "/sdapi/v1/txt2img", json={**TINY, "seed": 3})
        assert response.ok and len(response.json()["images"]) == 1


# -- how much ------------------------------------------------------------------------------------
def test_oversized_bodies_get_413(server):
    url = server.url + "/sdapi/v1/txt2img"
    big = {**TINY, "prompt": "7" * (2**20 + 10)}
    response = requests.post(url, json=big)
    assert response.status_code == 413 and "--max-body-mb" in response.json()["detail"]

    def chunks():  # no Content-Length: the limit is found by counting
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"7" * 65536
        yield b'"}'
    response = requests.post(url, data=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert server.worker.queue_size() == 0


def test_oversized_images_get_413_before_decoding(server):
    # 300x300 is over this server's 200x200 limit; a 1-bit 20000x20000 PNG is 50 kB compressed and
    # would be 400 megapixels decoded: refused from its header alone
    for image in (Image.new("RGB", (300, 300)), Image.new("1", (20000, 20000))):
        data = png_b64(image)
        assert requests.post(server.url + "/sdapi/v1/png-info", json={"image": data}).status_code == 413
        response = requests.post(server.url + "/sdapi/v1/img2img", json={**TINY, "init_images": [data]})
        assert response.status_code == 413 and "init_images.0" in response.json()["detail"]
    small = png_b64(Image.new("RGB", (100, 100)))
    assert requests.post(server.url + "/sdapi/v1/png-info", json={"image": small}).ok


def test_burst_of_50_concurrent_requests_is_queued_and_nothing_is_lost(server):
    seen_waiting = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            seen_waiting.append(requests.get(server.url + "/sdapi/v1/progress").json()["state"]["queued"])

    watcher = threading.Thread(target=watch)
    watcher.start()

    def one(seed):
        return requests.post(server.url + "/sdapi/v1/txt2img", json={**TINY, "seed": seed}, timeout=600)

    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        responses = list(pool.map(one, range(1000, 1050)))
    stop.set()
    watcher.join()
    assert [r.status_code for r in responses] == [200] * 50
    infos = [json.loads(r.json()["info"]) for r in responses]
    assert [info["all_seeds"] for info in infos] == [[seed] for seed in range(1000, 1050)]
    saved = {name for info in infos for name in info["images_saved"]}
    assert len(saved) == 50 and saved <= {p.name for p in server.worker.config.output.iterdir()}
    assert max(seen_waiting) > 1  # they really waited in the queue, one generation at a time


def test_queue_is_first_in_first_out_and_reports_positions(server):
    order, threads = [], []

    def go(seed, steps):
        body = {**TINY, "seed": seed, "steps": steps, "force_task_id": f"fifo-{seed}"}
        requests.post(server.url + "/sdapi/v1/txt2img", json=body, timeout=600)
        order.append(seed)

    threads.append(threading.Thread(target=go, args=(1, 1000)))  # interrupted below
    threads[0].start()
    wait_until(lambda: server.worker.position("fifo-1") == 0)
    for seed in (2, 3):
        threads.append(threading.Thread(target=go, args=(seed, 1)))
        threads[-1].start()
        wait_until(lambda task=f"fifo-{seed}": server.worker.position(task) is not None)
    assert [server.worker.position(f"fifo-{s}") for s in (1, 2, 3)] == [0, 1, 2]
    events = requests.get(f"{server.url}/coreml-sd/v1/events", params={"task": "fifo-3"}, stream=True)
    first = next(line for line in events.iter_lines() if line.startswith(b"data:"))
    assert json.loads(first[5:]) == {"state": "queued", "position": 2}
    events.close()
    requests.post(server.url + "/sdapi/v1/interrupt")
    for thread in threads:
        thread.join(120)
    assert order == [1, 2, 3]
