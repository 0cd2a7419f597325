"""HTTP errors in FastAPI's JSON shape, so A1111 clients read them as they read A1111's own."""

from __future__ import annotations


class ApiError(Exception):
    """An error answered as `{"detail": ...}` with `status`."""

    def __init__(self, status: int, detail, headers: dict[str, str] | None = None):
        super().__init__(detail if isinstance(detail, str) else str(detail))
        self.status = status
        self.detail = detail
        self.headers = headers or {}


def field_error(field: str | tuple, message: str, status: int = 422) -> ApiError:
    """An invalid value, named as FastAPI names a field that failed validation."""
    loc = ["body", *(field if isinstance(field, tuple) else (field,))]
    return ApiError(status, [{"loc": loc, "msg": message, "type": "value_error"}])


def too_large(message: str) -> ApiError:
    return ApiError(413, message)
