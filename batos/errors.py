"""The one exception type that crosses service boundaries as data."""

from __future__ import annotations

from typing import Any

from proto import ErrorCode


class ServiceError(Exception):
    """Raised by a handler to answer with an ``error``; raised by a client when one arrives."""

    def __init__(self, code: ErrorCode | str, message: str, details: dict[str, Any] | None = None):
        super().__init__(f"{code}: {message}")
        self.code = str(code)
        self.message = message
        self.details = details or {}

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> ServiceError:
        return cls(str(body.get("code", ErrorCode.INTERNAL)), str(body.get("message", "")), body.get("details"))
