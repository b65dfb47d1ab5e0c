"""The ``memory`` service's bodies (services/memory_weaver).

Every check a request needs is in its type: sizes and ranges as msgspec ``Meta`` constraints, relations
between fields (a chunk's ``summary_key`` names a summary of the same request, event ids are unique, ...)
in ``__post_init__``, which msgspec turns into a validation error naming the request. Past the worker's
decode the memory service trusts these values.

Chunk metadata is Table 2 of the blueprint exactly, plus the fields ingestion adds (``content_hash``,
``token_count``, ``flags``, ``context_header``) and the one memory adds (``embed_windows``).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from proto.bodies.runtime import Status, StatusReply
from proto.contract import Call, Reply, command

MAX_ITEMS = 5000  # chunks, summaries, files or events in one request
MAX_TEXT_CHARS = 200_000  # one chunk/summary text; chunks are ~256 tokens, this is a runaway guard
MAX_K = 1000
MAX_FRACTAL_JSON = 4 * 1024 * 1024
MAX_QUERY_LIMIT = 10_000

Text = Annotated[str, Meta(max_length=MAX_TEXT_CHARS)]
NonEmpty = Annotated[str, Meta(min_length=1)]
Lines = Annotated[int, Meta(ge=0)]


def _unique(values: list[str], what: str) -> None:
    if len(set(values)) != len(values):
        raise ValueError(f"{what} must be unique within a request")


# -- chunks and summaries ---------------------------------------------------------------------------


class Table2Metadata(msgspec.Struct, forbid_unknown_fields=True):
    file_path: str
    start_line: Lines
    end_line: Lines
    node_type: str
    node_name: str
    parent_nodes: list[str]
    dependencies: list[str]
    content_hash: str = ""
    token_count: int | None = None
    flags: list[str] | dict[str, Any] | None = None
    embed_windows: int | None = None  # set by memory; a caller's value is overwritten
    context_header: str | None = None  # a split class/function's header, given to its pieces as context

    def __post_init__(self) -> None:
        if self.end_line < self.start_line:
            raise ValueError(f"{self.file_path}: lines {self.start_line}..{self.end_line} are not a range")


class ChunkIn(msgspec.Struct, forbid_unknown_fields=True):
    source_text: Text
    metadata: Table2Metadata
    embed_text: Text | None = None
    summary_key: str | None = None


class SummaryIn(msgspec.Struct, forbid_unknown_fields=True):
    key: str
    kind: Literal["file", "class"]
    summary_text: Text
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    embed_text: Text | None = None


class FileIn(msgspec.Struct, forbid_unknown_fields=True):
    """One file's new summaries and chunks (every chunk's metadata names this file)."""

    file_path: NonEmpty
    file_hash: str
    summaries: Annotated[list[SummaryIn], Meta(max_length=MAX_ITEMS)] = msgspec.field(default_factory=list)
    chunks: Annotated[list[ChunkIn], Meta(max_length=MAX_ITEMS)] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        keys = [s.key for s in self.summaries]
        _unique(keys, f"{self.file_path}: summary keys")
        known = set(keys)
        for i, c in enumerate(self.chunks):
            if c.metadata.file_path != self.file_path:
                raise ValueError(f"{self.file_path}: chunks[{i}].metadata.file_path is {c.metadata.file_path!r}")
            if c.summary_key is not None and c.summary_key not in known:
                raise ValueError(f"{self.file_path}: chunks[{i}].summary_key {c.summary_key!r} names no summary")


class FileReplaced(Reply):
    file_path: str
    chunks: int
    summaries: int
    oids: list[str]
    unchanged: bool
    reused_vectors: int


class ReplaceFilesReply(Reply):
    files: list[FileReplaced]  # in request order


@command("memory", "replace_files")
class ReplaceFiles(Call[ReplaceFilesReply]):
    """Swap each file's summaries and chunks for these, all in one transaction (ingestion's batches); a file
    whose hash memory already holds is left as it is (``unchanged``)."""

    files: Annotated[list[FileIn], Meta(max_length=MAX_ITEMS)]

    def __post_init__(self) -> None:
        _unique([f.file_path for f in self.files], "file paths")
        if sum(len(f.chunks) + len(f.summaries) for f in self.files) > MAX_ITEMS:
            raise ValueError(f"too many chunks and summaries in one replace_files: the limit is {MAX_ITEMS}")


class FileHashesReply(Reply):
    hashes: dict[str, str]  # file path -> hash; "" for a file memory found broken (ingest re-sends it)


@command("memory", "file_hashes")
class FileHashes(Call[FileHashesReply]):
    root: str | None = None  # only files under this path


class DeleteFileReply(Reply):
    deleted: int  # objects removed


@command("memory", "delete_file")
class DeleteFile(Call[DeleteFileReply]):
    file_path: NonEmpty


# -- search -----------------------------------------------------------------------------------------


class Filters(msgspec.Struct, forbid_unknown_fields=True):
    file_path: str | None = None
    node_type: str | None = None
    node_name: str | None = None

    def any(self) -> bool:
        return any(v is not None for v in (self.file_path, self.node_type, self.node_name))


class Hit(msgspec.Struct, omit_defaults=True):
    oid: str
    level: Literal["chunk", "summary", "fractal"]
    score: float
    text: str | None
    metadata: dict[str, Any]
    token_count: int | None
    summary_oid: str | None = None  # a chunk's summary
    child_oids: list[str] | None = None  # a summary's chunks
    dense_score: float | None = None  # hybrid and lexical modes: the cosine part and each channel's rank
    channels: dict[str, int] | None = None


# what a search reads: summaries, chunks, fractals (the audit history), both (summaries and chunks) or all
SearchLevel = Literal["summaries", "chunks", "fractals", "both", "all"]


class SearchReply(Reply):
    hits: list[Hit]
    next: str | None = None  # send back as ``after`` for the next page


@command("memory", "search")
class Search(Call[SearchReply]):
    text: Text | None = None
    vector: list[float] | None = None
    k: Annotated[int, Meta(ge=1, le=MAX_K)] = 8
    level: SearchLevel = "both"
    filters: Filters = msgspec.field(default_factory=Filters)
    within: list[str] | None = None  # summaries' oids: search their child chunks only
    # hybrid: dense + BM25 + exact names fused and reranked (hybrid.py); dense: cosine only (the
    # behaviour before hybrid search); lexical: BM25 and nothing embedded. A `vector` query is dense.
    mode: Literal["hybrid", "dense", "lexical"] = "hybrid"
    after: str | None = None  # a previous page's ``next``: the ranked hits from there (batos.paging)

    def __post_init__(self) -> None:
        if self.text is None and self.vector is None:
            raise ValueError("search needs `text` or `vector`")
        if self.mode == "lexical" and self.text is None:
            raise ValueError("a lexical search needs `text`")


# -- looking at objects -----------------------------------------------------------------------------


class MethodRef(msgspec.Struct):
    selector: str
    version: int
    owner: str


class InspectReply(Reply, omit_defaults=True):
    oid: str
    prototype: str
    name: str
    slots: dict[str, str]
    parents: list[str]
    methods: list[str]
    all_methods: list[MethodRef] | None = None  # UvmObjects: every method along the parent chain
    live: bool | None = None  # memory objects: still indexed (not replaced by a re-ingest)


@command("memory", "inspect")
class Inspect(Call[InspectReply]):
    oid: str | int


class StatsReply(Reply):
    counts: dict[str, int]
    vectors: dict[str, int]
    storage_bytes: int
    index: dict[str, Any]


@command("memory", "stats")
class Stats(Call[StatsReply]):
    pass


class VerifyReply(Reply, omit_defaults=True):
    ok: bool
    problems: list[dict[str, Any]]
    problem_counts: dict[str, int]
    bad_files: list[str]
    checked: dict[str, int]
    repaired: dict[str, int] | None = None  # with repair=true: what was done
    after: dict[str, Any] | None = None  # with repair=true: the check again


@command("memory", "verify")
class Verify(Call[VerifyReply]):
    repair: bool = False  # fix what the check finds (verify.py)


class MemoryStatusReply(StatusReply):
    index: dict[str, Any] | None = None  # the vector index's own figures; absent while memory starts


@command("memory", "status")
class MemoryStatus(Status, Call[MemoryStatusReply]):
    pass


# -- the audit history (ContextFractals) ------------------------------------------------------------


class FractalMeta(msgspec.Struct):
    cycle_id: str | None = None
    mission_type: str | None = None
    persona: str | None = None
    status: str | None = None
    timestamp: str = ""
    event_type: str | None = None
    psm_state: str | None = None  # a STATE_TRANSITION is logged in the state it enters


class FractalEvent(msgspec.Struct, forbid_unknown_fields=True):
    event_id: NonEmpty
    summary: Text
    full_json: Annotated[str, Meta(max_length=MAX_FRACTAL_JSON)]
    meta: FractalMeta = msgspec.field(default_factory=FractalMeta)

    def __post_init__(self) -> None:
        try:
            json.loads(self.full_json)
        except ValueError as e:
            raise ValueError(f"event {self.event_id}: full_json is not JSON: {e}") from None


class Offset(msgspec.Struct, forbid_unknown_fields=True):
    path: NonEmpty
    value: Annotated[int, Meta(ge=0)]


class CreateFractalsReply(Reply):
    created: int
    skipped: int  # already stored (event ids are idempotent)


@command("memory", "create_fractals")
class CreateFractals(Call[CreateFractalsReply]):
    """ContextFractals for new event ids and the audit log's read position, in one transaction."""

    events: Annotated[list[FractalEvent], Meta(max_length=MAX_ITEMS)]
    offset: Offset | None = None

    def __post_init__(self) -> None:
        _unique([e.event_id for e in self.events], "event_id values")


