"""Questions the kernel asks of its ingested audit history (ContextFractals in memory): a cycle's trace.

Filtering by cycle, mission type, persona, status, event type and time is memory's ``query_fractals``, answered
from its history indexes (services/memory_weaver/history_index.py) in one query that :mod:`batos.fractals`
follows page by page; this module turns the answers back into :class:`batos.audit.AuditEvent` objects. Golden
paths (the forge's training data) are BABS's curation, services/forge/curation.py: the one extractor.
"""

from __future__ import annotations

from batos.audit import AuditEvent
from batos.fractals import MemoryRequest, query_all
from proto.bodies.memory import QueryFractals

TRACE_LIMIT = 10_000  # events per cycle: far above any real cycle (a few dozen), a guard, not a page size


async def trace_cycle(memory: MemoryRequest, cycle_id: str) -> list[AuditEvent]:
    """Every ingested event of one cycle, in time order (memory's index order: timestamp, then event id)."""
    fractals = await query_all(memory, QueryFractals(cycle_id=cycle_id), TRACE_LIMIT)
    return [AuditEvent.model_validate_json(f.full_json) for f in fractals]
