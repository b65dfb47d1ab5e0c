"""ALFRED's ``_kc_ingest_cognitive_audit_log_``: new audit-log lines → ContextFractals, exactly once.

The log is read as a stream, line by line, from the offset memory holds for it; each line is decoded and
validated in one step by msgspec against :data:`batos.audit.AuditEventStruct` (generated from the pydantic
model, so the two never drift). Each valid event gets a summary — from the ``llm`` service within a time
budget when a summarizer is given, otherwise a deterministic template — and becomes a ContextFractal through
memory's ``create_fractals``, a batch at a time. The batch and the offset just past its last line are committed
in ONE memory transaction, so a crash at any point neither loses nor repeats an event: the next run starts where
the last committed batch ended (and ``create_fractals`` is idempotent by event_id besides).

What counts as a line: bytes up to a newline. A final line without newline in the active file is not yet
written (a writer is mid-line, or crashed there) and is left for a later run; in a rotated segment, where no
writer will ever finish it, it is malformed. Malformed lines (bad UTF-8, bad JSON, truncated JSON, schema
violations, over-long lines) are counted by reason, sampled in the report, and skipped. Offsets are logical
(across rotated segments, see :mod:`batos.audit`), and memory is constant: the reader holds one read chunk and
one batch at a time.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Generator, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import msgspec

from batos.audit import AuditEvent, AuditEventStruct, active_base, normalized_timestamp, rotated_segments
from batos.fractals import MemoryRequest
from proto.bodies.memory import AuditOffset, CreateFractals, FractalEvent, FractalMeta, Offset

LlmCall = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]
Summarize = Callable[[Any, dict[str, Any]], Awaitable[str | None]]  # (AuditEventStruct, event_data) -> text
Progress = Callable[[dict[str, Any]], Awaitable[None] | None]

READ_CHUNK = 1024 * 1024  # bytes read at a time: the reader's memory is about this plus one batch
# A longer line is skipped as malformed rather than buffered; memory refuses a fractal's JSON over 4 MiB and
# would refuse its whole batch, again at every retry.
MAX_LINE_BYTES = 4 * 1024 * 1024
BATCH_MAX_BYTES = 16 * 1024 * 1024  # raw lines per create_fractals request: well inside the 64 MiB frame limit
MAX_SAMPLES = 20  # malformed lines described in a report
YIELD_EVERY = 32  # events summarized between two yields to the event loop
EXCERPT_CHARS = 120
SUMMARY_MAX_CHARS = 600

_DECODER = msgspec.json.Decoder(AuditEventStruct)
_PLAIN = msgspec.json.Decoder()  # event_data's extra keys (the Struct validates, and drops, them)


# -- reading: logical offsets across rotated segments --------------------------------------------------------

@dataclass
class Malformed:
    offset: int
    reason: str  # encoding | invalid_json | truncated | schema | too_long
    error: str
    excerpt: str


@dataclass
class Batch:
    events: list[tuple[Any, bytes]]  # (AuditEventStruct, the raw line)
    malformed: list[Malformed]
    end_offset: int  # logical offset just past the last line consumed


class LogReader:
    """Complete lines of a log and its rotated segments, from a logical offset; one thread at a time."""

    def __init__(self, path: Path, offset: int):
        self.path = Path(path)
        self.reset: str | None = None  # why the stored offset was not usable, if it was not
        self.gap_bytes = 0  # bytes in segments pruned before they were read
        self.pending_bytes = 0  # an unfinished final line left for later
        self._segments, self._active = _snapshot(self.path)
        self.end_at_open = self._segments[-1][0] + (os.fstat(self._active.fileno()).st_size if self._active else 0)
        self.start_offset = self._check_offset(offset)
        self.offset = self.start_offset
        self._lines = self._iter_lines()

    def _check_offset(self, offset: int) -> int:
        if offset < 0 or offset > self.end_at_open:
            self.reset = f"stored offset {offset} lies outside the log (0..{self.end_at_open}): re-reading from 0"
            return 0
        first = self._segments[0][0]
        if offset < first:
            self.gap_bytes = first - offset
            return first
        if offset > 0 and self._byte_at(offset - 1) != b"\n":
            self.reset = f"stored offset {offset} is not at a line boundary: re-reading from 0"
            return 0
        return offset

    def _byte_at(self, offset: int) -> bytes:
        for start, _active, f in self._open_from(offset):
            try:
                f.seek(offset - start)
                return f.read(1)
            finally:
                if f is not self._active:
                    f.close()
        return b""

    def _open_from(self, offset: int) -> Iterator[tuple[int, bool, IO[bytes]]]:
        """(start, is_active, file) of each segment that holds bytes at or after ``offset``."""
        for i, (start, path) in enumerate(self._segments):
            active = i == len(self._segments) - 1
            end = self._segments[i + 1][0] if not active else self.end_at_open
            if end <= offset and not active:
                continue
            if active:
                if self._active is not None:
                    yield start, True, self._active
            else:
                yield start, False, open(path, "rb")  # closed by the caller

    def _iter_lines(self) -> Generator[tuple[bytes | None, int, int]]:
        """(line without newline or None when too long, logical start, logical end) for each complete line."""
        for start, active, f in self._open_from(self.offset):
            try:
                yield from self._segment_lines(f, start, max(0, self.offset - start), final=not active)
            finally:
                if not active:
                    f.close()
            if self.pending_bytes:
                return

    def _segment_lines(self, f: IO[bytes], base: int, local: int,
                       final: bool) -> Iterator[tuple[bytes | None, int, int]]:
        f.seek(local)
        pos = base + local  # logical offset of the first byte not yet handed out
        rem = b""
        skip_from: int | None = None  # start of an over-long line being skipped
        while chunk := f.read(READ_CHUNK):
            if skip_from is not None:
                cut = chunk.find(b"\n")
                if cut < 0:
                    pos += len(chunk)
                    continue
                pos += cut + 1
                yield None, skip_from, pos
                skip_from, chunk = None, chunk[cut + 1:]
            parts = (rem + chunk if rem else chunk).split(b"\n")
            rem = parts.pop()
            for part in parts:
                end = pos + len(part) + 1
                yield part, pos, end
                pos = end
            if len(rem) > MAX_LINE_BYTES:
                skip_from, pos, rem = pos, pos + len(rem), b""
        if skip_from is not None:
            if final:
                yield None, skip_from, pos
            else:
                self.pending_bytes = pos - skip_from
        elif rem:
            if final:  # a rotated segment is closed: nobody will finish this line
                yield rem, pos, pos + len(rem)
            else:
                self.pending_bytes = len(rem)

    def read_batch(self, max_events: int, max_bytes: int = BATCH_MAX_BYTES) -> Batch:
        """Up to ``max_events`` lines (valid events and malformed lines together; blank lines are skipped),
        stopping early once the batch's lines reach ``max_bytes``."""
        events: list[tuple[Any, bytes]] = []
        malformed: list[Malformed] = []
        first = self.offset
        for raw, start, end in self._lines:
            self.offset = end
            if raw is None:
                malformed.append(Malformed(start, "too_long", f"line of {end - start} bytes", ""))
            elif not raw or raw.isspace():
                continue  # blank lines carry nothing; JSONL readers skip them
            else:
                try:
                    events.append((_DECODER.decode(raw), raw))
                except (msgspec.DecodeError, UnicodeDecodeError) as e:
                    malformed.append(_malformed(start, raw, e))
            if len(events) + len(malformed) >= max_events or end - first >= max_bytes:
                break
        return Batch(events, malformed, self.offset)

    def close(self) -> None:
        self._lines.close()
        if self._active is not None:
            self._active.close()
            self._active = None


