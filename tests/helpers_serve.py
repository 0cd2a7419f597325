"""Starting `coreml-sd serve`'s app inside the test process (uvicorn on a free port, in a thread).

In-process, the server's generation thread shares the test's torch thread count (conftest sets 1;
torch.set_num_threads is process-wide), so its images can be compared with the CLI's exactly.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from coreml_sd.serve.app import create_app
from coreml_sd.serve.config import ServeConfig
from coreml_sd.serve.worker import Worker


class Running:
    def __init__(self, server, app, port: int):
        self.server = server
        self.app = app
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.worker: Worker = app.state.worker


@contextmanager
def running_server(config: ServeConfig, worker: Worker | None = None, *, wait_for_model: bool = True):
    app = create_app(config, worker)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    running = Running(server, app, port)
    while wait_for_model and running.worker.pipe is None:
        if time.monotonic() > deadline:
            raise RuntimeError("the test server did not load its model")
        time.sleep(0.05)
    try:
        yield running
    finally:
        server.should_exit = True
        thread.join(60)


def wait_until(predicate, timeout: float = 60.0, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")
