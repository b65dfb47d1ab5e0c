"""History over ingested audit events: a cycle's trace."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from batos.audit import AuditEvent, Status, new_id
from services.kernel.audit_ingest import ingest_audit_log
from services.kernel.history import trace_cycle
from tests.unit.test_audit_ingest import FakeMemory, write

T0 = datetime(2025, 9, 2, 10, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def dnu_cycle(status: Status, *, persona: str = "BRICK", mission: str = "unhandled_message", t: float = 0,
              style: str = "events") -> list[AuditEvent]:
    """One _doesNotUnderstand_ cycle, in the CYCLE_START/END style or the kernel's transitions-only style."""
    cid = new_id()
    out = []
    if style == "events":
        out.append(AuditEvent.cycle_start(cid, persona="ALFRED", mission_type=mission, input="greet(self) please"))
    out.append(AuditEvent.transition(cid, "REASONING", "SYNTHESIZING", persona=persona, mission_type=mission,
                                     mission={"selector": "greet"} if style == "kernel" else None))
    out.append(AuditEvent.llm_call(cid, "SYNTHESIZING", persona=persona, mission_type=mission,
                                   prompt="[user] write greet", response="def greet(self):\n    return 'hi'"))
    if style == "events":
        out.append(AuditEvent.cycle_end(cid, persona="ALFRED", status=status, mission_type=mission,
                                        output="def greet(self):\n    return 'hi'"))
    else:
        out.append(AuditEvent.transition(cid, "VALIDATING", "COMPLETE", persona="ALFRED", status=status,
                                         mission_type=mission, result={"source": "def greet(self): ...", "ok": 1}))
    return [e.model_copy(update={"timestamp": at(t + i)}) for i, e in enumerate(out)]


async def ingested(tmp_path, events: list[AuditEvent]) -> FakeMemory:
    path = tmp_path / "m.jsonl"
    write(path, events)
    memory = FakeMemory()
    report = await ingest_audit_log(path, memory)
    assert report.created == len(events)
    return memory


async def test_trace_cycle_is_in_time_order(tmp_path):
    cycle = dnu_cycle(Status.SUCCESS)
    other = dnu_cycle(Status.FAILURE, t=0.5)
    memory = await ingested(tmp_path, [cycle[2], other[0], cycle[0], cycle[3], other[1], cycle[1]])  # shuffled
    trace = await trace_cycle(memory, cycle[0].cycle_id)
    assert [e.event_id for e in trace] == [e.event_id for e in cycle]
    assert trace == cycle  # the full events come back, not just summaries


async def test_trace_reads_what_memory_lacks_from_the_log_without_ingesting_it(tmp_path):
    """The kernel's `trace`: memory's events of the cycle (one query) and its lines logged since memory's offset,
    read from the log; nothing is written to memory, however long the pending log is."""
    from types import SimpleNamespace

    from services.kernel.autotelic import Autotelic

    cycle = dnu_cycle(Status.SUCCESS)
    path = tmp_path / "m.jsonl"
    write(path, [cycle[0], cycle[1]])
    memory = FakeMemory()
    await ingest_audit_log(path, memory)  # the first two are ingested; the rest arrive after, among others
    write(path, [*dnu_cycle(Status.FAILURE, t=1.5), cycle[2], *dnu_cycle(Status.SUCCESS, t=2.5), cycle[3]])
    creates, offset = memory.creates, memory.offsets[str(path)]

    async def request(body, **kw):
        return await memory(body)

    env = SimpleNamespace(audit=None, settings=SimpleNamespace(audit_log=path), client=SimpleNamespace(request=request))
    trace = await Autotelic(env).trace(cycle[0].cycle_id)
    assert trace == cycle
    assert memory.creates == creates and memory.offsets[str(path)] == offset  # memory untouched
    assert memory.queries == 1  # the stored part: one query
