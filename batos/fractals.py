"""Reading memory's audit history (ContextFractals) from any service: one ``query_fractals``, followed page by
page. The kernel's ``trace`` and ALFRED's history audit (the forge service) both read it this way."""

from __future__ import annotations

from typing import Protocol, TypeVar

import msgspec

from proto.bodies.memory import Fractal, QueryFractals
from proto.contract import Call, Reply

R = TypeVar("R", bound=Reply)

PAGE_ITEMS = 1_000  # fractals asked for per page; memory also bounds a page in bytes (batos.paging)
MAX_PAGES = 10_000  # a runaway guard: a server that always answers `next` is a bug


class MemoryRequest(Protocol):
    """Reaches the memory service with a typed body (``Client.request`` with the caller's timeout)."""

    async def __call__(self, body: Call[R]) -> R: ...


async def query_all(memory: MemoryRequest, query: QueryFractals, limit: int) -> list[Fractal]:
    """Up to ``limit`` fractals matching ``query`` (one query), following memory's pages."""
    out: list[Fractal] = []
    after: str | None = None
    for _ in range(MAX_PAGES):
        page = await memory(msgspec.structs.replace(query, limit=min(PAGE_ITEMS, limit - len(out)), after=after))
        out.extend(page.fractals)
        after = page.next
        if after is None or len(out) >= limit:
            break
    return out[:limit]
