"""Questions the kernel asks of its ingested audit history (ContextFractals in memory).

Filtering by cycle, mission type, persona, status, event type and time is memory's ``query_fractals``; these
helpers turn its answers back into :class:`batos.audit.AuditEvent` objects and into golden paths.

A cycle's input and output are read, in this order of preference, from
  * input:  CYCLE_START ``event_data.input``; the first STATE_TRANSITION's ``event_data.mission``; the first
            LLM call's prompt by the persona;
  * output: CYCLE_END ``event_data.output``; the COMPLETE transition's ``event_data.result``; the last LLM
            call's raw response by the persona.
A cycle succeeded when its CYCLE_END, or its transition into COMPLETE, has status SUCCESS.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from batos import paging
from batos.audit import AuditEvent, EventType, Status

MemoryCall = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]

TRACE_LIMIT = 10_000  # events per cycle: far above any real cycle (a few dozen), a guard, not a page size
GOLDEN_LIMIT = 1_000  # successful cycles examined per golden_paths call
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


@dataclass
class GoldenPath:
    cycle_id: str
    mission_type: str | None
    persona: str
    input: str
    output: str
    llm_calls: list[dict[str, str]] = field(default_factory=list)  # [{prompt, response}] by the persona
    timestamp: str = ""

    def messages(self) -> list[dict[str, str]]:
        """The SFT conversation (§5.1): the user's role holds the input, the assistant's the validated output."""
        return [{"role": "user", "content": self.input}, {"role": "assistant", "content": self.output}]


async def golden_paths(memory_call: MemoryCall, persona: str, mission_type: str | None = None,
                       limit: int = GOLDEN_LIMIT) -> list[GoldenPath]:
    """SUCCESS cycles (of ``mission_type``, or any) in which ``persona`` acted, with their inputs and outputs."""
    cycle_ids: dict[str, None] = {}  # ordered set
    for event_type in (EventType.CYCLE_END, EventType.STATE_TRANSITION):
        query: dict[str, Any] = {"event_type": str(event_type), "status": str(Status.SUCCESS)}
        if mission_type is not None:
            query["mission_type"] = mission_type
        for fractal in await query_all(memory_call, query, limit):
            cycle_ids.setdefault(fractal["meta"]["cycle_id"], None)
    paths = []
    for cycle_id in list(cycle_ids)[:limit]:
        path = golden_path_of(await trace_cycle(memory_call, cycle_id), persona)
        if path is not None:
            paths.append(path)
    return paths


def golden_path_of(events: list[AuditEvent], persona: str) -> GoldenPath | None:
    """The cycle as a golden path for ``persona``, or None: not a success, persona absent, or no input/output."""
    end = _terminal(events)
    if end is None or end.status != Status.SUCCESS:
        return None
    calls = [e for e in events if e.event_type == EventType.LLM_CALL and e.active_persona == persona
             and e.status == Status.SUCCESS]
    if not calls and end.active_persona != persona:
        return None
    data = [e.event_data.model_dump() for e in events]
    start = next((d.get("input") for e, d in zip(events, data, strict=True)
                  if e.event_type == EventType.CYCLE_START), None)
    mission = next((d.get("mission") for e, d in zip(events, data, strict=True)
                    if e.event_type == EventType.STATE_TRANSITION and d.get("mission") is not None), None)
    end_data = end.event_data.model_dump()
    given = _text(start) or _text(mission) or (calls[0].event_data.llm_prompt if calls else None)
    result = _text(end_data.get("output")) or _text(end_data.get("result")) or \
        (calls[-1].event_data.llm_response_raw if calls else None)
    if not given or not result:
        return None
    mission_type = end.mission_type or next((e.mission_type for e in events if e.mission_type), None)
    return GoldenPath(
        cycle_id=end.cycle_id, mission_type=mission_type, persona=persona, input=given, output=result,
        llm_calls=[{"prompt": c.event_data.llm_prompt or "", "response": c.event_data.llm_response_raw or ""}
                   for c in calls],
        timestamp=end.timestamp.isoformat(),
    )


def _terminal(events: list[AuditEvent]) -> AuditEvent | None:
    """The event that ends the cycle: its CYCLE_END, else its transition into a terminal state."""
    for event in reversed(events):
        if event.event_type == EventType.CYCLE_END:
            return event
    for event in reversed(events):
        if event.event_type == EventType.STATE_TRANSITION and \
                event.event_data.model_dump().get("to") in ("COMPLETE", "FAILED"):
            return event
    return None


_TEXT_KEYS = ("output", "answer", "source", "code", "text")  # where a structured result keeps its text


def _text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = next((value[k] for k in _TEXT_KEYS if isinstance(value.get(k), str) and value[k]), value)
    if value is None or value == "" or value == {}:
        return None
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
