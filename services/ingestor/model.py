"""What ingestion produces per file, in the shapes memory's ``replace_file`` takes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Flags: the only exceptions a chunk may make to the chunker's invariants, named.
LINE_SPLIT = "line_split"  # a node too big for one chunk was cut at line boundaries (last resort)
PARTIAL_LINE = "partial_line"  # one line over the budget was cut into pieces; they join back to it
SYNTAX_FALLBACK = "syntax_error_fallback"  # a Python file that does not parse, chunked as line windows
UNPARSED = "unparsed"  # use_unparse: the text is ast.unparse output, not the original lines

# Table 2 plus what ingestion adds; ``context_header`` travels only where memory's schema accepts it.
TABLE2_FIELDS = ("file_path", "start_line", "end_line", "node_type", "node_name", "parent_nodes", "dependencies")
EXTRA_FIELDS = ("content_hash", "token_count", "flags")


@dataclass
class Chunk:
    text: str
    embed_text: str
    metadata: dict[str, Any]
    summary_key: str | None = None

    def payload(self, *, with_context_header: bool = False) -> dict[str, Any]:
        keep = TABLE2_FIELDS + EXTRA_FIELDS + (("context_header",) if with_context_header else ())
        meta = {k: self.metadata[k] for k in keep if k in self.metadata}
        return {"source_text": self.text, "embed_text": self.embed_text, "metadata": meta,
                "summary_key": self.summary_key}


@dataclass
class Summary:
    key: str
    kind: str  # "file" | "class"
    text: str
    metadata: dict[str, Any]

    def payload(self) -> dict[str, Any]:
        return {"key": self.key, "kind": self.kind, "summary_text": self.text, "metadata": self.metadata}


@dataclass
class FileChunks:
    """One file's ingestion result; ``error`` is set for a Python file that fell back to line windows."""

    file_path: str
    file_hash: str
    kind: str  # "python" | "text"
    lines: int
    chunks: list[Chunk] = field(default_factory=list)
    summaries: list[Summary] = field(default_factory=list)
    error: str | None = None

    def payload(self, *, with_context_header: bool = False) -> dict[str, Any]:
        return {"file_path": self.file_path, "file_hash": self.file_hash,
                "summaries": [s.payload() for s in self.summaries],
                "chunks": [c.payload(with_context_header=with_context_header) for c in self.chunks]}
