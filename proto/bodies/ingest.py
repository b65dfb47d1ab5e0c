"""The ``ingest`` service's bodies (services/ingestor): ingest a tree into memory, or preview one file's chunks."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from proto.contract import Call, Reply, command

MIN_CHUNK_TOKENS = 16  # below this a chunk holds a line or two: almost everything would be line-split
MAX_CHUNK_TOKENS = 8192

Path = Annotated[str, msgspec.Meta(min_length=1, pattern=r"\S")]  # resolved inside settings.ingest_roots
ChunkTokens = Annotated[int, msgspec.Meta(ge=MIN_CHUNK_TOKENS, le=MAX_CHUNK_TOKENS)]


class FileProblem(msgspec.Struct, kw_only=True):
    file_path: str
    error: str = ""  # errors: why a file was not (fully) ingested
    reason: str = ""  # refused: why a path was not even read (a symlink out of the root, a special file)


class IngestReply(Reply):
    root: str
    files: int
    chunks: int
    summaries: int
    lines: int
    skipped: int
    skipped_by_reason: dict[str, int]
    unchanged: int
    removed: int
    unsupported: int  # files of other types under the path (not counted as skipped)
    errors: list[FileProblem]
    refused: list[FileProblem]
    seconds: float


@command("ingest", "ingest")
class Ingest(Call[IngestReply]):
    """A file or directory tree into memory; streams ``progress`` events (CHUNKING ... COMPLETE)."""

    path: Path
    max_chunk_tokens: ChunkTokens | None = None  # None: settings.max_chunk_tokens
    use_unparse: bool = False


class ChunkReply(Reply):
    file_path: str
    status: Literal["chunked", "unchanged", "skipped"]
    reason: str
    error: str | None
    chunks: list[dict[str, Any]]  # {source_text, embed_text, metadata, summary_key}: memory's create_chunks items
    summaries: list[dict[str, Any]]  # {key, kind, summary_text, metadata}


@command("ingest", "chunk")
class Chunk(Call[ChunkReply]):
    """One file's chunks and summaries, nothing stored (a preview)."""

    path: Path
    max_chunk_tokens: ChunkTokens | None = None
