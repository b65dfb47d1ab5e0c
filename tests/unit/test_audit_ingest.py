"""ALFRED's audit-log ingestion: exactly once across crashes, malformed lines counted, partial lines left."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from batos.audit import AuditEvent, AuditLog, Status, log_segments, new_id, prune_segments, rotated_segments
from batos.errors import ServiceError
from batos.outcome import Outcome
from proto import contract
from services.kernel import audit_ingest
from services.kernel.audit_ingest import (
    LogReader,
    ingest_audit_log,
    llm_summarizer,
    template_summary,
    usable_summary,
)


class FakeMemory:
    """memory's create_fractals / audit_offset / query_fractals over a dict, by scanning: a batch and its offset
    commit together. Called like ``Client.request``: a typed body in, the typed reply out (proto.contract)."""

    def __init__(self) -> None:
        self.fractals: dict[str, dict[str, Any]] = {}
        self.offsets: dict[str, int] = {}
        self.creates = 0
        self.queries = 0
        self.fail_before: int | None = None  # create_fractals call index that fails without committing
        self.fail_after: int | None = None  # ... that commits, then fails (the reply is lost)

    async def __call__(self, typed: Any) -> Any:
        await asyncio.sleep(0)
        s = contract.spec_of(typed)
        assert s.service == "memory"
        return contract.decode_reply(s, getattr(self, s.command)(contract.encode(typed)))

    def audit_offset(self, body: dict[str, Any]) -> dict[str, Any]:
        return {"value": self.offsets.get(body["path"], 0)}

    def create_fractals(self, body: dict[str, Any]) -> dict[str, Any]:
        index, self.creates = self.creates, self.creates + 1
        if index == self.fail_before:
            raise ServiceError("unavailable", "memory went away")
        staged: dict[str, dict[str, Any]] = {}
        skipped = 0
        for fractal in body["events"]:
            assert set(fractal) == {"event_id", "summary", "full_json", "meta"}
            assert set(fractal["meta"]) <= {"cycle_id", "mission_type", "persona", "status", "timestamp",
                                            "event_type", "psm_state"}
            if fractal["event_id"] in self.fractals or fractal["event_id"] in staged:
                skipped += 1
            else:
                staged[fractal["event_id"]] = fractal
        self.fractals.update(staged)  # the "transaction": fractals and offset together
        if body.get("offset"):
            self.offsets[body["offset"]["path"]] = body["offset"]["value"]
        if index == self.fail_after:
            raise ServiceError("timeout", "reply lost")
        return {"created": len(staged), "skipped": skipped}

    def outcome(self, cycle_id: str) -> str:
        out = Outcome()
        for f in self.fractals.values():
            m = f["meta"]
            if m.get("cycle_id") == cycle_id:
                out = out.add((m["timestamp"], f["event_id"]), m.get("event_type"), m.get("psm_state"), m.get("status"))
        return out.status

    def query_fractals(self, body: dict[str, Any]) -> dict[str, Any]:
        self.queries += 1
        out = []
        for fractal in sorted(self.fractals.values(), key=lambda f: (f["meta"]["timestamp"], f["event_id"])):
            meta = fractal["meta"]
            if any(body.get(k) is not None and meta.get(k) != body[k]
                   for k in ("cycle_id", "mission_type", "persona", "status", "event_type")):
                continue
            if body.get("event_types") is not None and meta.get("event_type") not in body["event_types"]:
                continue
            if body.get("cycle_status") is not None and self.outcome(meta.get("cycle_id")) != body["cycle_status"]:
                continue
            if body.get("since") and meta["timestamp"] < body["since"]:
                continue
            if body.get("until") and meta["timestamp"] > body["until"]:
                continue
            out.append({"oid": fractal["event_id"][:8], **fractal})
        if body.get("newest_first"):
            out.reverse()
        return {"fractals": out[:body.get("limit", 100)]}


def make_events(n: int, cycles: int = 4) -> list[AuditEvent]:
    ids = [new_id() for _ in range(cycles)]
    out = []
    for i in range(n):
        cid = ids[i % cycles]
        if i % 3 == 0:
            out.append(AuditEvent.llm_call(cid, "REASONING", persona="BRICK", mission_type="ask",
                                           prompt=f"[user] question {i}\nmore", response=f"answer {i}"))
        else:
            out.append(AuditEvent.transition(cid, "IDLE", "REASONING", persona="ALFRED", i=i))
    return out


def write(path: Path, events: list[AuditEvent], tail: bytes = b"") -> None:
    with open(path, "ab") as f:
        for event in events:
            f.write(event.to_line().encode() + b"\n")
        f.write(tail)


async def test_every_event_becomes_one_fractal(tmp_path):
    path = tmp_path / "m.jsonl"
    events = make_events(50)
    write(path, events)
    memory = FakeMemory()
    report = await ingest_audit_log(path, memory, batch=7)
    assert (report.created, report.skipped, report.malformed, report.batches) == (50, 0, 0, 8)
    assert report.end_offset == path.stat().st_size == memory.offsets[str(path)]
    assert list(memory.fractals) == [e.event_id for e in events]
    first = memory.fractals[events[0].event_id]
    assert first["full_json"] == events[0].to_line()
    assert first["meta"] == {"cycle_id": events[0].cycle_id, "mission_type": "ask", "persona": "BRICK",
                             "status": "SUCCESS", "timestamp": events[0].timestamp.isoformat(timespec="microseconds"),
                             "event_type": "LLM_CALL", "psm_state": "REASONING"}
    again = await ingest_audit_log(path, memory, batch=7)
    assert (again.created, again.lines, again.batches) == (0, 0, 0)


@pytest.mark.parametrize("mode", ["fail_before", "fail_after"])
async def test_resume_after_a_crash_loses_and_repeats_nothing(tmp_path, mode):
    path = tmp_path / "m.jsonl"
    events = make_events(100)
    write(path, events)
    memory = FakeMemory()
    setattr(memory, mode, 3)
    with pytest.raises(ServiceError):
        await ingest_audit_log(path, memory, batch=20)
    committed = 80 if mode == "fail_after" else 60
    assert len(memory.fractals) == committed
    report = await ingest_audit_log(path, memory, batch=20)
    assert report.skipped == 0  # resumed at the committed offset exactly: nothing was sent twice
    assert report.created == 100 - committed
    assert list(memory.fractals) == [e.event_id for e in events]


async def test_crash_by_cancellation_mid_run(tmp_path):
    path = tmp_path / "m.jsonl"
    events = make_events(60)
    write(path, events)
    memory = FakeMemory()
    seen = 0

    async def progress(p: dict[str, Any]) -> None:
        nonlocal seen
        seen += 1
        if seen == 2:
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await ingest_audit_log(path, memory, batch=10, progress=progress)
    report = await ingest_audit_log(path, memory, batch=10)
    assert report.skipped == 0 and report.created == 40
    assert len(memory.fractals) == 60


async def test_malformed_and_truncated_lines_are_counted_and_skipped(tmp_path):
    path = tmp_path / "m.jsonl"
    good = make_events(3)
    bad_status = json.loads(good[0].to_line()) | {"event_id": new_id(), "status": "MAYBE"}
    with open(path, "wb") as f:
        f.write(good[0].to_line().encode() + b"\n")
        f.write(b"not json at all\n")
        f.write(good[1].to_line()[:60].encode() + b"\n")  # torn by a crash, ended by the next writer
        f.write(json.dumps(bad_status).encode() + b"\n")
        f.write(b'{"event_id": "\xff\xfe"}\n')
        f.write(b"\n   \n")
        f.write(good[1].to_line().encode() + b"}\n")  # trailing garbage
        f.write(good[2].to_line().encode() + b"\n")
    memory = FakeMemory()
    report = await ingest_audit_log(path, memory, batch=2)
    assert report.created == 2 and list(memory.fractals) == [good[0].event_id, good[2].event_id]
    assert report.malformed == 5
    assert report.malformed_reasons == {"invalid_json": 2, "truncated": 1, "schema": 1, "encoding": 1}
    assert [s["reason"] for s in report.malformed_samples] == ["invalid_json", "truncated", "schema", "encoding",
                                                               "invalid_json"]
    assert "status" in report.malformed_samples[2]["error"]
    assert report.end_offset == path.stat().st_size


async def test_a_partial_final_line_is_left_for_later(tmp_path):
    path = tmp_path / "m.jsonl"
    events = make_events(5)
    last = make_events(1)[0].to_line().encode()
    write(path, events, tail=last[:50])
    memory = FakeMemory()
    report = await ingest_audit_log(path, memory)
    assert report.created == 5 and report.malformed == 0 and report.pending_bytes == 50
    assert report.end_offset == path.stat().st_size - 50
    with open(path, "ab") as f:  # the writer finishes the line
        f.write(last[50:] + b"\n")
    report = await ingest_audit_log(path, memory)
    assert report.created == 1 and report.pending_bytes == 0 and report.malformed == 0


async def test_rotated_segments_are_followed_across_runs(tmp_path):
    path = tmp_path / "m.jsonl"
    memory = FakeMemory()
    logged: list[str] = []
    async with AuditLog(path, max_bytes=3000) as audit:
        for round_ in range(3):
            for event in make_events(40):
                await audit.log(event)
                logged.append(event.event_id)
            await audit.flush()
            report = await ingest_audit_log(path, memory, batch=16)
            assert report.skipped == 0 and report.malformed == 0 and report.created == 40, round_
    assert len(rotated_segments(path)) > 3
    assert list(memory.fractals) == logged
    assert memory.offsets[str(path)] == log_segments(path)[-1][0] + path.stat().st_size
    # pruning what was ingested changes nothing for the next run
    prune_segments(path, memory.offsets[str(path)])
    report = await ingest_audit_log(path, memory)
    assert (report.lines, report.gap_bytes, report.reset) == (0, 0, None)


async def test_an_offset_outside_or_inside_a_line_is_reset_safely(tmp_path):
    path = tmp_path / "m.jsonl"
    events = make_events(10)
    write(path, events)
    for bogus in (10**9, 7):
        memory = FakeMemory()
        memory.offsets[str(path)] = bogus
        report = await ingest_audit_log(path, memory)
        assert report.reset and report.start_offset == 0
        assert report.created == 10 and memory.offsets[str(path)] == path.stat().st_size


async def test_a_pruned_start_is_reported_as_a_gap(tmp_path):
    path = tmp_path / "m.jsonl"
    async with AuditLog(path, max_bytes=1500) as audit:
        for event in make_events(30):
            await audit.log(event)
    rotated = rotated_segments(path)
    rotated[0][1].unlink()  # removed by hand before ingestion
    report = await ingest_audit_log(path, FakeMemory())
    assert report.gap_bytes == rotated[1][0] and report.start_offset == rotated[1][0]
    assert report.malformed == 0 and report.created > 0


async def test_an_over_long_line_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(audit_ingest, "MAX_LINE_BYTES", 1000)
    monkeypatch.setattr(audit_ingest, "READ_CHUNK", 256)
    path = tmp_path / "m.jsonl"
    events = make_events(4)
    huge = AuditEvent.llm_call(new_id(), "REASONING", persona="BRICK", prompt="x" * 5000, response="y")
    write(path, [events[0], events[1], huge, events[2], events[3]])
    report = await ingest_audit_log(path, FakeMemory(), batch=3)
    assert report.created == 4 and report.malformed_reasons == {"too_long": 1}
    assert report.end_offset == path.stat().st_size


def test_reader_batches_are_bounded_in_lines_and_bytes(tmp_path):
    path = tmp_path / "m.jsonl"
    write(path, make_events(30), tail=b"garbage\n" * 30)
    reader = LogReader(path, 0)
    sizes = []
    while (batch := reader.read_batch(8)).events or batch.malformed:
        sizes.append(len(batch.events) + len(batch.malformed))
    reader.close()
    assert max(sizes) == 8 and sum(sizes) == 60
    reader = LogReader(path, 0)
    first = reader.read_batch(100, max_bytes=1000)
    reader.close()
    assert 1 <= len(first.events) < 30 and first.end_offset - len(first.events[-1][1]) - 1 < 1000


def test_template_summary_is_informative():
    cid = new_id()
    llm = AuditEvent.llm_call(cid, "REASONING", persona="BRICK", mission_type="unhandled_message",
                              prompt="[system] You are BRICK\n[user] write greet(self)",
                              response="def greet(self): ...", status=Status.FAILURE, error="timeout after 30 s")
    text = summary_of(llm)
    for part in ("LLM_CALL", "FAILURE", "BRICK", "REASONING", "unhandled_message", cid[:8], "write greet(self)",
                 "def greet(self)", "timeout after 30 s"):
        assert part in text
    hop = AuditEvent.transition(cid, "IDLE", "DECOMPOSING", persona="ALFRED", note="mission checked")
    assert "IDLE → DECOMPOSING (mission checked)" in summary_of(hop)
    got = AuditEvent.retrieval(cid, "REASONING", persona="BABS", query="persistence", chunk_ids=list("abcdefg"))
    assert "“persistence” → 7 chunk(s) [a, b, c, d, e, …]" in summary_of(got)


def _struct(event: AuditEvent) -> Any:
    return audit_ingest._DECODER.decode(event.to_line())


def summary_of(event: AuditEvent) -> str:
    return template_summary(_struct(event), json.loads(event.to_line())["event_data"])


async def test_llm_summaries_within_budget_then_template(tmp_path):
    path = tmp_path / "m.jsonl"
    write(path, make_events(12))
    calls = 0

    async def slow_summary(ev: Any, data: dict[str, Any]) -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return f"The system recorded a {ev.event_type.lower()} for cycle {ev.cycle_id[:4]}."

    memory = FakeMemory()
    report = await ingest_audit_log(path, memory, summarize=slow_summary, summary_budget_s=0.3)
    assert 1 <= report.llm_summaries <= 6 and report.llm_summaries + report.summary_failures == calls < 12
    assert report.template_summaries == 12 - report.llm_summaries
    summaries = [f["summary"] for f in memory.fractals.values()]
    assert summaries[0].startswith("The system recorded a llm_call") and "[LLM_CALL [SUCCESS] by BRICK" in summaries[0]
    assert summaries[-1].startswith("STATE_TRANSITION [IN_PROGRESS] by ALFRED")


async def test_failing_or_degenerate_summaries_fall_back(tmp_path):
    path = tmp_path / "m.jsonl"
    write(path, make_events(4))
    answers = iter([RuntimeError("llm down"), "server-server-server-server server server server", "", "ok ok"])

    async def flaky(ev: Any, data: dict[str, Any]) -> str:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    report = await ingest_audit_log(path, FakeMemory(), summarize=flaky)
    assert (report.llm_summaries, report.summary_failures, report.template_summaries) == (0, 4, 4)
    assert usable_summary("Cycle 1 answered the question from two chunks.") is not None


async def test_llm_summarizer_calls_generate():
    sent = {}

    async def llm_call(command: str, body: dict[str, Any]) -> dict[str, Any]:
        sent.update(command=command, body=body)
        return {"text": "  BRICK wrote greet and it passed.  "}

    event = AuditEvent.dnu_outcome(new_id(), "VALIDATING", persona="BRICK", receiver_oid="2a", selector="greet",
                                   status=Status.SUCCESS, source="def greet(self): return 1")
    text = await llm_summarizer(llm_call)(_struct(event), json.loads(event.to_line())["event_data"])
    assert text.strip() == "BRICK wrote greet and it passed."
    assert sent["command"] == "generate" and sent["body"]["persona"] == "ALFRED"
    assert "greet on oid 2a" in sent["body"]["messages"][0]["content"]


async def test_progress_reports_bytes_and_events(tmp_path):
    path = tmp_path / "m.jsonl"
    write(path, make_events(30))
    seen: list[dict[str, Any]] = []
    await ingest_audit_log(path, FakeMemory(), batch=10, progress=seen.append)
    assert [p["events"] for p in seen] == [10, 20, 30]
    assert seen[-1]["done"] == seen[-1]["total"] == path.stat().st_size and seen[-1]["eta_s"] == 0


async def test_time_range_in_meta_sorts_as_time(tmp_path):
    path = tmp_path / "m.jsonl"
    base = datetime(2025, 9, 2, 10, tzinfo=UTC)
    cid = new_id()
    events = [AuditEvent.make("LLM_CALL", cycle_id=cid, psm_state="REASONING", persona="BRICK",
                              timestamp=(base + timedelta(seconds=s)).astimezone(tz), llm_prompt="p")
              for s, tz in ((0, UTC), (1, timezone_minus3()), (2, UTC))]
    write(path, events)
    memory = FakeMemory()
    await ingest_audit_log(path, memory)
    stamps = [f["meta"]["timestamp"] for f in memory.fractals.values()]
    assert stamps == sorted(stamps) and all(s.endswith("+00:00") for s in stamps)


def timezone_minus3():
    from datetime import timezone
    return timezone(timedelta(hours=-3))
