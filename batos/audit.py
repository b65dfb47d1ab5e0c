"""The Metacognitive Audit Trail (blueprint §4, Table 3): the event schema and its non-blocking writer.

:class:`AuditEvent` is the single source of truth for the log format. Every other view of it is derived:
:data:`AuditEventStruct` (the msgspec Struct the ingestor validates with) is generated from the model's JSON
schema at import, so the two cannot drift.

Extensions to Table 3, all optional:
  * ``mission_type`` (top level): the cycle's mission, so history can be queried by mission (the curation
    query of §5.1). Given inside ``event_data`` it is lifted to the top level.
  * status ``SUCCESS_DEGRADED``: a cycle that produced a usable but degraded answer (the kernel's PSM
    reports it); golden paths ask for ``SUCCESS`` only, so degraded cycles never become training data.
  * ``event_data`` accepts any extra keys beside Table 3's three optional ones.

The file (``var/metacognition.jsonl``) holds one JSON object per line and nothing else. :class:`AuditLog`
writes it through aiologger (a Logger, an AsyncFileHandler subclass, a JsonFormatter subclass): ``log`` only
validates, renders the line and enqueues it; one writer task hands whatever has queued up to a dedicated writer
thread (aiofiles with its own executor) as one record, written with one ``write(2)`` on an O_APPEND
descriptor. The event loop never waits on the disk, and lines keep their order. Design notes:
  * one writer per file, enforced with an advisory lock (``<log>.lock``); a second writer gets an error.
  * rotation is by size, between whole lines: the active file is renamed to ``<log>.<start>`` where
    ``<start>`` (20 digits) is the *logical* offset of its first byte in the whole history. Offsets the
    ingestor persists are logical too, so they survive rotation; :func:`log_segments` lists the files.
  * a crash mid-write leaves a final line without newline. Readers treat it as not yet written; a writer
    opening the file again first ends it with a newline, so it becomes one malformed line (counted, skipped)
    and never swallows the next event.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import fcntl
import itertools
import logging
import os
import re
import types
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import aiofiles
import msgspec
from aiologger import Logger
from aiologger.formatters.json import JsonFormatter
from aiologger.handlers.files import BaseAsyncRotatingFileHandler
from aiologger.levels import LogLevel
from aiologger.records import LogRecord
from pydantic import AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field, model_serializer, model_validator

_log = logging.getLogger("batos.audit")

# -- the schema (Table 3) ---------------------------------------------------------------------------------

# Both validators run these with Python's `re` (pydantic is told to: regex_engine="python-re"; msgspec always
# does), so they mean the same thing to both; `\Z` because `$` would also match before a final newline.
UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z"
NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*\Z"  # PSM states and persona names: identifiers (REASONING, BRICK)
EVENT_TYPE_PATTERN = r"^[A-Z][A-Z0-9_]*\Z"
# RFC 3339 with a mandatory UTC offset: the one timestamp grammar both validators accept identically.
TIMESTAMP_PATTERN = (r"^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]"
                     r"(\.[0-9]{1,6})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])\Z")
_TIMESTAMP_RE = re.compile(TIMESTAMP_PATTERN)


def _timestamp_input(value: Any) -> Any:
    # Refuses what pydantic's lax datetime parsing would take but Table 3 does not mean: unix numbers,
    # dates without time, naive or oddly spelled times.
    if isinstance(value, datetime) or (isinstance(value, str) and _TIMESTAMP_RE.match(value)):
        return value
    raise ValueError("timestamp must be RFC 3339 with a UTC offset, e.g. 2025-09-02T10:00:00.123456Z")


UuidStr = Annotated[str, Field(pattern=UUID_PATTERN)]
Name = Annotated[str, Field(pattern=NAME_PATTERN, max_length=64)]
Timestamp = Annotated[AwareDatetime, BeforeValidator(_timestamp_input),
                      Field(json_schema_extra={"pattern": TIMESTAMP_PATTERN})]


class EventType(enum.StrEnum):
    """The event types the system writes; the field accepts any UPPER_SNAKE name, so new ones need no migration."""

    STATE_TRANSITION = "STATE_TRANSITION"
    LLM_CALL = "LLM_CALL"
    RETRIEVAL_ACTION = "RETRIEVAL_ACTION"
    DNU_OUTCOME = "DNU_OUTCOME"  # the outcome of a _doesNotUnderstand_ (method generated, validated, refused)
    PROMPT_BUDGET = "PROMPT_BUDGET"  # the Token Governor's assembly of the final prompt
    CYCLE_START = "CYCLE_START"  # event_data.input: what prompted the cycle (mission brief, question)
    CYCLE_END = "CYCLE_END"  # event_data.output: the cycle's validated output (answer, generated code)


class Status(enum.StrEnum):
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    IN_PROGRESS = "IN_PROGRESS"
    SUCCESS_DEGRADED = "SUCCESS_DEGRADED"  # extension: see the module docstring


class EventData(BaseModel):
    """Table 3's ``event_data``: three optional keys, any others allowed."""

    model_config = ConfigDict(extra="allow", regex_engine="python-re")

    llm_prompt: str | None = None
    llm_response_raw: str | None = None
    retrieved_chunk_ids: list[str] | None = None

    @model_serializer(mode="wrap")
    def _drop_absent(self, handler: Any) -> dict[str, Any]:
        # Table 3's optional keys are left out when absent; extra keys are written as given (None included).
        out: dict[str, Any] = handler(self)
        for key in ("llm_prompt", "llm_response_raw", "retrieved_chunk_ids"):
            if out.get(key) is None:
                out.pop(key, None)
        return out