def _snapshot(path: Path) -> tuple[list[tuple[int, Path]], IO[bytes] | None]:
    """The rotated segments and the open active file, consistent with each other despite a concurrent rotation."""
    for _ in range(10):
        rotated = rotated_segments(path)
        try:
            active: IO[bytes] | None = open(path, "rb")  # owned by the LogReader
        except FileNotFoundError:
            active = None
        same_active = active is None or _same_file(active, path)
        if same_active and rotated_segments(path) == rotated:
            return [*rotated, (active_base(rotated), path)], active
        if active is not None:
            active.close()
    raise RuntimeError(f"audit log {path} kept rotating while being opened")


def _same_file(f: IO[bytes], path: Path) -> bool:
    try:
        return os.fstat(f.fileno()).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _malformed(offset: int, raw: bytes, error: Exception) -> Malformed:
    if isinstance(error, UnicodeDecodeError):
        reason = "encoding"
    elif isinstance(error, msgspec.ValidationError):
        reason = "schema"
    elif "truncated" in str(error):
        reason = "truncated"
    else:
        reason = "invalid_json"
    return Malformed(offset, reason, str(error), raw[:EXCERPT_CHARS].decode("utf-8", "replace"))


# -- summaries -------------------------------------------------------------------------------------------------

def excerpt(value: Any, limit: int = EXCERPT_CHARS, *, tail: bool = False) -> str:
    """At most ``limit`` characters of ``value`` (its head, or its tail), whitespace collapsed."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    cut = len(text) > 4 * limit  # collapse only a window: prompts run to many KB
    flat = " ".join((text[-4 * limit:] if tail else text[:4 * limit]).split() if cut else text.split())
    if not cut and len(flat) <= limit:
        return flat
    return "…" + flat[-(limit - 1):] if tail else flat[:limit - 1] + "…"


def template_summary(ev: Any, data: dict[str, Any]) -> str:
    """A deterministic one-paragraph summary: what happened, where, by whom, how it ended, and an excerpt."""
    head = f"{ev.event_type} [{ev.status}] by {ev.active_persona} in {ev.psm_state}"
    if ev.mission_type:
        head += f", mission {ev.mission_type}"
    head += f", cycle {ev.cycle_id[:8]}"
    detail = _DETAILS.get(ev.event_type, _detail_generic)(data)
    if data.get("error"):
        detail = f"{detail}; error: {excerpt(data['error'])}" if detail else f"error: {excerpt(data['error'])}"
    return f"{head}: {detail}" if detail else head


def _detail_transition(d: dict[str, Any]) -> str:
    text = f"{d.get('from') or 'start'} → {d.get('to') or '?'}"
    return f"{text} ({excerpt(d['note'], 80)})" if d.get("note") else text


def _detail_llm(d: dict[str, Any]) -> str:
    # A prompt's tail holds the actual request (its head is the persona's system prompt).
    parts = []
    if d.get("llm_prompt"):
        parts.append(f"prompt “{excerpt(d['llm_prompt'], 100, tail=True)}”")
    if d.get("llm_response_raw") is not None:
        parts.append(f"response “{excerpt(d['llm_response_raw'], 100)}”")
    return " → ".join(parts)


def _detail_retrieval(d: dict[str, Any]) -> str:
    ids = d.get("retrieved_chunk_ids") or []
    shown = ", ".join(map(str, ids[:5])) + (", …" if len(ids) > 5 else "")
    query = f"query “{excerpt(d['query'], 80)}” → " if d.get("query") else ""
    return f"{query}{len(ids)} chunk(s) [{shown}]"


def _detail_dnu(d: dict[str, Any]) -> str:
    text = f"{d.get('selector', '?')} on oid {d.get('receiver_oid', '?')}"
    if d.get("source"):
        text += f": “{excerpt(d['source'], 100)}”"
    return text


def _detail_budget(d: dict[str, Any]) -> str:
    return (f"{d.get('used_tokens', '?')}/{d.get('budget_tokens', '?')} tokens, "
            f"{len(d.get('summary_ids') or [])} summaries, {len(d.get('retrieved_chunk_ids') or [])} chunks")


def _detail_generic(d: dict[str, Any]) -> str:
    shown = {k: v for k, v in d.items() if v is not None and k != "error"}
    return excerpt(shown) if shown else ""


_DETAILS: dict[str, Callable[[dict[str, Any]], str]] = {
    "STATE_TRANSITION": _detail_transition,
    "LLM_CALL": _detail_llm,
    "RETRIEVAL_ACTION": _detail_retrieval,
    "DNU_OUTCOME": _detail_dnu,
    "PROMPT_BUDGET": _detail_budget,
    "CYCLE_START": lambda d: f"input “{excerpt(d.get('input', ''))}”",
    "CYCLE_END": lambda d: f"output “{excerpt(d.get('output', ''))}”",
}

SUMMARY_PROMPT = (
    "Summarize this event from an AI system's own audit log in one plain sentence of at most 30 words, "
    "saying what was attempted and how it ended.\n\nEvent: {head}\nDetails: {details}"
)


def llm_summarizer(llm_call: LlmCall, *, persona: str = "ALFRED", max_tokens: int = 60) -> Summarize:
    """A ``summarize`` callable backed by the llm service's ``generate`` (``llm_call(command, body)``)."""

    async def summarize(ev: Any, data: dict[str, Any]) -> str | None:
        prompt = SUMMARY_PROMPT.format(head=template_summary(ev, data), details=excerpt(data, 600))
        reply = await llm_call("generate", {"persona": persona, "messages": [{"role": "user", "content": prompt}],
                                            "max_tokens": max_tokens, "temperature": 0.0})
        return str(reply.get("text") or "")

    return summarize


