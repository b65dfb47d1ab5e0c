"""Typed request bodies of the `memory` service, validated once at the boundary.

``parse(Type, body)`` turns a request body into a msgspec Struct or raises
``ServiceError(bad_args)`` naming the offending field; past this module code trusts types.
Chunk metadata is Table 2 of the blueprint exactly, plus the fields ingestion adds
(``content_hash``, ``token_count``, ``flags``) and the one memory adds (``embed_windows``).
"""

from __future__ import annotations

import json
from typing import Any, Literal, TypeVar

import msgspec

from batos.errors import ServiceError
from proto import ErrorCode

T = TypeVar("T")

MAX_ITEMS = 5000  # chunks, summaries or events in one request
MAX_TEXT_CHARS = 200_000  # one chunk/summary text; chunks are ~256 tokens, this is a runaway guard
MAX_K = 1000
MAX_FRACTAL_JSON = 4 * 1024 * 1024


class Table2Metadata(msgspec.Struct, forbid_unknown_fields=True):
    file_path: str
    start_line: int
    end_line: int
    node_type: str
    node_name: str
    parent_nodes: list[str]
    dependencies: list[str]
    content_hash: str = ""
    token_count: int | None = None
    flags: list[str] | dict[str, Any] | None = None
    embed_windows: int | None = None  # set by memory; a caller's value is overwritten
    context_header: str | None = None  # a split class/function's header, given to its pieces as context


class ChunkIn(msgspec.Struct, forbid_unknown_fields=True):
    source_text: str
    metadata: Table2Metadata
    embed_text: str | None = None
    summary_key: str | None = None


class SummaryIn(msgspec.Struct, forbid_unknown_fields=True):
    key: str
    kind: Literal["file", "class"]
    summary_text: str
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    embed_text: str | None = None


class ReplaceFile(msgspec.Struct, forbid_unknown_fields=True):
    file_path: str
    file_hash: str
    summaries: list[SummaryIn] = msgspec.field(default_factory=list)
    chunks: list[ChunkIn] = msgspec.field(default_factory=list)


class ReplaceFiles(msgspec.Struct, forbid_unknown_fields=True):
    files: list[ReplaceFile]


class CreateChunks(msgspec.Struct, forbid_unknown_fields=True):
    chunks: list[ChunkIn]
    summaries: list[SummaryIn] = msgspec.field(default_factory=list)


class Filters(msgspec.Struct, forbid_unknown_fields=True):
    file_path: str | None = None
    node_type: str | None = None
    node_name: str | None = None

    def any(self) -> bool:
        return any(v is not None for v in (self.file_path, self.node_type, self.node_name))


class Search(msgspec.Struct, forbid_unknown_fields=True):
    text: str | None = None
    vector: list[float] | None = None
    k: int = 8
    level: Literal["summaries", "chunks", "fractals", "both", "all"] = "both"
    filters: Filters = msgspec.field(default_factory=Filters)
    within: list[str] | None = None
    # hybrid: dense + BM25 + exact names fused and reranked (hybrid.py); dense: cosine only (the
    # behaviour before hybrid search); lexical: BM25 and nothing embedded. A `vector` query is dense.
    mode: Literal["hybrid", "dense", "lexical"] = "hybrid"


class FractalMeta(msgspec.Struct):
    cycle_id: str | None = None
    mission_type: str | None = None
    persona: str | None = None
    status: str | None = None
    timestamp: str = ""
    event_type: str | None = None
    psm_state: str | None = None


class FractalEvent(msgspec.Struct, forbid_unknown_fields=True):
    event_id: str
    summary: str
    full_json: str
    meta: FractalMeta = msgspec.field(default_factory=FractalMeta)


class Offset(msgspec.Struct, forbid_unknown_fields=True):
    path: str
    value: int


class CreateFractals(msgspec.Struct, forbid_unknown_fields=True):
    events: list[FractalEvent]
    offset: Offset | None = None


class QueryFractals(msgspec.Struct, forbid_unknown_fields=True):
    cycle_id: str | None = None
    mission_type: str | None = None
    persona: str | None = None
    status: str | None = None
    event_type: str | None = None
    since: str | None = None
    until: str | None = None
    limit: int = 100  # fractals in one page (a page is also bounded in bytes: batos.paging)
    after: str | None = None  # a previous page's `next` cursor: the page after it


class Verify(msgspec.Struct, forbid_unknown_fields=True):
    repair: bool = False  # fix what the check finds (verify.py)


