"""A Table 3 event as the kernel's audit ingestion sends it to memory: its own ``fractal_of`` on the logged line
(services/kernel/audit_ingest.py), so tests and benchmarks never hand-copy the fractal's meta."""

from __future__ import annotations

from typing import Any

import msgspec

from batos.audit import AuditEvent, AuditEventStruct
from proto import contract
from services.kernel.audit_ingest import fractal_of


def fractal(ev: AuditEvent, summary: str = "") -> dict[str, Any]:
    """The ``create_fractals`` item for ``ev`` (summary: ``"<event type> by <persona>"`` unless given)."""
    line = ev.to_line().encode()
    return contract.encode(fractal_of(msgspec.json.decode(line, type=AuditEventStruct), line,
                                      summary or f"{ev.event_type} by {ev.active_persona}"))
