"""ALFRED's _audit_cognitive_history_: counting new successful cycles per persona and dispatching a forge."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace

import pytest

from services.forge.history_audit import (
    audit_cognitive_history,
    last_forge_times,
    personas_due,
)
from services.forge.steward import Instruction, write_instruction
from tests.unit.test_forge_curation import dnu_cycle


class FakeMemory:
    """memory's query_fractals over a list, with its filter semantics (meta equality, since on timestamps)."""

    def __init__(self, fractals):
        self.fractals = sorted(fractals, key=lambda f: f["meta"]["timestamp"])
        self.calls: list[tuple[str, str, dict]] = []

    async def __call__(self, service, command, body):
        self.calls.append((service, command, dict(body)))
        assert (service, command) == ("memory", "query_fractals")
        out = []
        for f in self.fractals:
            meta = f["meta"]
            if body.get("cycle_id") and meta["cycle_id"] != body["cycle_id"]:
                continue
            if any(body.get(k) and meta[k] != body[k] for k in ("status", "event_type", "persona", "mission_type")):
                continue
            if body.get("since") and meta["timestamp"] < body["since"]:
                continue
            out.append(f)
        return {"fractals": out[: body.get("limit", 100)]}


def settings(tmp_path, threshold=3):
    return SimpleNamespace(forge_threshold=threshold, upgrade_channel=tmp_path / "channel")


def cycles(n, *, start=0, final="SUCCESS"):
    return [f for i in range(start, start + n)
            for f in dnu_cycle(f"m{i}", f"def m{i}(self):\n    return {i}\n", minute=i, final=final)]


async def test_dispatches_when_threshold_reached(tmp_path):
    memory = FakeMemory(cycles(4) + cycles(3, start=10, final="FAILURE"))
    dispatched = []

    async def dispatch(persona, count):
        dispatched.append((persona, count))
        return {"instruction_id": "x1"}

    report = await audit_cognitive_history(memory, settings(tmp_path), dispatch=dispatch)
    # 4 successes but counting stops at the threshold; the failed cycles never count.
    assert report.counts["BRICK"] == 3 and report.counts["ROBIN"] == 0
    assert report.due == ["BRICK"] and dispatched == [("BRICK", 3)]
    assert report.dispatched == {"BRICK": {"instruction_id": "x1"}}


async def test_failed_cycles_do_not_reach_threshold(tmp_path):
    memory = FakeMemory(cycles(2) + cycles(5, start=10, final="FAILURE"))
    report = await audit_cognitive_history(memory, settings(tmp_path), dispatch=None)
    assert report.counts["BRICK"] == 2 and report.due == []


async def test_only_history_after_the_last_forge_counts(tmp_path):
    memory = FakeMemory(cycles(3) + cycles(2, start=30))  # minutes 0-2, then 30-31
    channel = tmp_path / "channel"
    ins = Instruction(id="old", persona="BRICK", script_path="s", config_path="c", output_dir="o",
                      created_at=datetime(2025, 9, 1, 12, 10, tzinfo=UTC).isoformat())
    write_instruction(channel, ins)
    (channel / "done").mkdir()
    (channel / "old.json").rename(channel / "done" / "old.json")  # handled: not busy, but it set "since"
    report = await audit_cognitive_history(memory, settings(tmp_path), dispatch=None)
    assert report.since["BRICK"].startswith("2025-09-01T12:10:00") and report.counts["BRICK"] == 2
    assert report.due == []
    # The queries themselves were narrowed: BRICK's by time, every one by persona.
    queries = [body for _, _, body in memory.calls if "event_type" in body]
    assert {b["persona"] for b in queries} == {"ALFRED", "BABS", "BRICK", "ROBIN"}
    assert all(b.get("since") == (report.since["BRICK"] if b["persona"] == "BRICK" else None) for b in queries)


async def test_pending_instruction_blocks_dispatch(tmp_path):
    memory = FakeMemory(cycles(5))
    write_instruction(tmp_path / "channel", Instruction(id="p1", persona="BRICK", script_path="s", config_path="c",
                                                        output_dir="o", created_at="2025-08-01T00:00:00+00:00"))

    async def dispatch(persona, count):  # pragma: no cover - must not be called
        raise AssertionError("dispatched while a forge is pending")

    report = await audit_cognitive_history(memory, settings(tmp_path), dispatch=dispatch)
    assert report.busy == ["BRICK"] and report.due == [] and report.dispatched == {}


async def test_dispatch_error_is_reported_not_raised(tmp_path):
    async def dispatch(persona, count):
        raise RuntimeError("forge unavailable")

    report = await audit_cognitive_history(FakeMemory(cycles(3)), settings(tmp_path), dispatch=dispatch)
    assert report.dispatched["BRICK"] == {"error": "RuntimeError: forge unavailable"}


def test_pure_helpers():
    since, busy = last_forge_times([
        {"persona": "brick", "created_at": "2025-09-01T10:00:00Z", "state": "done"},
        {"persona": "BRICK", "created_at": "2025-09-02T10:00:00+00:00", "state": "running"},
        {"persona": "ROBIN", "created_at": "not a time", "state": "done"},
    ])
    assert since == {"BRICK": "2025-09-02T10:00:00.000000+00:00", "ROBIN": ""} and busy == ["BRICK"]
    assert personas_due({"BRICK": 5, "ROBIN": 4, "BABS": 9}, 5, ["BABS"]) == ["BRICK"]
    with pytest.raises(ValueError):
        personas_due({}, 0, [])
