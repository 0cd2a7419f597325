"""ASGI middleware between the network and the app, outermost first:

* `Guard`: the API key (when set) on every route, as `Authorization: Bearer KEY`, `X-API-Key: KEY`
  or HTTP Basic with KEY as the password (what A1111 clients and browsers send); on a loopback
  server, a Host header that is not a loopback name is refused (a web page that rebinds its own
  domain to 127.0.0.1 cannot reach the server); a POST whose Origin is another site is refused
  (another page open in the browser cannot drive the server); POSTs per client and minute are
  limited (429 with Retry-After).
* `BodyLimit`: a body over the limit is refused with 413 before the app sees any of it, whether
  its Content-Length says so or counting finds it (chunked bodies). The excess is read and dropped,
  not kept, so that ordinary clients, which send the whole body before reading, get the answer.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import threading
import time
from urllib.parse import urlsplit

from coreml_sd.serve.config import LOOPBACK_NAMES, ServeConfig

DRAIN_LIMIT = 8  # an oversized body is read (and dropped) up to this many times the limit


async def send_json(send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


def key_matches(scope, api_key: str) -> bool:
    auth = header(scope, b"authorization") or ""
    scheme, _, value = auth.partition(" ")
    candidates = [header(scope, b"x-api-key") or ""]
    if scheme.lower() == "bearer":
        candidates.append(value.strip())
    elif scheme.lower() == "basic":
        try:
            candidates.append(base64.b64decode(value.strip()).decode("utf-8").partition(":")[2])
        except (binascii.Error, UnicodeDecodeError):
            pass
    return any(secrets.compare_digest(c.encode(), api_key.encode()) for c in candidates if c)


def host_name(host_header: str) -> str:
    """'127.0.0.1:7860' -> '127.0.0.1'; '[::1]:7860' -> '::1'."""
    return urlsplit(f"//{host_header}").hostname or ""


class RateLimiter:
    """A token bucket per client address: `per_minute` requests, refilled continuously."""

    def __init__(self, per_minute: int):
        self.per_minute = per_minute
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, client: str) -> float:
        """0 if allowed, else the seconds until a request would be."""
        now = time.monotonic()
        rate = self.per_minute / 60.0
        with self._lock:
            tokens, last = self._buckets.get(client, (float(self.per_minute), now))
            tokens = min(float(self.per_minute), tokens + (now - last) * rate)
            if tokens >= 1.0:
                self._buckets[client] = (tokens - 1.0, now)
                return 0.0
            self._buckets[client] = (tokens, now)
            return (1.0 - tokens) / rate


class Guard:
    def __init__(self, app, config: ServeConfig):
        self.app = app
        self.config = config
        self.limiter = RateLimiter(config.rate_limit) if config.rate_limit > 0 else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        problem = self.refusal(scope)
        if problem:
            return await send_json(send, *problem)
        await self.app(scope, receive, send)

    def refusal(self, scope) -> tuple | None:
        """(status, detail[, headers]) when the request must not reach the app."""
        host = header(scope, b"host") or ""
        if self.config.loopback and host_name(host) not in LOOPBACK_NAMES:
            return 421, f"this server answers to localhost only; the request was for host {host!r}"
        if self.config.api_key and not key_matches(scope, self.config.api_key):
            return (401, "an API key is required (Authorization: Bearer KEY, or HTTP Basic with KEY as the password)",
                    {"WWW-Authenticate": 'Basic realm="coreml-sd"'})
        if scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            origin = header(scope, b"origin")
            if origin is not None and urlsplit(origin).netloc != host:
                return 403, f"cross-site request refused: origin {origin!r} is not this server ({host!r})"
            wait = self.limiter.take((scope.get("client") or ("?",))[0]) if self.limiter else 0.0
            if wait:
                message = f"rate limit: at most {self.config.rate_limit} requests a minute (--rate-limit); retry in {wait:.0f} s"
                return 429, message, {"Retry-After": str(int(wait) + 1)}
        return None


class BodyLimit:
    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = header(scope, b"content-length")
        too_big = declared is not None and declared.isdigit() and int(declared) > self.max_bytes
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            size += len(message.get("body", b""))
            too_big = too_big or size > self.max_bytes
            if not too_big:
                chunks.append(message.get("body", b""))
            elif size > DRAIN_LIMIT * self.max_bytes:
                break  # stop reading a flood; the connection closes after the answer
            if not message.get("more_body"):
                break
        if too_big:
            return await self._refuse(send, max(size, int(declared or 0)))
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send, size: int) -> None:
        mib = self.max_bytes / 2**20
        await send_json(send, 413, f"request body of {size} bytes is over this server's limit of "
                                   f"{self.max_bytes} bytes ({mib:g} MiB, --max-body-mb)")
