"""ALFRED's ``_audit_cognitive_history_`` (blueprint §5.1): is there enough new history to forge a persona?

The forge service's ``history`` command; the kernel's autotelic loop asks it periodically and dispatches a
forge run (forge ``run``, then steward ``upgrade``) for the first persona that is due. It counts, per
persona, the cognitive cycles that ended in SUCCESS and hold a golden-path event of that persona (the same
events BABS's curation would take) since the persona's last forge, up to ``settings.forge_threshold``.

"Since the last forge" comes from the steward's ``status`` over the broker (its own record of every run,
``last_forge``), and so does ``busy`` (a run in flight). Failed attempts count too, on purpose: a forge that
keeps failing (a broken template, too little memory) must not stop the worker every autotelic period; it is
retried once enough new history has accumulated. A busy persona is never due.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec

from batos import personas
from batos.audit import normalized_timestamp
from batos.errors import ServiceError
from batos.fractals import MemoryRequest
from proto import contract
from proto.bodies.memory import QueryFractals
from proto.schema import ProtocolError
from services.forge.curation import GOLDEN_EVENT_TYPES, SUCCESS, extract_example, parse_event

Call = Callable[[str, str, dict[str, Any]], Awaitable[dict[str, Any]]]  # (service, command, body) -> reply

QUERY_LIMIT = 100_000  # golden events read per audit at most: a guard (the pages stop at the threshold)
AUDIT_PAGE = 200  # golden events per page, newest first: a persona's threshold is usually reached in the first


@dataclass
class HistoryAudit:
    threshold: int
    since: dict[str, str]  # persona -> timestamp of its last forge ("" = never)
    counts: dict[str, int] = field(default_factory=dict)  # new successful golden cycles, capped at threshold
    busy: list[str] = field(default_factory=list)  # personas with a forge running
    due: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "since": self.since, "counts": self.counts, "busy": self.busy,
                "due": self.due}


# -- pure parts ------------------------------------------------------------------------------------


def _iso(value: str) -> str:
    """Any ISO 8601 timestamp in the audit log's fixed-width UTC form, so strings compare as times."""
    return normalized_timestamp(datetime.fromisoformat(value)) if value else ""


def last_forge_times(steward_status: Mapping[str, Any]) -> tuple[dict[str, str], list[str]]:
    """(persona -> latest forge time in the audit log's form, busy personas) from the steward's ``status``."""
    since: dict[str, str] = {}
    for persona, at in dict(steward_status.get("last_forge") or {}).items():
        try:
            since[str(persona).upper()] = _iso(str(at or ""))
        except ValueError:
            since[str(persona).upper()] = ""
    return since, sorted({str(p).upper() for p in steward_status.get("busy") or []})


def golden_candidates(fractals: Iterable[Mapping[str, Any]], since: Mapping[str, str]) -> dict[str, list[str]]:
    """persona -> cycle ids (newest first) holding a golden event of that persona newer than its last forge."""
    newest: dict[tuple[str, str], str] = {}
    for fractal in fractals:
        event = parse_event(fractal)
        persona = str(event.get("active_persona") or "").upper()
        stamp = str((fractal.get("meta") or {}).get("timestamp") or event.get("timestamp") or "")
        if stamp <= since.get(persona, "") or extract_example(event) is None:
            continue
        key = (persona, str(event.get("cycle_id")))
        newest[key] = max(newest.get(key, ""), stamp)
    out: dict[str, list[str]] = {}
    for (persona, cycle), _ in sorted(newest.items(), key=lambda kv: kv[1], reverse=True):
        out.setdefault(persona, []).append(cycle)
    return out


def personas_due(counts: Mapping[str, int], threshold: int, busy: Iterable[str]) -> list[str]:
    if threshold < 1:
        raise ValueError("forge_threshold must be >= 1")
    blocked = set(busy)
    return sorted(p for p, n in counts.items() if n >= threshold and p not in blocked)


# -- the protocol -----------------------------------------------------------------------------------


def memory_of(call: Call) -> MemoryRequest:
    """Memory's typed bodies over a ``(service, command, body)`` caller: encoded and decoded by proto.contract."""
    async def request(body: Any) -> Any:
        s = contract.spec_of(body)
        try:
            return contract.decode_reply(s, await call(s.service, s.command, contract.encode(body)))
        except ProtocolError as e:
            raise ServiceError(e.code, e.message) from None

    return request


async def count_new_successes(call: Call, since: Mapping[str, str], threshold: int,
                              persona_names: Iterable[str]) -> dict[str, int]:
    """Per persona, successful golden cycles since its last forge, counted up to ``threshold``, with ONE query:
    memory's history index answers "successful golden events of cycles that ended in SUCCESS, since the earliest
    of the personas' last forges", newest first, and the pages stop as soon as every persona has reached the
    threshold (the decision needs no more). Each persona's own ``since`` and the golden-path check are here."""
    wanted = [p.upper() for p in persona_names]
    cycles: dict[str, set[str]] = {p: set() for p in wanted}
    if not wanted:
        return {}
    oldest = min(since.get(p, "") for p in wanted)
    query = QueryFractals(persona=wanted[0] if len(wanted) == 1 else None, status=SUCCESS,
                          event_types=list(GOLDEN_EVENT_TYPES), cycle_status=SUCCESS, since=oldest or None,
                          newest_first=True, limit=AUDIT_PAGE)
    memory = memory_of(call)
    read = 0
    open_ = list(wanted)  # personas that may still gain a cycle
    while read < QUERY_LIMIT and open_:
        page = await memory(query)
        for fractal in page.fractals:
            persona = str(fractal.meta.get("persona") or "").upper()
            if persona in open_:
                for cycle in golden_candidates([msgspec.to_builtins(fractal)], since).get(persona, []):
                    cycles[persona].add(cycle)
        read += len(page.fractals)
        if page.next is None or not page.fractals:
            break
        reached = str(page.fractals[-1].meta.get("timestamp") or "")  # newest first: all that follows is older
        open_ = [p for p in open_ if len(cycles[p]) < threshold and since.get(p, "") < reached]
        query = msgspec.structs.replace(query, after=page.next)
    return {p: min(threshold, len(c)) for p, c in cycles.items()}


async def audit_cognitive_history(call: Call, threshold: int, *,
                                  persona_names: Iterable[str] | None = None) -> HistoryAudit:
    """One audit: the steward's record, then the counts; ``due`` lists the personas to forge (the kernel
    dispatches one at a time: the forge worker trains one adapter at a time and each run restarts it)."""
    since, busy = last_forge_times(await call("steward", "status", {}))
    names = [p.upper() for p in (persona_names or personas.PERSONAS)]
    report = HistoryAudit(threshold=threshold, since={p: since.get(p, "") for p in names}, busy=busy)
    report.counts = await count_new_successes(call, since, threshold, [p for p in names if p not in busy])
    report.due = personas_due(report.counts, threshold, busy)
    return report
