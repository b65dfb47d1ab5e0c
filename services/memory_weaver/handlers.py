"""The `memory` service's whitelist: command name -> handler (thin; logic lives in weaver.py)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from batos import paging
from batos.errors import ServiceError
from proto import ErrorCode

from . import verify
from .payloads import MAX_K
from .weaver import MemoryWeaver

Handler = Callable[[Any], Awaitable[dict[str, Any]]]


def _weaver(req: Any) -> MemoryWeaver:
    weaver = req.ctx.state.get("weaver")
    if weaver is None:
        raise ServiceError(ErrorCode.UNAVAILABLE, "memory weaver is not started")
    return weaver


def _plain(name: str) -> Handler:
    async def handle(req: Any) -> dict[str, Any]:
        return await getattr(_weaver(req), name)(req.args)

    handle.__name__ = f"handle_{name}"
    return handle


def _cancellable(name: str) -> Handler:
    """Commands that embed: the requester's cancel stops the embedding between batches."""

    async def handle(req: Any) -> dict[str, Any]:
        return await getattr(_weaver(req), name)(req.args, req.cancelled)

    handle.__name__ = f"handle_{name}"
    return handle


def _page_bytes(req: Any) -> int:
    return paging.page_budget(int(req.ctx.settings.max_frame_bytes))


async def handle_query_fractals(req: Any) -> dict[str, Any]:
    """One page of fractals and ``next`` (batos.paging): a 10,000-event history never outgrows a message."""
    return await _weaver(req).query_fractals(req.args, _page_bytes(req))


async def handle_search(req: Any) -> dict[str, Any]:
    """``search`` in pages: the ``k`` best hits are ranked as before; the reply holds those from ``after`` (an
    offset cursor) that fit one page, and ``next``. Every page re-ranks the same query (milliseconds)."""
    body = dict(req.args) if isinstance(req.args, dict) else req.args
    start = paging.offset_cursor(body.pop("after", None), MAX_K) if isinstance(body, dict) else 0
    hits = (await _weaver(req).search(body))["hits"]
    page, more = paging.take_page(hits[start:], _page_bytes(req), len(hits))
    return {"hits": page, "next": str(start + len(page)) if more else None}


HANDLERS: dict[str, Handler] = {
    "replace_file": _cancellable("replace_file"),
    "replace_files": _cancellable("replace_files"),
    "create_chunks": _cancellable("create_chunks"),
    "create_fractals": _cancellable("create_fractals"),
    "file_hashes": _plain("file_hashes"),
    "delete_file": _plain("delete_file"),
    "search": handle_search,
    "get": _plain("get"),
    "inspect": _plain("get"),
    "children": _plain("children"),
    "stats": _plain("stats"),
    "audit_offset": _plain("audit_offset"),
    "query_fractals": handle_query_fractals,
    "verify": lambda req: verify.run(_weaver(req), req.args),  # invariants; {"repair": true} fixes them
}
