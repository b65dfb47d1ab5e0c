"""One file from disk to chunks: classify, size and binary checks, hash, decode, chunk.

Runs in a worker thread (pure CPU and file IO, no event loop). The outcome says what happened:
``chunked`` (with the chunks), ``unchanged`` (its hash matches what memory holds), or ``skipped``
with a reason (``too_large``, ``binary``, ``unsupported``, ``undecodable``, ``unreadable``, ``special``,
``outside_root``).
A Python file that does not parse is ``chunked`` as line windows and carries ``error``.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from services.ingestor import roots, textfiles
from services.ingestor.chunker import chunk_python
from services.ingestor.model import SYNTAX_FALLBACK, FileChunks
from services.ingestor.source import decode_python, decode_text, file_hash

PYTHON_SUFFIXES = frozenset({".py", ".pyi"})
# Bump when chunk boundaries, chunk texts or embedded headers change: the hash memory keeps per file then
# differs, so the next ingest rewrites every file instead of calling it unchanged. 2: one definition per
# chunk (tiny ones grouped), embedded header with the file's last two path components (2026-12-06).
CHUNKING_VERSION = 2
BINARY_SNIFF_BYTES = 8192  # a NUL in the first 8 KiB marks a binary file (git's heuristic)


@dataclass
class Outcome:
    path: str
    status: str  # "chunked" | "unchanged" | "skipped"
    reason: str = ""
    result: FileChunks | None = None
    error: str | None = None


def classify(path: str) -> str | None:
    """``"python"``, ``"text"`` or None (not ingested)."""
    if os.path.splitext(path)[1].lower() in PYTHON_SUFFIXES:
        return "python"
    if textfiles.is_text_name(path):
        return "text"
    return None


def ingest_hash(raw: bytes, max_tokens: int, use_unparse: bool = False) -> str:
    """The file's hash as memory records it: its bytes and the recipe that chunked them (version, budget,
    unparse), so that a file chunked another way is re-ingested, and one chunked the same way is skipped."""
    return file_hash(raw + f"\0batos-chunking:{CHUNKING_VERSION}:{max_tokens}:{int(use_unparse)}".encode())


def chunk_file(path: str, max_tokens: int, max_bytes: int, *, known_hash: str | None = None,
               use_unparse: bool = False, beneath: str | None = None) -> Outcome:
    """``beneath``: the ingest root the file must be read from (services.ingestor.roots.open_beneath): no
    symlink swapped in after the roots check is followed. None opens ``path`` as given (tests, tools)."""
    kind = classify(path)
    if kind is None:
        return Outcome(path, "skipped", "unsupported")
    # O_NONBLOCK: a fifo swapped in after the walk never blocks the open; fstat then checks what was opened
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags) if beneath is None else roots.open_beneath(beneath, path, flags)
    except roots.OutsideRoot as e:
        return Outcome(path, "skipped", "outside_root", error=str(e))
    except OSError as e:
        return Outcome(path, "skipped", "unreadable", error=f"{type(e).__name__}: {e}")
    try:
        with open(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return Outcome(path, "skipped", "special")
            if st.st_size > max_bytes:
                return Outcome(path, "skipped", "too_large")
            raw = f.read(max_bytes + 1)
    except OSError as e:
        return Outcome(path, "skipped", "unreadable", error=f"{type(e).__name__}: {e}")
    if len(raw) > max_bytes:  # it grew since stat
        return Outcome(path, "skipped", "too_large")
    digest = ingest_hash(raw, max_tokens, use_unparse)
    if known_hash is not None and known_hash == digest:
        return Outcome(path, "unchanged")
    if b"\0" in raw[:BINARY_SNIFF_BYTES]:
        return Outcome(path, "skipped", "binary")
    if kind == "text":
        try:
            text = decode_text(raw)
        except UnicodeDecodeError as e:
            return Outcome(path, "skipped", "undecodable", error=f"not UTF-8: {e.reason} at byte {e.start}")
        return Outcome(path, "chunked", result=textfiles.chunk_text(text, path, max_tokens, file_hash=digest))
    return _python(path, raw, digest, max_tokens, use_unparse)


def _python(path: str, raw: bytes, digest: str, max_tokens: int, use_unparse: bool) -> Outcome:
    try:
        text = decode_python(raw)
    except (SyntaxError, UnicodeDecodeError, LookupError) as e:  # bad coding cookie or bytes
        return Outcome(path, "skipped", "undecodable", error=f"{type(e).__name__}: {e}")
    try:
        result = chunk_python(text, path, max_tokens, file_hash=digest, use_unparse=use_unparse)
        return Outcome(path, "chunked", result=result)
    except (SyntaxError, ValueError) as e:  # ValueError: source with NUL bytes, among others
        where = f" (line {e.lineno})" if isinstance(e, SyntaxError) and e.lineno else ""
        error = f"{type(e).__name__}: {getattr(e, 'msg', None) or e}{where}"
    result = textfiles.chunk_text(text, path, max_tokens, file_hash=digest, kind="python",
                                  extra_flags=(SYNTAX_FALLBACK,), error=error)
    return Outcome(path, "chunked", result=result, error=error)
