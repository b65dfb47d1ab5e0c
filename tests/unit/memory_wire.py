"""The memory service's handlers reached as the worker reaches them, without a broker: a dict body is decoded
into its proto type (proto.contract), the handler runs, its typed reply is encoded back to a dict. Tests of the
weaver use this so they exercise the same contract a caller on the wire does."""

from __future__ import annotations

import threading
from collections.abc import Awaitable
from types import SimpleNamespace
from typing import Any

from batos.config import load
from services.memory_weaver.handlers import HANDLERS
from services.memory_weaver.weaver import MemoryWeaver
from tests.typed_handler import call_handler


class Wire:
    def __init__(self, weaver: MemoryWeaver, max_frame_bytes: int | None = None):
        self.weaver = weaver
        settings = load()
        if max_frame_bytes is not None:
            settings = settings.model_copy(update={"max_frame_bytes": max_frame_bytes})
        self.settings = settings

    async def call(self, command: str, body: dict[str, Any] | None = None,
                   cancelled: threading.Event | None = None) -> dict[str, Any]:
        ctx = SimpleNamespace(state={"weaver": self.weaver}, settings=self.settings)
        req = SimpleNamespace(command=command, ctx=ctx, cancelled=cancelled or threading.Event())
        return await call_handler("memory", command, HANDLERS[command], req, body)

    async def replace_file(self, payload: dict[str, Any], cancelled: threading.Event | None = None) -> dict[str, Any]:
        """One file's replace (a replace_files of one file)."""
        return (await self.call("replace_files", {"files": [payload]}, cancelled))["files"][0]

    def __getattr__(self, name: str) -> Any:
        if name in HANDLERS:
            def command(body: dict[str, Any] | None = None, cancelled: threading.Event | None = None
                        ) -> Awaitable[dict[str, Any]]:
                return self.call(name, body, cancelled)
            return command
        return getattr(self.weaver, name)