def new_id() -> str:
    return str(uuid.uuid4())


def utcnow() -> datetime:
    return datetime.now(UTC)


class AuditEvent(BaseModel):
    """One line of ``metacognition.jsonl`` (Table 3, plus the optional ``mission_type``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, regex_engine="python-re")

    event_id: UuidStr
    cycle_id: UuidStr
    timestamp: Timestamp
    psm_state: Name
    active_persona: Name
    event_type: Annotated[str, Field(pattern=EVENT_TYPE_PATTERN, max_length=64)]
    event_data: EventData
    status: Status
    mission_type: Annotated[str, Field(min_length=1, max_length=128)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _lift_mission_type(cls, value: Any) -> Any:
        if isinstance(value, dict) and value.get("mission_type") is None:
            data = value.get("event_data")
            if isinstance(data, dict) and isinstance(data.get("mission_type"), str) and data["mission_type"]:
                data = dict(data)
                value = {**value, "mission_type": data.pop("mission_type"), "event_data": data}
        return value

    def to_line(self) -> str:
        """The event as one JSONL line (without the newline): compact JSON, newlines inside strings escaped."""
        return self.model_dump_json()

    # -- convenience constructors: the kernel and services call these rather than filling dicts ----------
    @classmethod
    def make(cls, event_type: str, *, cycle_id: str, psm_state: str, persona: str,
             status: Status | str = Status.SUCCESS, mission_type: str | None = None,
             timestamp: datetime | None = None, **data: Any) -> AuditEvent:
        return cls(event_id=new_id(), cycle_id=cycle_id, timestamp=timestamp or utcnow(), psm_state=psm_state,
                   active_persona=persona, event_type=str(event_type), event_data=EventData(**data),
                   status=Status(status), mission_type=mission_type)

    @classmethod
    def transition(cls, cycle_id: str, from_state: str | None, to_state: str, *, persona: str,
                   status: Status | str = Status.IN_PROGRESS, mission_type: str | None = None,
                   **data: Any) -> AuditEvent:
        """A PSM transition, logged in the state entered; ``from``/``to`` as the kernel writes them."""
        states: dict[str, Any] = {"from": from_state, "to": to_state}  # `from` is a keyword: passed by dict
        return cls.make(EventType.STATE_TRANSITION, cycle_id=cycle_id, psm_state=to_state, persona=persona,
                        status=status, mission_type=mission_type, **states, **data)

    @classmethod
    def llm_call(cls, cycle_id: str, psm_state: str, *, persona: str, prompt: str | Sequence[dict[str, Any]],
                 response: str | None, status: Status | str = Status.SUCCESS, mission_type: str | None = None,
                 **data: Any) -> AuditEvent:
        """An LLM call with its full prompt (chat messages are rendered ``[role] content`` per line)."""
        text = prompt if isinstance(prompt, str) else render_messages(prompt)
        return cls.make(EventType.LLM_CALL, cycle_id=cycle_id, psm_state=psm_state, persona=persona,
                        status=status, mission_type=mission_type, llm_prompt=text, llm_response_raw=response,
                        **data)

    @classmethod
    def retrieval(cls, cycle_id: str, psm_state: str, *, persona: str, query: str, chunk_ids: Sequence[str],
                  status: Status | str = Status.SUCCESS, mission_type: str | None = None,
                  **data: Any) -> AuditEvent:
        return cls.make(EventType.RETRIEVAL_ACTION, cycle_id=cycle_id, psm_state=psm_state, persona=persona,
                        status=status, mission_type=mission_type, query=query,
                        retrieved_chunk_ids=[str(c) for c in chunk_ids], **data)

    @classmethod
    def dnu_outcome(cls, cycle_id: str, psm_state: str, *, persona: str, receiver_oid: str, selector: str,
                    status: Status | str, source: str | None = None, error: str | None = None,
                    mission_type: str | None = None, **data: Any) -> AuditEvent:
        """The outcome of a ``_doesNotUnderstand_``: the generated method's source, or why it was refused."""
        return cls.make(EventType.DNU_OUTCOME, cycle_id=cycle_id, psm_state=psm_state, persona=persona,
                        status=status, mission_type=mission_type, receiver_oid=receiver_oid, selector=selector,
                        source=source, error=error, **data)

    @classmethod
    def prompt_budget(cls, cycle_id: str, psm_state: str, *, persona: str, budget_tokens: int, used_tokens: int,
                      summary_ids: Sequence[str] = (), chunk_ids: Sequence[str] = (),
                      mission_type: str | None = None, **data: Any) -> AuditEvent:
        return cls.make(EventType.PROMPT_BUDGET, cycle_id=cycle_id, psm_state=psm_state, persona=persona,
                        status=Status.SUCCESS, mission_type=mission_type, budget_tokens=budget_tokens,
                        used_tokens=used_tokens, summary_ids=list(summary_ids),
                        retrieved_chunk_ids=[str(c) for c in chunk_ids], **data)

    @classmethod
    def cycle_start(cls, cycle_id: str, *, persona: str, mission_type: str, input: Any,
                    psm_state: str = "IDLE", **data: Any) -> AuditEvent:
        return cls.make(EventType.CYCLE_START, cycle_id=cycle_id, psm_state=psm_state, persona=persona,
                        status=Status.IN_PROGRESS, mission_type=mission_type, input=input, **data)

    @classmethod
    def cycle_end(cls, cycle_id: str, *, persona: str, status: Status | str, output: Any,
                  mission_type: str | None = None, psm_state: str = "COMPLETE", **data: Any) -> AuditEvent:
        return cls.make(EventType.CYCLE_END, cycle_id=cycle_id, psm_state=psm_state, persona=persona,
                        status=status, mission_type=mission_type, output=output, **data)


