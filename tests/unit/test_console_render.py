"""Console rendering: formatting of events and replies, token streaming, throttled progress, tags,
JSON lines, and the sinks (plain stream, above-the-prompt batching)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import msgspec

from proto.bodies import kernel as K
from services.console.completion import Recent
from services.console.formats import (
    Fragments,
    format_event,
    format_hits,
    format_progress,
    format_reply,
    format_tree,
    human_bytes,
    human_seconds,
    location,
    plain,
)
from services.console.render import Handle, JsonView, TextView
from services.console.sinks import PromptSink, StreamSink


class RecordingSink:
    def __init__(self, inline: bool):
        self.inline = inline
        self.chunks: list[str] = []
        self.lives: dict[int, str] = {}
        self.live_history: list[tuple[int, str | None]] = []

    def line(self, frags: Fragments) -> None:
        self.chunks.append(plain(frags) + "\n")

    def text(self, text: str) -> None:
        self.chunks.append(text)

    def live(self, key: int, frags: Fragments | None) -> None:
        self.live_history.append((key, None if frags is None else plain(frags)))
        if frags is None:
            self.lives.pop(key, None)
        else:
            self.lives[key] = plain(frags)

    @property
    def output(self) -> str:
        return "".join(self.chunks)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def lines(frags_list: list[Fragments]) -> list[str]:
    return [plain(f) for f in frags_list]


ANSWER = {
    "answer": "ZODB stores objects.",
    "citations": [{"oid": "1f", "file_path": "/src/batos/image.py", "start_line": 10, "end_line": 42},
                  {"oid": "20", "file_path": "/src/batos/uvm.py", "start_line": 7, "end_line": 7}],
    "cycle_id": "c0ffee00c0ffee00c0ffee00c0ffee00",
}


def test_answer_with_citations():
    out = lines(format_reply("ask", ANSWER, cwd=Path("/src")))
    assert out[0] == "ZODB stores objects."
    assert "citations:" in out
    assert "  [1] batos/image.py:10-42  oid 1f" in out
    assert "  [2] batos/uvm.py:7  oid 20" in out
    assert out[-1].startswith("cycle c0ffee00") and "trace c0ffee00c0ffee00c0ffee00c0ffee00" in out[-1]


def test_streamed_answer_is_not_printed_twice():
    out = lines(format_reply("ask", ANSWER, streamed=True, cwd=Path("/src")))
    assert "ZODB stores objects." not in out
    assert any("image.py:10-42" in ln for ln in out)


def test_search_hits_table():
    hits = [{"oid": "a1", "level": "chunk", "score": 0.91234, "text": "\n  def open(self):\n        ...",
             "metadata": {"file_path": "/r/batos/image.py", "start_line": 3, "end_line": 9, "node_name": "open"}},
            {"oid": "b2", "level": "summary", "score": 0.5, "text": "file summary",
             "metadata": {"file_path": "/r/batos/uvm.py"}}]
    out = lines(format_hits(hits, cwd=Path("/r")))
    assert out[0].split() == ["#", "score", "level", "location", "name", "oid"]
    assert out[1].split() == ["1", "0.912", "chunk", "batos/image.py:3-9", "open", "a1"]
    assert out[2].strip() == "def open(self):"
    assert out[3].split() == ["2", "0.500", "summary", "batos/uvm.py", "b2"]
    assert lines(format_reply("search", {"hits": []})) == ["no hits"]


def test_stats_ingest_inspect_send():
    stats = lines(format_reply("stats", {"counts": {"memory_chunk": 120, "alfred": 1}, "vectors": 120,
                                          "storage_bytes": 3 * 1024 * 1024}))
    assert stats[0] == "objects per prototype:"
    assert stats[1].split() == ["alfred", "1"] and stats[2].split() == ["memory_chunk", "120"]
    assert "vectors: 120" in stats and "storage: 3.0 MiB" in stats
    fresh = lines(format_reply("stats", {"counts": {}, "vectors": {"rows": 4, "live": 3, "shards": 1, "dim": 384}}))
    assert fresh == ["objects per prototype: none yet", "vectors: 3 live of 4 rows in 1 shards, 384 dimensions"]

    ingest = lines(format_reply("ingest", {"files": 3, "chunks": 40, "skipped": 0, "unchanged": 1, "removed": 0,
                                            "errors": [{"file_path": "/x/bad.py", "error": "SyntaxError"}],
                                            "seconds": 2.5}))
    assert ingest[0] == "ingested: 3 files, 40 chunks, 0 skipped, 1 unchanged, 0 removed in 2.5s"
    assert ingest[1] == "  ! /x/bad.py: SyntaxError"

    inspect = lines(format_reply("inspect", {"oid": "1a", "prototype": "memory_chunk", "name": "c",
                                             "slots": {"source_text": "'def f(): pass'"}, "parents": ["3"],
                                             "methods": [{"selector": "describe"}, "area"]}))
    assert inspect[0] == "oid 1a  prototype memory_chunk  name c"
    assert "parents: 3" in inspect and "methods: describe, area" in inspect
    assert any(ln.strip().startswith("source_text") and "def f()" in ln for ln in inspect)

    assert lines(format_reply("send", {"result": [1, 2], "generated": True})) == ["→ [1, 2]", "generated: true"]
    assert lines(format_reply("send", {"result": "hi", "cycle_id": "ab12"})) == [
        "→ hi", "cycle ab12 (see it with: trace ab12)"]


def test_generic_tree_and_empty_reply():
    out = lines(format_tree({"a": 1, "b": {"c": "x" * 120, "d": [1, 2]}, "e": "two\nlines"}))
    assert out[0] == "a: 1" and out[1] == "b:" and out[2].startswith("  c: xxx")
    assert "e:" in out and "  two" in out and "  lines" in out
    assert lines(format_reply("define", {})) == ["ok"]


def test_events():
    assert lines(format_event({"event": "state", "cycle_id": "abcdef0123456789", "state": "REASONING",
                               "from": "IDLE"})) == ["IDLE → REASONING  (cycle abcdef01)"]
    assert lines(format_event({"event": "state", "state": "FAILED", "failed_in": "REASONING",
                               "note": "llm unusable"})) == ["→ FAILED in REASONING — llm unusable"]
    assert lines(format_event({"event": "thought", "step": 1, "text": "look up ZODB"})) == ["thought 1: look up ZODB"]
    assert lines(format_event({"event": "action", "step": 1, "action": "search", "query": "ZODB"})) == [
        'action 1: search("ZODB")']
    obs = lines(format_event({"event": "observation", "step": 2, "text": "x " * 1000}))[0]
    assert obs.startswith("observation 2: x x") and obs.endswith("…") and len(obs) < 450
    assert lines(format_event({"event": "log", "text": "hello"})) == ["hello"]
    assert lines(format_event({"event": "custom", "a": 1})) == ['custom: {"a": 1}']


def test_progress_line():
    text = plain(format_progress({"event": "progress", "stage": "INDEXING", "done": 5, "total": 20, "rate": 2.5,
                                  "eta_s": 6, "chunks": 40}))
    assert text.startswith("INDEXING   [=====>")
    assert "5/20  25%" in text and "2.5/s" in text and "eta 6.0s" in text and "chunks=40" in text
    ingest_style = plain(format_progress({"stage": "CHUNKING", "files_done": 1, "files_total": 4}))
    assert "1/4" in ingest_style
    training = plain(format_progress({"stage": "TRAINING", "done": 3, "total": 3, "loss": 1.23456}))
    assert "[====================]" in training and "loss=1.235" in training


def test_helpers():
    assert human_bytes(512) == "512 B" and human_bytes(2048) == "2.0 KiB"
    assert human_seconds(75) == "1m15s" and human_seconds(3700) == "1h01m"
    assert location({"file_path": "/a/b.py", "start_line": 1, "end_line": 3}, cwd=Path("/a")) == "b.py:1-3"
    assert location({"file_path": "/x/b.py"}, cwd=Path("/a")) == "/x/b.py"


# -- the text view ----------------------------------------------------------------------------------


def test_tokens_stream_inline_then_reply():
    sink = RecordingSink(inline=True)
    view = TextView(sink)
    h = Handle(1, "ask")
    view.event(h, {"event": "state", "state": "REASONING"})
    for tok in ["ZODB ", "stores ", "objects."]:
        view.event(h, {"event": "token", "text": tok})
    assert sink.chunks[-3:] == ["ZODB ", "stores ", "objects."]  # inline, as they came
    typed = {**ANSWER, "citations": ANSWER["citations"][:1], "status": "SUCCESS", "also_retrieved": [], "notes": [],
             "evidence": [], "validation": [], "rewritten": False, "model_text": "", "steps": 1, "thoughts": 0,
             "stop": "", "fallback": None, "persona": "ROBIN", "query_morph": "", "prompt_budget": {}}
    view.reply(h, msgspec.convert(typed, K.AnswerReply))  # the typed reply, as the runner decodes it
    out = sink.output
    assert out.startswith("→ REASONING\nZODB stores objects.\ncitations:\n")
    assert out.count("ZODB stores objects.") == 1


def test_tokens_above_a_prompt_are_printed_by_line_and_shown_live():
    sink = RecordingSink(inline=False)
    view = TextView(sink, tagged=True)
    h = Handle(2, "ask")
    view.event(h, {"event": "token", "text": "first li"})
    assert sink.output == "" and sink.lives == {2: "[2] first li"}
    view.event(h, {"event": "token", "text": "ne\nsecond"})
    assert sink.output == "[2] first line\n" and sink.lives == {2: "[2] second"}
    view.event(h, {"event": "token", "text": " " + "word " * 60})
    assert all(len(ln) < 200 for ln in sink.output.splitlines())  # long partial lines are wrapped out
    view.error(h, "cancelled", "stopped")
    assert sink.lives == {}
    assert sink.output.splitlines()[-1] == "[2] error [cancelled] stopped"
    assert "second word" in sink.output


def test_events_after_tokens_come_after_the_streamed_text():
    sink = RecordingSink(inline=False)
    view = TextView(sink)
    h = Handle(1, "ask")
    view.event(h, {"event": "token", "text": "last words"})
    view.event(h, {"event": "state", "state": "COMPLETE"})
    assert sink.output == "last words\n→ COMPLETE\n" and sink.lives == {}


def test_other_events_end_an_inline_line():
    sink = RecordingSink(inline=True)
    view = TextView(sink)
    h = Handle(1, "ask")
    view.event(h, {"event": "token", "text": "partial"})
    view.event(h, {"event": "log", "text": "note"})
    assert sink.output == "partial\nnote\n"


def test_progress_is_throttled_but_stage_changes_and_completion_show():
    sink = RecordingSink(inline=True)
    clock = Clock()
    view = TextView(sink, clock=clock)
    h = Handle(1, "ingest")
    for i in range(10):  # ten updates within 0.09 s: one line
        clock.now += 0.01
        view.event(h, {"event": "progress", "stage": "CHUNKING", "done": i, "total": 100})
    assert sink.output.count("CHUNKING") == 1
    clock.now += 0.6
    view.event(h, {"event": "progress", "stage": "CHUNKING", "done": 50, "total": 100})
    view.event(h, {"event": "progress", "stage": "CHUNKING", "done": 100, "total": 100})  # final: always shown
    view.event(h, {"event": "progress", "stage": "INDEXING", "done": 1, "total": 100})  # new stage: shown
    out = sink.output.splitlines()
    assert len(out) == 4 and "50/100" in out[1] and "100/100" in out[2] and out[3].startswith("INDEXING")


def test_tagged_lines_and_recent_oids():
    sink = RecordingSink(inline=False)
    recent = Recent()
    view = TextView(sink, tagged=True, recent=recent)
    h = Handle(7, "search")
    view.begin(h)
    view.reply(h, {"hits": [{"oid": "abc", "score": 1.0, "level": "chunk", "text": "t", "metadata": {}}]})
    assert all(ln.startswith("[7] ") for ln in sink.output.splitlines())
    assert list(recent.oids) == ["abc"]


def test_json_view_prints_one_object_per_line():
    out, err = io.StringIO(), io.StringIO()
    view = JsonView(out, err)
    h = Handle(1, "ask", id="r1")
    view.event(h, {"event": "token", "text": "hi"})
    view.reply(h, {"answer": "hi", "blob": b"\x00\x01"})
    view.error(h, "timeout", "too slow", {"after_s": 3})
    view.notice("waiting for the broker")
    objs = [json.loads(ln) for ln in out.getvalue().splitlines()]
    assert objs[0] == {"kind": "event", "command": "ask", "id": "r1", "body": {"event": "token", "text": "hi"}}
    assert objs[1]["kind"] == "reply" and objs[1]["body"]["blob"] == {"$bytes": "AAE="}
    assert objs[2] == {"kind": "error", "command": "ask", "id": "r1", "code": "timeout", "message": "too slow",
                       "details": {"after_s": 3}}
    assert err.getvalue() == "waiting for the broker\n"


def test_stream_sink_without_colour_is_plain():
    buf = io.StringIO()
    sink = StreamSink(buf)  # StringIO is not a terminal: no escape codes
    sink.line([("class:error", "error "), ("", "x")])
    sink.text("tok")
    assert buf.getvalue() == "error x\ntok"


async def test_prompt_sink_batches_lines_of_one_tick(monkeypatch):
    printed: list[str] = []
    monkeypatch.setattr("services.console.sinks.print_formatted_text",
                        lambda ft, style=None: printed.append(plain(list(ft))))
    changes: list[bool] = []
    sink = PromptSink(colour=False)
    sink.on_live_change = lambda: changes.append(sink.has_live)
    sink.line([("class:x", "one")])
    sink.line([("", "two")])
    assert printed == []
    import asyncio

    await asyncio.sleep(0)
    assert printed == ["one\ntwo"]
    sink.live(3, [("", "partial")])
    assert plain(list(sink.toolbar())) == "partial" and changes == [True]
    sink.live(3, None)
    sink.live(3, None)  # clearing twice changes nothing
    assert changes == [True, False]


STATUS = {
    "service": "kernel", "identity": "kernel-h-1-abc", "pid": 42, "version": "0.1.0", "uptime_s": 75.0,
    "served": 3, "inflight": 1, "commands": ["ask", "status"],
    "broker": {"broker": {"version": "1.0", "uptime_s": 80.0, "pending": 1, "queued": {}, "stats": {}},
               "services": {"kernel": [{"identity": "k", "alive": True, "inflight": 1, "capacity": 8, "served": 3}],
                            "memory": [{"identity": "m", "alive": False, "inflight": 0, "capacity": 8,
                                        "served": 0}]}},
    "kernel": {"instance": "i1", "active_cycles": [{"cycle_id": "0123456789abcdef", "state": "REASONING",
                                                    "mission_type": "query", "persona": "ROBIN", "age_s": 2.0}],
               "autotelic": {"running": True}},
}


def test_status():
    out = lines(format_reply("status", STATUS))
    assert out[0] == "kernel kernel-h-1-abc  pid 42  up 1m15s  served 3  in flight 1"
    assert out[1] == "services:"
    assert out[2].split() == ["kernel", "1/1", "alive", "in", "flight", "1/8", "served", "3"]
    assert out[3].split()[:2] == ["memory", "0/1"]
    assert "broker: up 1m20s, 1 pending" in out
    assert "active cycles: 1" in out and "  01234567 REASONING query ROBIN  2.0s" in out
    assert "autotelic: {\"running\": true}" in out
    assert not any(ln.startswith("commands") for ln in out)


def test_trace_and_audit_timelines():
    event = {"event_id": "e1", "cycle_id": "c1", "timestamp": "2025-09-02T10:11:12.345678+00:00",
             "psm_state": "REASONING", "active_persona": "BRICK", "event_type": "STATE_TRANSITION",
             "event_data": {"from": "IDLE", "to": "REASONING", "mission_type": "query"}, "status": "IN_PROGRESS"}
    failed = {**event, "event_type": "CYCLE_END", "status": "FAILURE", "event_data": {"error": "boom"}}
    out = lines(format_reply("trace", {"cycle": {"state": "FAILED"}, "events": [event, failed], "notes": []}))
    assert out[0] == "cycle: {\"state\": \"FAILED\"}" and out[1] == "2 events:"
    assert out[2] == "10:11:12.345 REASONING STATE_TRANSITION BRICK IN_PROGRESS  from=IDLE to=REASONING"
    assert out[3].endswith("FAILURE  error=boom")
    audit = lines(format_reply("audit", {"ingest": {"created": 2}, "recent": [{"timestamp": None,
                                                                               "event_type": "LLM_CALL"}]}))
    assert audit[0] == "ingest: {\"created\": 2}" and audit[1] == "recent events (1):"
    assert audit[2].startswith("- LLM_CALL")


# -- watch: many activities in one stream ----------------------------------------------------------


def test_a_watch_tags_each_line_with_its_activity_and_gathers_tokens_per_activity():
    sink, clock = RecordingSink(inline=False), Clock()
    view = TextView(sink, clock=clock, me="feedbeef", tagged=True)
    h = Handle(1, "watch")
    view.begin(h)
    ask, ing = "a" * 32, "b" * 32
    events = [
        {"event": "watching", "kernel": "kernel@host", "pid": 42, "in_flight": [
            {"id": ing, "command": "ingest", "progress": {"stage": "EMBEDDING", "done": 3, "total": 9}, "age_s": 4}]},
        {"event": "begin", "activity": ask, "command": "ask", "about": "what is a broker?", "by": "0badf00d"},
        {"event": "state", "activity": ask, "command": "ask", "cycle_id": "c" * 36, "state": "REASONING",
         "from": "DECOMPOSING"},
        {"event": "token", "activity": ask, "command": "ask", "cycle_id": "c" * 36, "text": "A broker "},
        {"event": "progress", "activity": ing, "command": "ingest", "stage": "EMBEDDING", "done": 4, "total": 9},
        {"event": "progress", "activity": ing, "command": "ingest", "stage": "EMBEDDING", "done": 5, "total": 9},
        {"event": "token", "activity": ask, "command": "ask", "cycle_id": "c" * 36, "text": "relays.\nSources"},
        {"event": "worker", "change": "gone", "service": "llm", "pid": 7},
        {"event": "missed", "count": 3},
        {"event": "begin", "activity": "d" * 32, "command": "forge", "about": "BRICK", "by": "feedbeef"},
        {"event": "state", "activity": ask, "command": "ask", "cycle_id": "c" * 36, "state": "COMPLETE",
         "note": "SUCCESS"},
        {"event": "end", "activity": ing, "command": "ingest", "ok": True, "files": 9, "chunks": 40, "seconds": 12},
        {"event": "end", "activity": ask, "command": "ask", "ok": False, "code": "timeout", "message": "too slow",
         "seconds": 3},
    ]
    for e in events:
        view.event(h, e)
    out = sink.output.splitlines()
    assert out[0] == "[1] watch …"
    assert out[1] == "[1] watching kernel@host (pid 42): 1 in flight"
    assert out[2] == "[1]   ingest bbbbbbbb  EMBEDDING 3/9, for 4.0s"
    assert "[1] ask aaaaaaaa │ started by console 0badf00d: what is a broker?" in out
    assert "[1] ask aaaaaaaa │ DECOMPOSING → REASONING  (cycle cccccccc)" in out
    assert "[1] ask aaaaaaaa │ A broker relays." in out  # tokens of one activity, one line when it ends
    progress = [line for line in out if "EMBEDDING" in line and "ingest bbbbbbbb │" in line]
    assert len(progress) == 1 and "4/9" in progress[0]  # throttled: the second came too soon
    assert "[1] system │ worker llm pid 7 gone" in out
    assert any("missed 3 events" in line for line in out)
    assert "[1] forge dddddddd │ started by you: BRICK" in out
    # the unfinished streamed text comes out before what the activity does next
    assert out.index("[1] ask aaaaaaaa │ Sources") + 1 == out.index("[1] ask aaaaaaaa │ → COMPLETE — SUCCESS  "
                                                                     "(cycle cccccccc)")
    assert "[1] ingest bbbbbbbb │ done in 12s: files 9, chunks 40" in out
    assert "[1] ask aaaaaaaa │ failed in 3.0s [timeout] too slow" in out


def test_a_watch_of_one_cycle_marks_the_replay_and_ends_with_its_state():
    sink = RecordingSink(inline=True)
    view = TextView(sink)
    h = Handle(2, "watch")
    view.begin(h)
    view.event(h, {"event": "watching", "target": {"id": "c1", "kind": "cycle", "command": "ask",
                                                  "state": "REASONING"}, "replayed": 2})
    view.event(h, {"event": "state", "activity": "a1", "command": "ask", "cycle_id": "c1", "state": "IDLE",
                   "replay": True})
    view.event(h, {"event": "token", "activity": "a1", "command": "ask", "cycle_id": "c1", "text": "half"})
    view.reply(h, {"watched": "c1", "kind": "cycle", "command": "ask", "state": "COMPLETE", "note": "SUCCESS",
                   "missed": 0})
    out = sink.output.splitlines()
    assert out[0] == "watching cycle c1 (ask, now REASONING); 2 events so far, then live"
    assert out[1] == "ask a1 │ (so far) → IDLE  (cycle c1)"
    assert out[2] == "a1 │ half"  # flushed at the end
    assert out[3] == "watch of cycle c1 (ask) ended: COMPLETE — SUCCESS"
    h2 = Handle(3, "watch")
    view.begin(h2)
    view.error(h2, "cancelled", "kernel.watch was cancelled")
    assert sink.output.splitlines()[-1] == "watch stopped"
    view.error(Handle(4, "ask"), "cancelled", "kernel.ask was cancelled")
    assert "error [cancelled]" in sink.output.splitlines()[-1]
