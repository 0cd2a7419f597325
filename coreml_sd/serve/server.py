"""Running the app under uvicorn, with a Ctrl-C that stops the current image between steps.

uvicorn's own shutdown waits for open requests to finish before the app hears of it, so a long
generation would run to its end after Ctrl-C. Here the first Ctrl-C (or SIGTERM) tells the worker
at once: the image being sampled is dropped after its current step (nothing of it is written;
finished images are already saved), queued requests are answered 503, then uvicorn closes as usual.
A second Ctrl-C exits immediately, as in uvicorn.
"""

from __future__ import annotations

import logging
import os

from coreml_sd.serve.config import ServeConfig, check_exposure

log = logging.getLogger(__name__)


def serve(config: ServeConfig, *, log_level: str = "info", on_ready=None) -> None:
    import uvicorn

    from coreml_sd.serve.app import create_app

    check_exposure(config)
    # Idle OpenMP workers sleep instead of spinning: the server's HTTP threads run beside the
    # generation thread, and spinning workers starved them on a 2-core VM (4 concurrent clients:
    # 18 requests a minute spinning, 1059 passive; one client alone: the same speed either way).
    # Read when torch loads its OpenMP runtime, i.e. at the first model load, after this line.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    app = create_app(config)
    worker = app.state.worker

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            worker.begin_shutdown()
            super().handle_exit(sig, frame)

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if on_ready and self.started:
                on_ready(self)

    uv_config = uvicorn.Config(app, host=config.host, port=config.port, log_level=log_level,
                               timeout_graceful_shutdown=60, server_header=False)
    try:
        Server(uv_config).run()
    except KeyboardInterrupt:
        pass  # uvicorn raises the Ctrl-C it handled again after its clean shutdown; the exit is clean
    log.info("stopped")