def render_messages(messages: Sequence[dict[str, Any]]) -> str:
    return "\n".join(f"[{m.get('role', '?')}] {m.get('content', '')}" for m in messages)


def normalized_timestamp(value: datetime) -> str:
    """UTC, fixed width (``2025-09-02T10:00:00.000000+00:00``): ISO strings that also sort as time."""
    return value.astimezone(UTC).isoformat(timespec="microseconds")


# -- the msgspec Struct, generated from the model -------------------------------------------------------------

class SchemaTranslationError(TypeError):
    """The pydantic model uses a JSON-schema construct the generator does not translate: extend it."""


def struct_from_model(model: type[BaseModel], name: str | None = None) -> type[msgspec.Struct]:
    """A msgspec Struct that accepts exactly the JSON documents ``model`` validates (its JSON schema, translated).

    Translated: strings (pattern, min/max length; ``date-time`` stays a string checked by its pattern and a
    calendar check, so the Struct's ``timestamp`` is the ISO string as written), integers, numbers,
    booleans, null, arrays, enums (→ Literal), ``anyOf`` (→ Union), nested models via ``$ref`` (→ nested
    Structs) and ``additionalProperties: false`` (→ ``forbid_unknown_fields``). Anything else raises.
    """
    schema = model.model_json_schema()
    defs = schema.get("$defs", {})
    built: dict[str, Any] = {}

    def resolve(ref: str) -> Any:
        key = ref.rsplit("/", 1)[-1]
        if key not in built:
            built[key] = translate_object(defs[key], f"{key}Struct") if defs[key].get("type") == "object" \
                else translate(defs[key])
        return built[key]

    def translate(node: dict[str, Any]) -> Any:
        if "$ref" in node:
            return resolve(node["$ref"])
        if "anyOf" in node:
            return Union[tuple(translate(n) for n in node["anyOf"])]  # noqa: UP007 (a runtime-built union)
        if "enum" in node:
            return Literal[tuple(node["enum"])]
        kind = node.get("type")
        if kind == "string" and set(node) <= _STRING_KEYS:
            if "format" in node and (node["format"] != "date-time" or "pattern" not in node):
                raise SchemaTranslationError(f"string format {node['format']!r} (without a pattern) is not translated")
            meta = {k: node[m] for k, m in (("pattern", "pattern"), ("min_length", "minLength"),
                                            ("max_length", "maxLength")) if m in node}
            return Annotated[str, msgspec.Meta(**meta)] if meta else str
        simple = {"integer": int, "number": float, "boolean": bool, "null": type(None)}
        if kind in simple and set(node) <= _PLAIN_KEYS:
            return simple[kind]
        if kind == "array" and set(node) <= _PLAIN_KEYS | {"items"}:
            # a type built at run time from the schema: list[T], spelled as the alias it is
            return types.GenericAlias(list, (translate(node["items"]),)) if "items" in node else list
        raise SchemaTranslationError(f"schema node {node!r} is not translated")

    def translate_object(node: dict[str, Any], struct_name: str) -> type[msgspec.Struct]:
        if node.get("additionalProperties", True) not in (True, False):  # typed extras: not translated
            raise SchemaTranslationError(f"{struct_name}: additionalProperties {node['additionalProperties']!r}")
        required = set(node.get("required", ()))
        fields: list[Any] = []
        datetimes = []
        for field_name, sub in node.get("properties", {}).items():
            annotation = translate(sub)
            if any(n.get("format") == "date-time" for n in (sub, *sub.get("anyOf", ()))):
                datetimes.append(field_name)
            if field_name in required:
                fields.append((field_name, annotation))
            elif "default" in sub:
                fields.append((field_name, annotation, sub["default"]))
            else:
                raise SchemaTranslationError(f"{struct_name}.{field_name}: optional without a plain default")
        # msgspec wants required fields before defaulted ones; field order does not matter to JSON.
        fields.sort(key=lambda f: len(f) == 3)
        namespace = {"__post_init__": _calendar_check(datetimes)} if datetimes else None
        return msgspec.defstruct(struct_name, fields, forbid_unknown_fields=node.get("additionalProperties") is False,
                                 frozen=True, namespace=namespace)

    return translate_object(schema, name or f"{model.__name__}Struct")


