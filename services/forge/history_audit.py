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

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from batos import personas
from batos.audit import normalized_timestamp
from services.forge.curation import (
    GOLDEN_EVENT_TYPES,
    SUCCESS,
    extract_example,
    final_status,
    group_cycles,
    parse_event,
)

Call = Callable[[str, str, dict[str, Any]], Awaitable[dict[str, Any]]]  # (service, command, body) -> reply

QUERY_LIMIT = 10_000  # fractals per query; the counts only need to reach the threshold
CYCLE_QUERY_CONCURRENCY = 8


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


async def _cycle_succeeded(call: Call, cycle_id: str, sem: asyncio.Semaphore) -> bool:
    async with sem:
        reply = await call("memory", "query_fractals", {"cycle_id": cycle_id, "limit": 1000})
    events = list(group_cycles(parse_event(f) for f in reply.get("fractals", [])).values())
    return bool(events) and final_status(events[0]) == SUCCESS


async def count_new_successes(call: Call, since: Mapping[str, str], threshold: int,
                              persona_names: Iterable[str]) -> dict[str, int]:
    """Per persona, successful golden cycles since its last forge, counted up to ``threshold`` (no further:
    the decision needs no more, and each count costs one query per cycle)."""
    wanted = [p.upper() for p in persona_names]
    fractals: list[dict[str, Any]] = []
    for persona in wanted:  # one narrow query per persona and event type, each from that persona's last forge
        for event_type in GOLDEN_EVENT_TYPES:
            body: dict[str, Any] = {"persona": persona, "status": SUCCESS, "event_type": event_type,
                                    "limit": QUERY_LIMIT}
            if since.get(persona):
                body["since"] = since[persona]
            fractals += (await call("memory", "query_fractals", body)).get("fractals", [])
    candidates = golden_candidates(fractals, since)
    sem = asyncio.Semaphore(CYCLE_QUERY_CONCURRENCY)
    counts: dict[str, int] = {}
    for persona in wanted:
        counts[persona] = 0
        cycles = candidates.get(persona, [])
        # Newest first, a threshold-sized batch at a time, stopping as soon as the threshold is reached.
        for start in range(0, len(cycles), threshold):
            batch = cycles[start:start + threshold]
            ok = await asyncio.gather(*(_cycle_succeeded(call, c, sem) for c in batch))
            counts[persona] += sum(ok)
            if counts[persona] >= threshold:
                counts[persona] = threshold
                break
    return counts


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
