"""The ingest service's command table, driven with a stand-in request (no broker)."""

from __future__ import annotations

import asyncio
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from batos.config import load
from batos.worker import ServiceError
from proto import ErrorCode
from services.ingestor.handlers import HANDLERS
from tests.typed_handler import call_handler
from tests.unit.test_ingest_pipeline import FakeMemory


class FakeRequest:
    def __init__(self, command: str, args: dict[str, Any], client: Any = None):
        self.command = command
        self.args = args
        self.client = client
        self.cancelled = threading.Event()
        self.ctx = SimpleNamespace(settings=load(max_chunk_tokens=64, ingest_roots=tempfile.gettempdir()))
        self.events: list[dict[str, Any]] = []

    async def emit(self, name: str, **data: Any) -> None:
        self.events.append({"event": name, **data})

    async def run_blocking(self, fn: Any, *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    async def run(self) -> dict[str, Any]:
        return await call_handler("ingest", self.command, HANDLERS[self.command], self, self.args)


def test_command_table_is_a_whitelist() -> None:
    assert set(HANDLERS) == {"ingest", "chunk"}


async def test_ingest_through_the_handler(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("def f():\n    return 1\n")
    mem = FakeMemory()
    req = FakeRequest("ingest", {"path": str(tmp_path)}, mem)
    reply = await req.run()
    assert reply["files"] == 1 and reply["chunks"] == 1
    assert req.events[-1]["stage"] == "COMPLETE"


@pytest.mark.parametrize("args", [{}, {"path": ""}, {"path": 3}, {"path": "/x", "max_chunk_tokens": 2},
                                  {"path": "/x", "max_chunk_tokens": "big"}, {"path": "  "},
                                  {"path": "/x", "surprise": 1}])
async def test_bad_arguments(args: dict[str, Any]) -> None:
    with pytest.raises(ServiceError) as e:
        await FakeRequest("ingest", args, FakeMemory()).run()
    assert e.value.code == ErrorCode.BAD_ARGS


async def test_chunk_preview(tmp_path: Path) -> None:
    p = tmp_path / "m.py"
    p.write_text("class C:\n" + "".join(f"    def m{i}(self):\n        return {i} * 'xxxxxxxxxx'\n" for i in range(20)))
    reply = await FakeRequest("chunk", {"path": str(p), "max_chunk_tokens": 32}).run()
    assert reply["status"] == "chunked" and len(reply["chunks"]) > 2
    assert any("context_header" in c["metadata"] for c in reply["chunks"])
    with pytest.raises(ServiceError) as e:
        await FakeRequest("chunk", {"path": str(tmp_path / "none.py")}).run()
    assert e.value.code == ErrorCode.NOT_FOUND
