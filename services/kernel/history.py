"""Questions the kernel asks of its ingested audit history (ContextFractals in memory): a cycle's trace.

Filtering by cycle, mission type, persona, status, event type and time is memory's ``query_fractals``; these
helpers follow its pages and turn its answers back into :class:`batos.audit.AuditEvent` objects. Golden paths
(the forge's training data) are BABS's curation, services/forge/curation.py: the one extractor.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from batos import paging
from batos.audit import AuditEvent

MemoryCall = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]

TRACE_LIMIT = 10_000  # events per cycle: far above any real cycle (a few dozen), a guard, not a page size
PAGE_ITEMS = 1_000  # fractals asked for per page; memory also bounds a page in bytes (batos.paging)


async def query_all(memory_call: MemoryCall, query: dict[str, Any], limit: int) -> list[dict[str, Any]]:
    """Up to ``limit`` fractals matching ``query``, following memory's pages (each within the frame limit)."""
    async def page(after: str | None) -> dict[str, Any]:
        body = {**query, "limit": min(PAGE_ITEMS, limit)}
        return await memory_call("query_fractals", body if after is None else {**body, "after": after})

    return await paging.collect(page, "fractals", limit)


async def trace_cycle(memory_call: MemoryCall, cycle_id: str) -> list[AuditEvent]:
    """Every ingested event of one cycle, in time order (ties keep memory's order, which is log order)."""
    fractals = await query_all(memory_call, {"cycle_id": cycle_id}, TRACE_LIMIT)
    events = [AuditEvent.model_validate_json(f["full_json"]) for f in fractals]
    return sorted(events, key=lambda e: e.timestamp)
