"""The audit schema (Table 3), its generated msgspec Struct, and the non-blocking AuditLog writer."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from datetime import UTC, date, datetime
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field, ValidationError

from batos.audit import (
    TIMESTAMP_PATTERN,
    AuditEvent,
    AuditEventStruct,
    AuditLog,
    AuditLogError,
    EventType,
    SchemaTranslationError,
    Status,
    log_segments,
    new_id,
    prune_segments,
    rotated_segments,
    struct_from_model,
)
from tests.waiting import until

TABLE3 = {"event_id", "cycle_id", "timestamp", "psm_state", "active_persona", "event_type", "event_data", "status"}
DECODER = msgspec.json.Decoder(AuditEventStruct)


def sample_events(cycle_id: str | None = None) -> list[AuditEvent]:
    cid = cycle_id or new_id()
    return [
        AuditEvent.cycle_start(cid, persona="ALFRED", mission_type="ask", input="what is a UvmObject?"),
        AuditEvent.transition(cid, "IDLE", "REASONING", persona="BABS", mission_type="ask"),
        AuditEvent.llm_call(cid, "REASONING", persona="BABS", mission_type="ask",
                            prompt=[{"role": "system", "content": "You are BABS"}, {"role": "user", "content": "q\n2"}],
                            response="Thought: search\u2028done", prompt_tokens=12),
        AuditEvent.retrieval(cid, "REASONING", persona="BABS", query="UvmObject", chunk_ids=["3a", "3b"]),
        AuditEvent.dnu_outcome(cid, "VALIDATING", persona="BRICK", receiver_oid="1f", selector="greet",
                               status=Status.SUCCESS, source="def greet(self):\n    return 'hi'\n"),
        AuditEvent.prompt_budget(cid, "SYNTHESIZING", persona="ROBIN", budget_tokens=1200, used_tokens=900,
                                 summary_ids=["a"], chunk_ids=["b", "c"]),
        AuditEvent.cycle_end(cid, persona="ROBIN", status=Status.SUCCESS, output="A prototype object.",
                             mission_type="ask"),
    ]


def read_lines(path: Path) -> list[bytes]:
    out = []
    for _start, seg in log_segments(path):
        if seg.exists():
            out.extend(seg.read_bytes().splitlines(keepends=True))
    return out


# -- schema -------------------------------------------------------------------------------------------------

def test_model_is_table3_plus_mission_type():
    fields = AuditEvent.model_fields
    assert set(fields) == TABLE3 | {"mission_type"}
    assert {n for n, f in fields.items() if f.is_required()} == TABLE3
    assert set(AuditEvent.model_fields["event_data"].annotation.model_fields) == {
        "llm_prompt", "llm_response_raw", "retrieved_chunk_ids"}


def test_constructors_write_one_valid_line_each():
    for event in sample_events():
        line = event.to_line()
        assert "\n" not in line and "\r" not in line
        assert AuditEvent.model_validate_json(line) == event
        decoded = DECODER.decode(line.encode())
        assert decoded.event_id == event.event_id and decoded.event_type == event.event_type
        assert datetime.fromisoformat(decoded.timestamp) == event.timestamp
    llm = sample_events()[2]
    assert llm.event_data.llm_prompt == "[system] You are BABS\n[user] q\n2"
    assert json.loads(llm.to_line())["event_data"]["prompt_tokens"] == 12


def test_event_data_keeps_extras_but_top_level_is_closed():
    event = AuditEvent.transition(new_id(), "IDLE", "DECOMPOSING", persona="ALFRED", note="n", nested={"k": [1]})
    data = json.loads(event.to_line())["event_data"]
    # Table 3's optional keys are omitted when absent; extras are kept as given
    assert data == {"from": "IDLE", "to": "DECOMPOSING", "note": "n", "nested": {"k": [1]}}
    raw = json.loads(event.to_line())
    with pytest.raises(ValidationError):
        AuditEvent.model_validate({**raw, "surprise": 1})
    with pytest.raises(msgspec.ValidationError):
        DECODER.decode(json.dumps({**raw, "surprise": 1}))


def test_kernel_style_dict_lifts_mission_type():
    event = AuditEvent.model_validate({
        "event_id": new_id(), "cycle_id": new_id(), "timestamp": "2025-09-02T10:00:00+00:00", "psm_state": "IDLE",
        "active_persona": "ALFRED", "event_type": "STATE_TRANSITION", "status": "IN_PROGRESS",
        "event_data": {"mission_type": "ask", "from": None, "to": "IDLE"}})
    assert event.mission_type == "ask"
    assert "mission_type" not in json.loads(event.to_line())["event_data"]
    blank = AuditEvent.model_validate({**json.loads(event.to_line()), "mission_type": None,
                                       "event_data": {"mission_type": ""}})
    assert blank.mission_type is None  # an empty one stays where it was given rather than fail validation


def _valid_doc() -> dict:
    return json.loads(sample_events()[2].to_line())


MUTATIONS = [
    lambda d: d,
    lambda d: d.pop("status"),
    lambda d: d.pop("event_data"),
    lambda d: d.pop("mission_type"),
    lambda d: d.update(status="DONE"),
    lambda d: d.update(status="SUCCESS_DEGRADED"),
    lambda d: d.update(event_id="not-a-uuid"),
    lambda d: d.update(cycle_id=7),
    lambda d: d.update(timestamp="2025-09-02T10:00:00"),  # naive: refused
    lambda d: d.update(timestamp="2025-13-02T10:00:00Z"),
    lambda d: d.update(timestamp="2025-09-02T10:00:00.5-03:00"),
    lambda d: d.update(timestamp="2025-02-30T10:00:00Z"),
    lambda d: d.update(timestamp="2025-09-02 10:00:00Z"),
    lambda d: d.update(timestamp="2025-09-02T10:00:00z"),
    lambda d: d.update(timestamp=1756800000),
    lambda d: d.update(timestamp="2025-09-02"),
    lambda d: d.update(psm_state="BRICK\n"),
    lambda d: d.update(psm_state=""),
    lambda d: d.update(psm_state="has space"),
    lambda d: d.update(active_persona="B" * 65),
    lambda d: d.update(event_type="lower"),
    lambda d: d.update(event_type="NEW_KIND"),
    lambda d: d.update(mission_type=""),
    lambda d: d.update(mission_type=None),
    lambda d: d.update(event_data=[]),
    lambda d: d["event_data"].update(llm_prompt=5),
    lambda d: d["event_data"].update(retrieved_chunk_ids=["a", 1]),
    lambda d: d["event_data"].update(retrieved_chunk_ids=None),
    lambda d: d["event_data"].update(anything={"goes": True}),
    lambda d: d.update(extra_top=1),
]


def _agree(doc: object) -> tuple[bool, bool]:
    text = json.dumps(doc)
    try:
        AuditEvent.model_validate_json(text)
        by_model = True
    except ValidationError:
        by_model = False
    try:
        DECODER.decode(text)
        by_struct = True
    except msgspec.ValidationError:
        by_struct = False
    return by_model, by_struct


@pytest.mark.parametrize("mutate", range(len(MUTATIONS)))
def test_struct_accepts_exactly_what_the_model_accepts(mutate):
    doc = _valid_doc()
    MUTATIONS[mutate](doc)
    by_model, by_struct = _agree(doc)
    assert by_model == by_struct


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(["event_id", "cycle_id", "psm_state", "active_persona", "event_type", "status",
                              "mission_type", "timestamp"]),
       value=st.one_of(st.text(max_size=70), st.integers(), st.none(), st.booleans(),
                       st.from_regex(r"\A[A-Z][A-Z0-9_]{0,70}\Z"), st.uuids().map(str),
                       st.datetimes().map(datetime.isoformat), st.from_regex(TIMESTAMP_PATTERN),
                       st.datetimes(timezones=st.just(UTC)).map(datetime.isoformat)))
def test_struct_and_model_agree_on_random_values(field, value):
    doc = _valid_doc()
    doc[field] = value
    by_model, by_struct = _agree(doc)
    assert by_model == by_struct, (field, value)


def test_struct_is_generated_from_the_model_schema():
    schema = msgspec.json.schema(AuditEventStruct)["$defs"]["AuditEventStruct"]
    model = AuditEvent.model_json_schema()
    assert set(schema["properties"]) == set(model["properties"])
    assert set(schema["required"]) == set(model["required"])


class _Counts(BaseModel):
    counts: dict[str, int]


class _Bounded(BaseModel):
    n: int = Field(ge=0)


class _Day(BaseModel):
    when: date


@pytest.mark.parametrize("model", [_Counts, _Bounded, _Day])
def test_generator_refuses_what_it_cannot_translate(model):
    # a constraint it would silently drop is a drift: it must fail at import instead
    with pytest.raises(SchemaTranslationError):
        struct_from_model(model)


# -- the writer ------------------------------------------------------------------------------------------------

async def test_log_writes_every_event_in_order(tmp_path):
    path = tmp_path / "m.jsonl"
    cycles = [new_id() for _ in range(5)]

    async def producer(cid: str) -> None:
        for i in range(60):
            await audit.log(AuditEvent.transition(cid, "A", "B", persona="ALFRED", i=i))
            await asyncio.sleep(0)

    async with AuditLog(path) as audit:
        await asyncio.gather(*(producer(c) for c in cycles))
        await audit.flush()
        assert audit.stats["written"] == 300 and audit.stats["failed"] == 0
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b""
    events = [DECODER.decode(line) for line in lines[:-1]]
    for cid in cycles:
        assert [json.loads(line)["event_data"]["i"] for line, e in zip(lines, events, strict=False)
                if e.cycle_id == cid] == list(range(60))


async def test_dict_events_are_validated_before_queueing(tmp_path):
    async with AuditLog(tmp_path / "m.jsonl") as audit:
        with pytest.raises(ValidationError):
            await audit.log({"event_id": "x"})
    with pytest.raises(AuditLogError):
        await audit.log(sample_events()[0])


async def test_rotation_happens_between_whole_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    async with AuditLog(path, max_bytes=4096) as audit:
        for i in range(200):
            await audit.log(AuditEvent.llm_call(new_id(), "REASONING", persona="BRICK", prompt="p" * (i % 50),
                                                response="r"))
    rotated = rotated_segments(path)
    assert len(rotated) > 5
    expected_start = 0
    for start, seg in rotated:
        data = seg.read_bytes()
        assert start == expected_start and data.endswith(b"\n") and len(data) <= 4096
        expected_start += len(data)
    assert log_segments(path)[-1][0] == expected_start
    lines = read_lines(path)
    assert len(lines) == 200 and all(DECODER.decode(line) for line in lines)


async def test_a_torn_final_line_is_ended_on_reopen(tmp_path):
    path = tmp_path / "m.jsonl"
    good = sample_events()[0].to_line()
    path.write_bytes(good.encode() + b"\n" + good[:40].encode())  # a crash mid-line
    event = sample_events()[1]
    async with AuditLog(path) as audit:
        await audit.log(event)
        await audit.flush()
        assert audit.stats["torn_tails_repaired"] == 1
    lines = path.read_bytes().split(b"\n")
    assert lines[1] == good[:40].encode()  # the fragment is one (malformed) line of its own
    assert DECODER.decode(lines[2]).event_id == event.event_id


async def test_one_writer_per_file(tmp_path):
    async with AuditLog(tmp_path / "m.jsonl"):
        second = AuditLog(tmp_path / "m.jsonl")
        with pytest.raises(AuditLogError, match="another writer"):
            await second.open()
        await second.close()
    async with AuditLog(tmp_path / "m.jsonl") as again:  # released on close
        await again.log(sample_events()[0])


async def test_log_returns_while_the_disk_is_stuck(tmp_path):
    audit = AuditLog(tmp_path / "m.jsonl")
    await audit.open()
    stuck = threading.Event()
    audit._executor.submit(stuck.wait, 10)  # the writer thread is busy: every write must queue behind this
    try:
        started = time.perf_counter()
        for event in sample_events() * 20:
            await audit.log(event)
        assert time.perf_counter() - started < 0.5
        ticks = 0

        async def ticker():
            nonlocal ticks
            for _ in range(5):
                await asyncio.sleep(0.005)
                ticks += 1

        await asyncio.wait_for(ticker(), 1.0)  # the loop still runs
        assert ticks == 5 and audit.stats["written"] == 0
    finally:
        stuck.set()
    await audit.flush()
    assert audit.stats["written"] == 140
    await audit.close()


async def test_log_threadsafe_from_a_worker_thread(tmp_path):
    path = tmp_path / "m.jsonl"
    async with AuditLog(path) as audit:
        events = sample_events()
        await asyncio.to_thread(lambda: [audit.log_threadsafe(e) for e in events])
        # each reaches the queue through a task of its own: wait for them all, then for the writes
        await until(lambda: audit.stats["written"] + audit.stats["queued"] >= len(events), what="every event queued",
                    timeout=5.0)
        await audit.flush()
    assert [DECODER.decode(line).event_id for line in read_lines(path)] == [e.event_id for e in events]


async def test_prune_keeps_the_newest_rotated_segment(tmp_path):
    path = tmp_path / "m.jsonl"
    async with AuditLog(path, max_bytes=2048) as audit:
        for _ in range(60):
            await audit.log(AuditEvent.transition(new_id(), "A", "B", persona="ALFRED"))
    before = log_segments(path)
    rotated = rotated_segments(path)
    removed = prune_segments(path, ingested_offset=before[-1][0] + 10**9)
    assert removed == [seg for _start, seg in rotated[:-1]]
    assert rotated_segments(path) == rotated[-1:]
    assert log_segments(path)[-1][0] == before[-1][0]  # the active file still starts where it did


def test_event_type_names_are_upper_snake():
    for kind in EventType:
        AuditEvent.make(kind, cycle_id=new_id(), psm_state="IDLE", persona="ALFRED")


async def test_a_failed_write_is_counted_and_logging_goes_on(tmp_path, caplog):
    path = tmp_path / "m.jsonl"
    async with AuditLog(path) as audit:
        real_write = audit.handler._write
        calls = 0

        async def flaky_write(data, lines):
            nonlocal calls
            calls += 1
            if calls == 1:
                raise OSError(28, "No space left on device")
            await real_write(data, lines)

        audit.handler._write = flaky_write
        await audit.log(sample_events()[0])
        await audit.flush()
        assert audit.stats["failed"] == 1 and "No space left" in audit.stats["last_error"]
        later = sample_events()[1]
        await audit.log(later)
        await audit.flush()
        assert audit.stats["written"] == 1
    assert [DECODER.decode(line).event_id for line in read_lines(path)] == [later.event_id]
    assert "events not written" in caplog.text