class AuditOffsetReply(Reply):
    value: int


@command("memory", "audit_offset")
class AuditOffset(Call[AuditOffsetReply]):
    path: NonEmpty


class Fractal(msgspec.Struct):
    oid: str
    event_id: str
    summary: str
    full_json: str
    meta: dict[str, Any]


class QueryFractalsReply(Reply):
    fractals: list[Fractal]  # in (timestamp, event id) order, or its reverse (newest_first)
    next: str | None = None  # send back as ``after`` for the next page (batos.paging)


@command("memory", "query_fractals")
class QueryFractals(Call[QueryFractalsReply]):
    """Fractals matching every given filter, answered from the history indexes (history_index.py)."""

    cycle_id: str | None = None
    mission_type: str | None = None
    persona: str | None = None
    status: str | None = None
    event_type: str | None = None
    event_types: list[str] | None = None  # any of these (with `event_type`, both must hold)
    cycle_status: str | None = None  # only events of cycles that ended so (batos.outcome; "" = not ended)
    since: str | None = None
    until: str | None = None
    newest_first: bool = False  # the reverse order: a reader that needs only the latest few stops early
    limit: Annotated[int, Meta(ge=1, le=MAX_QUERY_LIMIT)] = 100  # fractals in one page (also bounded in bytes)
    after: str | None = None  # a previous page's `next` cursor: the page after it
