"""ALFRED's ``_audit_cognitive_history_`` (blueprint §5.1): is there enough new history to forge a persona?

Run periodically by the kernel's autotelic loop. It counts, per persona, the cognitive cycles that ended in
SUCCESS and hold a golden-path event of that persona (the same events BABS's curation would take) since
the persona's last forge, and dispatches a forge run (curation first) for each persona at or above
``settings.forge_threshold``.

"Since the last forge" is read from the upgrade channel: every instruction, pending, running or done, says
when a persona was last forged. Failed attempts count too, on purpose: a forge that keeps failing (a broken
template, too little memory) must not stop the worker every autotelic period; it is retried once enough
new history has accumulated. A persona with an instruction still pending or running is never dispatched.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
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
from services.forge.steward import all_instructions

Call = Callable[[str, str, dict[str, Any]], Awaitable[dict[str, Any]]]  # (service, command, body) -> reply
Dispatch = Callable[[str, int], Awaitable[Any]]  # (persona, new successful cycles) -> anything

QUERY_LIMIT = 10_000  # fractals per query; the counts only need to reach the threshold
CYCLE_QUERY_CONCURRENCY = 8


@dataclass
class HistoryAudit:
    threshold: int
    since: dict[str, str]  # persona -> timestamp of its last forge ("" = never)
    counts: dict[str, int] = field(default_factory=dict)  # new successful golden cycles, capped at threshold
    busy: list[str] = field(default_factory=list)  # personas with a forge pending or running
    due: list[str] = field(default_factory=list)
    dispatched: dict[str, Any] = field(default_factory=dict)  # persona -> dispatch result or error text

    def describe(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "since": self.since, "counts": self.counts, "busy": self.busy,
                "due": self.due, "dispatched": self.dispatched}


# -- pure parts ------------------------------------------------------------------------------------


def _iso(value: str) -> str:
    """Any ISO 8601 timestamp in the audit log's fixed-width UTC form, so strings compare as times."""
    return normalized_timestamp(datetime.fromisoformat(value)) if value else ""


def last_forge_times(instructions: Iterable[Mapping[str, Any]]) -> tuple[dict[str, str], list[str]]:
    """(persona -> latest instruction time, personas with an instruction pending or running)."""
    since: dict[str, str] = {}
    busy: set[str] = set()
    for ins in instructions:
        persona = str(ins.get("persona") or "").upper()
        if not persona:
            continue
        try:
            at = _iso(str(ins.get("created_at") or ""))
        except ValueError:
            at = ""
        since[persona] = max(since.get(persona, ""), at)
        if ins.get("state") in ("pending", "running"):
            busy.add(persona)
    return since, sorted(busy)


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


def forge_dispatcher(call: Call, timeout: float | None = None) -> Dispatch:
    """The default dispatch: the ``forge`` service's ``run`` (curation, script, upgrade request)."""
    async def dispatch(persona: str, count: int) -> Any:
        body = {"persona": persona, "reason": f"{count} new successful cycles"}
        return await call("forge", "run", body) if timeout is None else \
            await asyncio.wait_for(call("forge", "run", body), timeout)
    return dispatch


async def audit_cognitive_history(call: Call, settings: Any, *, dispatch: Dispatch | None = None,
                                  persona_names: Iterable[str] | None = None) -> HistoryAudit:
    """One audit: count, decide, and dispatch a forge for every persona that is due (one at a time: the
    forge worker trains one adapter at a time and each run restarts it)."""
    threshold = int(settings.forge_threshold)
    since, busy = last_forge_times(all_instructions(Path(settings.upgrade_channel)))
    names = [p.upper() for p in (persona_names or personas.PERSONAS)]
    report = HistoryAudit(threshold=threshold, since={p: since.get(p, "") for p in names}, busy=busy)
    report.counts = await count_new_successes(call, since, threshold, [p for p in names if p not in busy])
    report.due = personas_due(report.counts, threshold, busy)
    if dispatch is not None and report.due:
        persona = report.due[0]  # the others are due again at the next audit, after this one's restart
        try:
            report.dispatched[persona] = await dispatch(persona, report.counts[persona])
        except Exception as e:  # reported to ALFRED, not raised: the autotelic loop carries on
            report.dispatched[persona] = {"error": f"{type(e).__name__}: {e}"}
    return report