def usable_summary(text: str | None) -> str | None:
    """The model's text, or None when it is empty or degenerate (a small model loops: "server-server-…")."""
    words = re.findall(r"\w+", (text or "").lower())
    if len(words) < 3 or len(set(words)) < 0.4 * len(words):
        return None
    return " ".join((text or "").split())[:SUMMARY_MAX_CHARS]


@dataclass
class _Summarizer:
    summarize: Summarize | None
    budget_s: float
    timeout_s: float
    llm: int = 0
    template: int = 0
    failures: int = 0

    async def __call__(self, ev: Any, data: dict[str, Any]) -> str:
        template = template_summary(ev, data)
        if self.summarize is not None and self.budget_s > 0:
            started = time.monotonic()
            try:
                text = usable_summary(await asyncio.wait_for(self.summarize(ev, data),
                                                             min(self.timeout_s, self.budget_s)))
            except Exception:  # the llm is optional here: any failure falls back to the template
                text = None
            self.budget_s -= time.monotonic() - started
            if text:
                self.llm += 1
                return f"{text} [{template[:SUMMARY_MAX_CHARS]}]"
            self.failures += 1
        self.template += 1
        return template


# -- ingestion -------------------------------------------------------------------------------------------------

@dataclass
class IngestReport:
    path: str
    start_offset: int = 0
    end_offset: int = 0  # committed: the next run starts here
    log_end: int = 0  # the log's logical end when the run began
    lines: int = 0  # valid events read (created + skipped)
    created: int = 0
    skipped: int = 0  # already present (by event_id)
    malformed: int = 0
    malformed_reasons: dict[str, int] = field(default_factory=dict)
    malformed_samples: list[dict[str, Any]] = field(default_factory=list)
    pending_bytes: int = 0  # an unfinished final line, left for a later run
    gap_bytes: int = 0  # pruned before being read
    reset: str | None = None
    batches: int = 0
    llm_summaries: int = 0
    template_summaries: int = 0
    summary_failures: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fractal_of(ev: Any, raw: bytes, summary: str) -> FractalEvent:
    """The ``create_fractals`` item for one event: its summary, its exact JSON line, and the query keys."""
    return FractalEvent(
        event_id=ev.event_id, summary=summary, full_json=raw.decode("utf-8"),
        meta=FractalMeta(cycle_id=ev.cycle_id, mission_type=ev.mission_type, persona=ev.active_persona,
                         status=ev.status, timestamp=normalized_timestamp(datetime.fromisoformat(ev.timestamp)),
                         event_type=ev.event_type, psm_state=ev.psm_state))