_PLAIN_KEYS = frozenset({"type", "title", "default", "description"})
_STRING_KEYS = _PLAIN_KEYS | {"pattern", "minLength", "maxLength", "format"}


def _calendar_check(names: list[str]) -> Any:
    """A Struct ``__post_init__`` refusing date-time strings that match the pattern but name no real instant
    (Feb 30): msgspec turns the ValueError into a ValidationError, as pydantic refuses them too."""

    def __post_init__(self: Any) -> None:
        for name in names:
            value = getattr(self, name)
            if value is not None:
                datetime.fromisoformat(value)

    return __post_init__


AuditEventStruct = struct_from_model(AuditEvent, "AuditEventStruct")


# -- log files: the active file and its rotated segments --------------------------------------------------------

SEGMENT_DIGITS = 20
DEFAULT_MAX_BYTES = 64 * 1024 * 1024  # rotate the active file past this; 0 disables rotation


def segment_path(path: Path, start: int) -> Path:
    return path.with_name(f"{path.name}.{start:0{SEGMENT_DIGITS}d}")


def rotated_segments(path: Path) -> list[tuple[int, Path]]:
    """``(logical start offset, path)`` of every rotated segment of ``path``, oldest first."""
    pattern = re.compile(re.escape(path.name) + rf"\.([0-9]{{{SEGMENT_DIGITS}}})\Z")
    found = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(path.parent):
            match = pattern.match(entry.name)
            if match:
                found.append((int(match.group(1)), Path(entry.path)))
    return sorted(found)


