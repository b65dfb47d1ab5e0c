"""ALFRED's _audit_cognitive_history_: counting new successful cycles per persona since the steward's last forge."""

from __future__ import annotations

import json

import pytest

from batos.outcome import Outcome
from services.forge.history_audit import (
    audit_cognitive_history,
    last_forge_times,
    personas_due,
)
from tests.unit.test_forge_curation import dnu_cycle


class FakeMemory:
    """memory's query_fractals over a list, by scanning, with its filter semantics (meta equality, event types,
    the cycle's outcome, since on timestamps), and the steward's status (its record of forges)."""

    def __init__(self, fractals, steward=None):
        self.fractals = sorted(({**f, "event_id": json.loads(f["full_json"])["event_id"]} for f in fractals),
                               key=lambda f: (f["meta"]["timestamp"], f["event_id"]))
        self.steward = steward or {"runs": [], "last_forge": {}, "busy": []}
        self.calls: list[tuple[str, str, dict]] = []

    def outcome(self, cycle_id):
        out = Outcome()
        for f in self.fractals:
            m = f["meta"]
            if m["cycle_id"] == cycle_id:
                out = out.add((m["timestamp"], f["event_id"]), m["event_type"], m["psm_state"], m["status"])
        return out.status

    async def __call__(self, service, command, body):
        self.calls.append((service, command, dict(body)))
        if (service, command) == ("steward", "status"):
            return dict(self.steward)
        assert (service, command) == ("memory", "query_fractals")
        out = []
        for f in self.fractals:
            meta = f["meta"]
            if any(body.get(k) and meta[k] != body[k] for k in ("cycle_id", "status", "event_type", "persona",
                                                                 "mission_type")):
                continue
            if body.get("event_types") is not None and meta["event_type"] not in body["event_types"]:
                continue
            if body.get("cycle_status") is not None and self.outcome(meta["cycle_id"]) != body["cycle_status"]:
                continue
            if body.get("since") and meta["timestamp"] < body["since"]:
                continue
            out.append(f)
        if body.get("newest_first"):
            out.reverse()
        return {"fractals": out[: body.get("limit", 100)]}


def cycles(n, *, start=0, final="SUCCESS"):
    return [f for i in range(start, start + n)
            for f in dnu_cycle(f"m{i}", f"def m{i}(self):\n    return {i}\n", minute=i, final=final)]


async def test_due_when_threshold_reached():
    memory = FakeMemory(cycles(4) + cycles(3, start=10, final="FAILURE"))
    report = await audit_cognitive_history(memory, 3)
    # 4 successes but counting stops at the threshold; the failed cycles never count.
    assert report.counts["BRICK"] == 3 and report.counts["ROBIN"] == 0
    assert report.due == ["BRICK"] and memory.calls[0] == ("steward", "status", {})


async def test_failed_cycles_do_not_reach_threshold():
    memory = FakeMemory(cycles(2) + cycles(5, start=10, final="FAILURE"))
    report = await audit_cognitive_history(memory, 3)
    assert report.counts["BRICK"] == 2 and report.due == []


async def test_only_history_after_the_last_forge_counts():
    # minutes 0-2, then 30-31; the steward forged BRICK at minute 10 (a finished run: not busy, but it set "since")
    memory = FakeMemory(cycles(3) + cycles(2, start=30),
                        steward={"last_forge": {"BRICK": "2025-09-01T12:10:00+00:00"}, "busy": []})
    report = await audit_cognitive_history(memory, 3)
    assert report.since["BRICK"].startswith("2025-09-01T12:10:00") and report.counts["BRICK"] == 2
    assert report.due == []


async def test_the_audit_is_one_query():
    """Successful golden events of cycles that ended in SUCCESS, from the oldest last forge: one memory query
    (paged), not one per persona and event type plus one per candidate cycle."""
    memory = FakeMemory(cycles(4) + cycles(3, start=10, final="FAILURE"),
                        steward={"last_forge": {"BRICK": "2025-09-01T12:01:30+00:00"}, "busy": []})
    report = await audit_cognitive_history(memory, 10)
    queries = [body for service, _, body in memory.calls if service == "memory"]
    assert len(queries) == 1
    assert queries[0]["cycle_status"] == "SUCCESS" and set(queries[0]["event_types"]) == {"DNU_OUTCOME", "LLM_CALL"}
    assert queries[0].get("since") is None  # the other personas were never forged: their history starts at 0
    assert report.counts["BRICK"] == 2  # minutes 2 and 3: after BRICK's forge at 1:30; the failures never count


async def test_a_busy_persona_is_never_due():
    memory = FakeMemory(cycles(5), steward={"last_forge": {"BRICK": "2025-08-01T00:00:00+00:00"}, "busy": ["BRICK"]})
    report = await audit_cognitive_history(memory, 3)
    assert report.busy == ["BRICK"] and report.due == [] and "BRICK" not in report.counts


def test_pure_helpers():
    since, busy = last_forge_times({"last_forge": {"brick": "2025-09-02T10:00:00+00:00", "ROBIN": "not a time"},
                                    "busy": ["brick"]})
    assert since == {"BRICK": "2025-09-02T10:00:00.000000+00:00", "ROBIN": ""} and busy == ["BRICK"]
    assert last_forge_times({}) == ({}, [])
    assert personas_due({"BRICK": 5, "ROBIN": 4, "BABS": 9}, 5, ["BABS"]) == ["BRICK"]
    with pytest.raises(ValueError):
        personas_due({}, 0, [])