async def ingest_audit_log(path: str | os.PathLike[str], memory: MemoryRequest, summarize: Summarize | None = None,
                           batch: int = 200, progress: Progress | None = None, *, key: str | None = None,
                           summary_budget_s: float = 60.0, summary_timeout_s: float = 20.0) -> IngestReport:
    """Ingest every complete line after memory's stored offset; returns what happened.

    ``memory(body)`` reaches the memory service with its typed bodies (``audit_offset``, ``create_fractals``).
    ``summarize(event, event_data)`` (optional, e.g. :func:`llm_summarizer`) is tried within ``summary_budget_s``
    of total time for this run; events past the budget, and any failure, get the template summary.
    ``progress(dict)`` gets ``{stage, done, total, events, malformed, rate, eta_s}`` after each batch.
    ``key`` names the offset in memory (default: the path as given).
    """
    if batch < 1:
        raise ValueError("batch must be at least 1")
    path = Path(path)
    key = key or str(path)
    started = time.monotonic()
    stored = (await memory(AuditOffset(path=key))).value
    reader = await asyncio.to_thread(LogReader, path, stored)
    report = IngestReport(path=key, start_offset=reader.start_offset, end_offset=stored,
                          log_end=reader.end_at_open, reset=reader.reset, gap_bytes=reader.gap_bytes)
    summarizer = _Summarizer(summarize, summary_budget_s, summary_timeout_s)
    reasons: Counter[str] = Counter()
    position = reader.start_offset
    try:
        while True:
            got = await asyncio.to_thread(reader.read_batch, batch)
            if got.end_offset == position and not (reader.reset and report.batches == 0):
                break  # nothing new (a reset offset is committed even then, so it is not reset again)
            position = got.end_offset
            fractals = []
            for i, (ev, raw) in enumerate(got.events, 1):
                fractals.append(fractal_of(ev, raw, await summarizer(ev, _event_data(raw))))
                if i % YIELD_EVERY == 0:
                    await asyncio.sleep(0)  # ~10 µs an event: keep each loop step well under a millisecond
            reply = await memory(CreateFractals(events=fractals, offset=Offset(path=key, value=got.end_offset)))
            report.end_offset = got.end_offset
            report.batches += 1
            report.lines += len(fractals)
            report.created += reply.created
            report.skipped += reply.skipped
            _count_malformed(report, reasons, got.malformed)
            await _notify(progress, report, started)
            if position >= reader.end_at_open:
                break  # lines a live writer adds meanwhile wait for the next run: every run ends
    finally:
        await asyncio.to_thread(reader.close)
    report.pending_bytes = reader.pending_bytes
    report.llm_summaries, report.template_summaries = summarizer.llm, summarizer.template
    report.summary_failures = summarizer.failures
    report.seconds = round(time.monotonic() - started, 4)
    return report