def active_base(rotated: list[tuple[int, Path]]) -> int:
    """The logical offset of the active file's first byte: where the newest rotated segment ends."""
    if not rotated:
        return 0
    start, newest = rotated[-1]
    return start + newest.stat().st_size


def log_segments(path: Path) -> list[tuple[int, Path]]:
    """Every file of the log in order, the active one last (it may not exist yet)."""
    rotated = rotated_segments(path)
    return [*rotated, (active_base(rotated), path)]


def prune_segments(path: Path, ingested_offset: int) -> list[Path]:
    """Delete rotated segments wholly below ``ingested_offset``; the newest rotated one always stays, because
    its end is where the active file starts."""
    rotated = rotated_segments(path)
    removed = []
    for (_start, seg), (next_start, _) in itertools.pairwise(rotated):
        if next_start <= ingested_offset:
            seg.unlink(missing_ok=True)
            removed.append(seg)
    return removed


def repair_torn_tail(path: Path) -> bool:
    """End a final line left without its newline by a crash; True when one was repaired."""
    try:
        with open(path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return False
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return False
            f.write(b"\n")
            return True
    except FileNotFoundError:
        return False


# -- the writer -----------------------------------------------------------------------------------------------

class AuditLogError(RuntimeError):
    pass


class AuditJsonFormatter(JsonFormatter):  # type: ignore[misc]  # aiologger ships no types
    """aiologger's JsonFormatter, narrowed to emit exactly each event's JSON: one object per line, nothing added.

    A record carries one event or a tuple of them (the writer task hands over whatever queued up at once); an
    event is an AuditEvent or its line already rendered by :meth:`AuditEvent.to_line` (AuditLog renders at
    ``log`` time, so no loop step ever serializes a whole batch and the queue holds one string per event).
    """

    def format_lines(self, record: LogRecord) -> list[str]:
        events = record.msg if isinstance(record.msg, tuple) else (record.msg,)
        lines = [e.to_line() if isinstance(e, AuditEvent) else e for e in events]
        if not all(isinstance(line, str) for line in lines):
            raise TypeError("the audit log takes AuditEvents (or their rendered lines) only")
        return lines

    def format(self, record: LogRecord) -> str:
        return "\n".join(self.format_lines(record))


class AuditFileHandler(BaseAsyncRotatingFileHandler):  # type: ignore[misc]  # aiologger ships no types
    """aiologger's AsyncFileHandler writing whole lines, rotating by size between them.

    Differs from the parent for the log's guarantees: the file is opened unbuffered in binary append mode, so
    the lines of one record reach the kernel in one ``write(2)``; aiofiles runs on the handler's own single
    thread (the loop's default executor may be busy with long jobs, and one thread keeps lines in order); and
    the handler tracks the file's size to rotate *before* a line that would cross ``max_bytes``. Only the
    AuditLog's writer task calls ``emit``, one record at a time.
    """

    def __init__(self, path: Path, *, max_bytes: int, executor: ThreadPoolExecutor):
        super().__init__(filename=str(path), mode="ab")
        self.path = Path(self.absolute_file_path)
        self.max_bytes = max_bytes
        self.formatter = AuditJsonFormatter()
        self._executor = executor
        self.size = 0  # bytes in the active file
        self.base = 0  # logical offset of the active file's first byte
        self.written = 0
        self.failed = 0
        self.last_error: str | None = None
        self.torn_tails_repaired = 0

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _prepare(self) -> tuple[int, int, bool]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        repaired = repair_torn_tail(self.path)
        base = active_base(rotated_segments(self.path))
        size = self.path.stat().st_size if self.path.exists() else 0
        return base, size, repaired

    async def _init_writer(self) -> None:
        self.base, self.size, repaired = await self._run(self._prepare)
        self.torn_tails_repaired += int(repaired)
        self.stream = await aiofiles.open(self.path, mode="ab", buffering=0, executor=self._executor)

    def _crosses(self, pending: int, line: int) -> bool:
        """Would a line of ``line`` bytes, after ``pending`` unwritten ones, push a non-empty file past max_bytes?"""
        return self.max_bytes > 0 and self.size + pending > 0 and self.size + pending + line > self.max_bytes

    def should_rollover(self, record: LogRecord) -> bool:  # aiologger's hook; emit rotates line by line itself
        return self._crosses(0, len(self.formatter.format(record).encode("utf-8")) + 1)

    async def do_rollover(self) -> None:
        await self.stream.close()
        self.stream = None
        await self._run(os.rename, self.path, segment_path(self.path, self.base))
        self.base += self.size
        self.size = 0
        await self._init_writer()

    async def _write(self, data: bytearray, lines: int) -> None:
        view = memoryview(data)
        while view:  # a regular file takes it in one write(2); loop only for the rare short write
            view = view[await self.stream.write(view):]
        self.size += len(data)
        self.written += lines

    async def emit(self, record: LogRecord) -> None:
        lines: list[str] = []
        try:
            lines = self.formatter.format_lines(record)
            if not self.initialized:
                await self._init_writer()
            pending, count = bytearray(), 0
            for line in lines:
                data = line.encode("utf-8") + b"\n"
                if self._crosses(len(pending), len(data)):  # rotate between lines: write what precedes first
                    if pending:
                        await self._write(pending, count)
                        pending, count = bytearray(), 0
                    await self.do_rollover()
                pending += data
                count += 1
            await self._write(pending, count)
        except Exception as exc:
            self.failed += len(lines) or 1
            await self.handle_error(record, exc)

    async def handle_error(self, record: LogRecord, exception: Exception) -> None:
        # aiologger's fallback would print the whole record (prompts and all) to stderr: say what matters.
        self.last_error = f"{type(exception).__name__}: {exception}"
        _log.error("audit log %s: events not written: %s", self.path, self.last_error)

    async def fsync(self) -> None:
        if self.initialized:
            await self._run(os.fsync, self.stream.fileno())


_CLOSE = object()
MAX_BATCH = 256  # events handed to the writer thread at once when they queue up (one write(2))


class AuditLog:
    """Non-blocking writer of AuditEvents to a JSONL file (``settings.audit_log``).

    ``await log(event)`` validates, renders and enqueues, then returns; the writer task does the rest, handing whatever
    has queued up meanwhile to the writer thread as one record. A full queue (the disk far behind) makes
    ``log`` wait — backpressure, never a dropped event or a blocked loop. ``flush()`` returns once everything
    logged before it is on disk (fsync); ``close()`` drains, then closes.
    """

    def __init__(self, path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES,
                 queue_size: int = 10_000, name: str = "batos.audit"):
        self.path = Path(path)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-writer")
        self.handler = AuditFileHandler(self.path, max_bytes=max_bytes, executor=self._executor)
        self._logger = Logger(name=name, level=LogLevel.INFO)
        self._logger.add_handler(self.handler)
        self._queue_size = queue_size
        self._queue: asyncio.Queue[Any] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock_fd: int | None = None
        self._closed = False

    # -- lifecycle --------------------------------------------------------------------------------------
    async def open(self) -> None:
        """Take the file's writer lock and start the writer task (``log`` does this on first use)."""
        if self._closed:
            raise AuditLogError(f"audit log {self.path} is closed")
        if self._writer is not None:
            return
        loop = asyncio.get_running_loop()
        self._lock_fd = await loop.run_in_executor(self._executor, _take_writer_lock, self.path)
        self._loop = loop
        self._queue = asyncio.Queue(self._queue_size)
        self._writer = loop.create_task(self._write_loop(), name=f"audit-writer:{self.path.name}")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._writer is not None and self._queue is not None:
            await self._queue.put(_CLOSE)
            await self._writer
            await self.handler.fsync()
        await self._logger.shutdown()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None
        self._executor.shutdown(wait=False)

    async def __aenter__(self) -> AuditLog:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- logging ----------------------------------------------------------------------------------------
    async def log(self, event: AuditEvent | dict[str, Any]) -> None:
        """Validate, render and enqueue one event; raises ``pydantic.ValidationError`` for a malformed dict."""
        record = event if isinstance(event, AuditEvent) else AuditEvent.model_validate(event)
        if self._writer is None:
            await self.open()
        if self._closed:
            raise AuditLogError(f"audit log {self.path} is closed")
        assert self._queue is not None  # set by open()
        await self._queue.put(record.to_line())

    def log_threadsafe(self, event: AuditEvent | dict[str, Any]) -> None:
        """Log from a worker thread (e.g. a ZODB session thread); the log must have been opened on its loop."""
        if self._loop is None or self._queue is None:
            raise AuditLogError("open() the audit log on its event loop before logging from threads")
        record = event if isinstance(event, AuditEvent) else AuditEvent.model_validate(event)
        asyncio.run_coroutine_threadsafe(self._queue.put(record.to_line()), self._loop)

    async def flush(self) -> None:
        """Wait until every event logged so far is written, then fsync."""
        if self._queue is not None and not self._closed:
            await self._queue.join()
            await self.handler.fsync()

    @property
    def stats(self) -> dict[str, Any]:
        h = self.handler
        return {"path": str(self.path), "written": h.written, "failed": h.failed,
                "queued": self._queue.qsize() if self._queue else 0, "last_error": h.last_error,
                "torn_tails_repaired": h.torn_tails_repaired, "offset": h.base + h.size}

    async def _write_loop(self) -> None:
        assert self._queue is not None
        queue = self._queue
        closing = False
        while not closing:
            batch = [await queue.get()]
            while (len(batch) < MAX_BATCH or closing) and not queue.empty():
                batch.append(queue.get_nowait())  # (after _CLOSE: stragglers that raced close() still go out)
                closing = closing or batch[-1] is _CLOSE
            closing = closing or batch[0] is _CLOSE
            events = tuple(e for e in batch if e is not _CLOSE)
            try:
                if events:
                    # The record is built by hand: Logger.info would create a task per event (no ordering)
                    # and walk the caller's stack frames, neither of which an audit line needs.
                    await self._logger.handle(LogRecord(name=self._logger.name, level=LogLevel.INFO, pathname="",
                                                        lineno=0, msg=events))
            finally:
                for _ in batch:
                    queue.task_done()


def _take_writer_lock(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AuditLogError(f"another writer holds the audit log {path} (lock {path.name}.lock)") from None
    return fd