def parse(kind: type[T], body: Any) -> T:
    """Validate ``body`` as ``kind``; ServiceError(bad_args) with the field path otherwise."""
    if not isinstance(body, dict):
        raise ServiceError(ErrorCode.BAD_ARGS, f"request body must be a map, got {type(body).__name__}")
    try:
        value = msgspec.convert(body, kind, strict=True)
    except msgspec.ValidationError as e:
        raise ServiceError(ErrorCode.BAD_ARGS, f"invalid {kind.__name__} request: {e}") from None
    _check(value)
    return value


def bad(message: str) -> ServiceError:
    return ServiceError(ErrorCode.BAD_ARGS, message)


def _check_items(items: list, what: str) -> None:
    if len(items) > MAX_ITEMS:
        raise bad(f"too many {what}: {len(items)} > {MAX_ITEMS} per request")


def _check_text(text: str | None, where: str) -> None:
    if text is not None and len(text) > MAX_TEXT_CHARS:
        raise bad(f"{where} is {len(text)} characters; the limit is {MAX_TEXT_CHARS}")


def _check_chunks(chunks: list[ChunkIn], summaries: list[SummaryIn]) -> None:
    _check_items(chunks, "chunks")
    _check_items(summaries, "summaries")
    keys = [s.key for s in summaries]
    if len(set(keys)) != len(keys):
        raise bad("summary keys must be unique within a request")
    for i, s in enumerate(summaries):
        _check_text(s.summary_text, f"summaries[{i}].summary_text")
        _check_text(s.embed_text, f"summaries[{i}].embed_text")
    known = set(keys)
    for i, c in enumerate(chunks):
        _check_text(c.source_text, f"chunks[{i}].source_text")
        _check_text(c.embed_text, f"chunks[{i}].embed_text")
        m = c.metadata
        if m.start_line < 0 or m.end_line < m.start_line:
            raise bad(f"chunks[{i}].metadata: lines {m.start_line}..{m.end_line} are not a range")
        if c.summary_key is not None and c.summary_key not in known:
            raise bad(f"chunks[{i}].summary_key {c.summary_key!r} names no summary in this request")


def _check(value: Any) -> None:
    if isinstance(value, ReplaceFile):
        if not value.file_path:
            raise bad("file_path must not be empty")
        _check_chunks(value.chunks, value.summaries)
        for i, c in enumerate(value.chunks):
            if c.metadata.file_path != value.file_path:
                raise bad(f"chunks[{i}].metadata.file_path {c.metadata.file_path!r} != file_path")
    elif isinstance(value, ReplaceFiles):
        paths = [f.file_path for f in value.files]
        if len(set(paths)) != len(paths):
            raise bad("each file_path may appear once in replace_files")
        _check_items(value.files, "files")
        if sum(len(f.chunks) + len(f.summaries) for f in value.files) > MAX_ITEMS:
            raise bad(f"too many chunks and summaries in one replace_files: the limit is {MAX_ITEMS}")
        for f in value.files:
            _check(f)
    elif isinstance(value, CreateChunks):
        _check_chunks(value.chunks, value.summaries)
    elif isinstance(value, Search):
        if value.text is None and value.vector is None:
            raise bad("search needs `text` or `vector`")
        if value.mode == "lexical" and value.text is None:
            raise bad("a lexical search needs `text`")
        if not 1 <= value.k <= MAX_K:
            raise bad(f"k must be between 1 and {MAX_K}")
        _check_text(value.text, "text")
    elif isinstance(value, CreateFractals):
        _check_items(value.events, "events")
        ids = [e.event_id for e in value.events]
        if len(set(ids)) != len(ids):
            raise bad("event_id values must be unique within a request")
        for i, e in enumerate(value.events):
            if not e.event_id:
                raise bad(f"events[{i}].event_id must not be empty")
            _check_text(e.summary, f"events[{i}].summary")
            if len(e.full_json) > MAX_FRACTAL_JSON:
                raise bad(f"events[{i}].full_json exceeds {MAX_FRACTAL_JSON} characters")
            try:
                json.loads(e.full_json)
            except ValueError as err:
                raise bad(f"events[{i}].full_json is not JSON: {err}") from None
        if value.offset is not None and value.offset.value < 0:
            raise bad("offset.value must be >= 0")
    elif isinstance(value, QueryFractals):
        if not 1 <= value.limit <= 10_000:
            raise bad("limit must be between 1 and 10000")