def cycle_events_after(path: str | os.PathLike[str], offset: int, cycle_id: str) -> list[AuditEvent]:
    """One cycle's valid events in the log from ``offset`` on (complete lines; blocking: run it in a thread).
    ``trace`` reads the part of the log memory has not ingested yet this way, instead of ingesting it first."""
    reader = LogReader(Path(path), offset)
    out: list[AuditEvent] = []
    position = reader.start_offset
    try:
        while position < reader.end_at_open:  # lines written meanwhile belong to a later trace
            got = reader.read_batch(1000)
            out += [AuditEvent.model_validate_json(raw) for ev, raw in got.events if ev.cycle_id == cycle_id]
            if got.end_offset == position:
                break
            position = got.end_offset
        return out
    finally:
        reader.close()


def _event_data(raw: bytes) -> dict[str, Any]:
    data = _PLAIN.decode(raw).get("event_data")
    return data if isinstance(data, dict) else {}


def _count_malformed(report: IngestReport, reasons: Counter[str], found: list[Malformed]) -> None:
    report.malformed += len(found)
    reasons.update(m.reason for m in found)
    report.malformed_reasons = dict(reasons)
    room = MAX_SAMPLES - len(report.malformed_samples)
    report.malformed_samples.extend(asdict(m) for m in found[:max(0, room)])


async def _notify(progress: Progress | None, report: IngestReport, started: float) -> None:
    if progress is None:
        return
    elapsed = max(time.monotonic() - started, 1e-9)
    done = report.end_offset - report.start_offset
    total = max(report.log_end - report.start_offset, done)
    rate = done / elapsed
    result = progress({"stage": "AUDIT_INGEST", "done": done, "total": total, "events": report.lines,
                       "malformed": report.malformed, "rate": round(report.lines / elapsed, 1),
                       "eta_s": round((total - done) / rate, 1) if rate > 0 else None})
    if inspect.isawaitable(result):
        await result
