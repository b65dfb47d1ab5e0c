"""Text files (README, .md, .rst, .toml, .txt, .cfg, .ini, .yaml, .json) as line windows.

Windows are greedy runs of whole lines within the chunk budget (a single line over the budget is
cut into token windows flagged ``partial_line``); ``node_type`` is ``TextWindow``. The same path
serves a Python file that does not parse: its windows carry ``syntax_error_fallback``.
"""

from __future__ import annotations

import os
import re

from batos import tokens
from services.ingestor.model import LINE_SPLIT, PARTIAL_LINE, Chunk, FileChunks, Summary
from services.ingestor.source import Source, content_hash

TEXT_SUFFIXES = frozenset({".md", ".rst", ".toml", ".txt", ".cfg", ".ini", ".yaml", ".yml", ".json"})
TEXT_STEMS = frozenset({"readme", "license", "licence", "changelog", "changes", "authors", "notice", "copying"})
_HEADING = re.compile(r"^(?:#{1,6}[ \t]+(.+?)[ \t#]*|\[([^\]\n]+)\][ \t]*)$")  # markdown heading, toml/ini section


def is_text_name(path: str) -> bool:
    name = os.path.basename(path)
    stem, suffix = os.path.splitext(name)
    return suffix.lower() in TEXT_SUFFIXES or (stem.lower() in TEXT_STEMS and suffix.lower() in ("", ".txt"))


def _headings(src: Source) -> list[str]:
    """For each line, the nearest heading at or above it ("" before the first)."""
    out = [""] * (src.n + 1)
    current = ""
    for i, line in enumerate(src.lines, start=1):
        if line[:1] in "#[":
            m = _HEADING.match(line.rstrip("\n"))
            if m:
                current = (m.group(1) or m.group(2) or "").strip()
        out[i] = current
    return out


def text_summary(src: Source, file_path: str, budget: int, note: str = "") -> Summary:
    name = os.path.basename(file_path)
    head = f"File {name} ({src.n} lines)" + (f" [{note}]" if note else "") + "\n"
    text, n = tokens.fit(head + src.text[: budget * 8], budget)
    meta = {"file_path": file_path, "start_line": 1, "end_line": src.n, "node_type": "TextFile", "node_name": name,
            "parent_nodes": [], "dependencies": [], "content_hash": content_hash(file_path, text), "token_count": n}
    return Summary(file_path, "file", text, meta)


def chunk_text(text: str, file_path: str, max_tokens: int, *, file_hash: str = "", kind: str = "text",
               extra_flags: tuple[str, ...] = (), error: str | None = None) -> FileChunks:
    """Line windows of ``text``; every chunk's summary is the file's."""
    if max_tokens < 1:
        raise ValueError("max_tokens must be >= 1")
    src = Source(text)
    headings = _headings(src) if kind == "text" else [""] * (src.n + 1)  # a '# comment' is no heading
    summary = text_summary(src, file_path, max_tokens, note="does not parse" if error else "")
    name = os.path.basename(file_path)
    chunks = []
    for span in src.windows(1, src.n, max_tokens):
        flags = [*extra_flags, *((LINE_SPLIT, PARTIAL_LINE) if span.partial else ())]
        meta = {"file_path": file_path, "start_line": span.start, "end_line": span.end, "node_type": "TextWindow",
                "node_name": headings[span.start] or name, "parent_nodes": [], "dependencies": [],
                "content_hash": content_hash(file_path, span.text), "token_count": span.tokens, "flags": flags}
        label = f"# {name}" + (f" :: {headings[span.start]}" if headings[span.start] else "")
        chunks.append(Chunk(span.text, f"{label}\n{span.text}", meta, summary.key))
    return FileChunks(file_path, file_hash, kind, src.n, chunks, [summary], error)
