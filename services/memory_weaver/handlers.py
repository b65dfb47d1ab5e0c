"""The `memory` service's whitelist: command name -> handler (thin; logic lives in weaver.py).

Each handler takes its command's request type from proto/bodies/memory.py, decoded and checked once by the
worker runtime, and returns the command's reply type.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from batos import paging
from batos.errors import ServiceError
from batos.worker import Request
from proto import ErrorCode
from proto.bodies import memory as M

from . import verify
from .weaver import MemoryWeaver


def _weaver(req: Request) -> MemoryWeaver:
    weaver: MemoryWeaver | None = req.ctx.state.get("weaver")
    if weaver is None:
        raise ServiceError(ErrorCode.UNAVAILABLE, "memory weaver is not started")
    return weaver


def _page_bytes(req: Request) -> int:
    return paging.page_budget(int(req.ctx.settings.max_frame_bytes))


async def handle_replace_files(req: Request, body: M.ReplaceFiles) -> M.ReplaceFilesReply:
    """The requester's cancel stops the embedding between batches."""
    return await _weaver(req).replace_files(body, req.cancelled)


async def handle_create_fractals(req: Request, body: M.CreateFractals) -> M.CreateFractalsReply:
    return await _weaver(req).create_fractals(body, req.cancelled)


async def handle_file_hashes(req: Request, body: M.FileHashes) -> M.FileHashesReply:
    return await _weaver(req).file_hashes(body)


async def handle_delete_file(req: Request, body: M.DeleteFile) -> M.DeleteFileReply:
    return await _weaver(req).delete_file(body)


async def handle_search(req: Request, body: M.Search) -> M.SearchReply:
    """``search`` in pages: the ``k`` best hits are ranked as before; the reply holds those from ``after`` (an
    offset cursor) that fit one page, and ``next``. Every page re-ranks the same query (milliseconds)."""
    start = paging.offset_cursor(body.after, M.MAX_K)
    hits = await _weaver(req).search(body)
    page, more = paging.take_page(hits[start:], _page_bytes(req), len(hits))
    reply: M.SearchReply = msgspec.convert({"hits": page, "next": str(start + len(page)) if more else None},
                                           M.SearchReply)
    return reply


async def handle_inspect(req: Request, body: M.Inspect) -> M.InspectReply:
    return await _weaver(req).inspect(body)


async def handle_stats(req: Request, body: M.Stats) -> M.StatsReply:
    return await _weaver(req).stats()


async def handle_audit_offset(req: Request, body: M.AuditOffset) -> M.AuditOffsetReply:
    return await _weaver(req).audit_offset(body)


async def handle_query_fractals(req: Request, body: M.QueryFractals) -> M.QueryFractalsReply:
    """One page of fractals and ``next`` (batos.paging): a 10,000-event history never outgrows a message."""
    return await _weaver(req).query_fractals(body, _page_bytes(req))


async def handle_verify(req: Request, body: M.Verify) -> M.VerifyReply:
    """Memory's invariants (verify.py); ``repair`` fixes what the check finds."""
    return await verify.run(_weaver(req), body)


HANDLERS: dict[str, Callable[[Request, Any], Awaitable[Any]]] = {
    "replace_files": handle_replace_files,
    "create_fractals": handle_create_fractals,
    "file_hashes": handle_file_hashes,
    "delete_file": handle_delete_file,
    "search": handle_search,
    "inspect": handle_inspect,
    "stats": handle_stats,
    "audit_offset": handle_audit_offset,
    "query_fractals": handle_query_fractals,
    "verify": handle_verify,
}
