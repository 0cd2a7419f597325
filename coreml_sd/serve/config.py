"""The server's configuration, and the rule about who may reach it."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from coreml_sd.errors import InputError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
MIB = 1024 * 1024


@dataclass(frozen=True)
class ServeConfig:
    model: str | None = None  # a catalog title or a path; None: the built-in model
    models_dir: Path | None = None
    host: str = "127.0.0.1"
    port: int = 7860
    api_key: str | None = None
    insecure_no_auth: bool = False
    backend: str = "auto"
    device: str = "auto"
    precision: str = "auto"
    compute_units: str = "all"
    reduce_memory: bool = False
    output: Path | None = Path("outputs")  # None: nothing is saved
    fmt: str = "png"
    max_body_bytes: int = 32 * MIB
    max_image_pixels: int = 4096 * 4096  # uploaded images and requested sizes
    max_images: int = 64  # per request (n_iter * batch_size)
    max_steps: int = 1000
    rate_limit: int = 120  # POST requests per minute per client address; 0 = no limit
    max_queue: int = 256  # requests waiting; more are refused with 503

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(config: ServeConfig) -> None:
    """A server other machines can reach needs an API key, or the operator's explicit opt-out:
    it runs code on this machine's accelerator and writes files for anyone who can connect."""
    if config.loopback or config.api_key or config.insecure_no_auth:
        return
    raise InputError(f"refusing to listen on {config.host} without authentication: pass --api-key KEY "
                     f"(clients send it as 'Authorization: Bearer KEY' or as the HTTP Basic password), "
                     f"or --insecure-no-auth to let anyone on the network use this server")
