"""A file as numbered lines with O(1) token costs for any run of them.

Lines are split on ``\\n`` only, after universal-newline decoding: that is how Python's tokenizer
numbers lines, so ``ast`` line numbers and ours agree (``str.splitlines`` would also break on form
feeds and ``\\x1c``, which Python does not). Line numbers are 1-based and inclusive everywhere.
A run of lines is always trimmed of blank (whitespace-only) lines at both ends before it becomes
a chunk; blank lines between chunks belong to none.
"""

from __future__ import annotations

import hashlib
import io
import re
import tokenize
from dataclasses import dataclass

from batos import tokens


def normalize_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def decode_python(raw: bytes) -> str:
    """Decode Python source the way the interpreter does (BOM, PEP 263 coding cookie)."""
    encoding, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
    return normalize_newlines(raw.decode(encoding))


def decode_text(raw: bytes) -> str:
    """Decode a non-Python text file as UTF-8 (a BOM is dropped); raises UnicodeDecodeError otherwise."""
    return normalize_newlines(raw.decode("utf-8-sig"))


def file_hash(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def content_hash(file_path: str, text: str) -> str:
    """sha256 of the file path and the chunk text (a NUL between them keeps the pair unambiguous)."""
    return hashlib.sha256(f"{file_path}\0{text}".encode("utf-8", "surrogatepass")).hexdigest()


_OTHER_BREAKS = re.compile("[\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")


def split_lines(text: str) -> list[str]:
    if not _OTHER_BREAKS.search(text):  # then str.splitlines (C speed) breaks on "\n" only
        return text.splitlines(keepends=True)
    parts = text.split("\n")
    lines = [p + "\n" for p in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


@dataclass
class Span:
    """A finished run of text: whole lines ``start..end``, or part of one over-long line (``partial``)."""

    start: int
    end: int
    text: str
    tokens: int
    partial: bool = False


class Source:
    """Lines of one file plus the prefix sums that price any run of them exactly."""

    def __init__(self, text: str):
        self.text = text
        self.lines = split_lines(text)
        self.n = len(self.lines)
        blank = [line.isspace() for line in self.lines]
        blank.insert(0, True)
        blank.append(True)
        self.blank = blank  # with sentinels at 0 and n+1
        # prefix[i]: tokens of the whole-text encoding that start on lines 1..i. A line in ``crossing`` had its
        # newline merged with the blank lines below it; when it ends a run, it is counted on its own (lazily).
        self._prefix, self._crossing = tokens.line_token_index(text, self.n)
        self._alone: dict[int, int] = {}

    def line(self, i: int) -> str:
        return self.lines[i - 1]

    def is_comment(self, i: int) -> bool:
        return self.lines[i - 1].lstrip().startswith("#")

    def trim(self, start: int, end: int) -> tuple[int, int]:
        """``start..end`` without blank lines at either end; ``start > end`` when nothing is left."""
        blank = self.blank
        start = max(start, 1)
        end = min(end, self.n)
        while start <= end and blank[start]:
            start += 1
        while end >= start and blank[end]:
            end -= 1
        return start, end

    def cost(self, start: int, end: int) -> int:
        """Exact cl100k count of the trimmed text of lines ``start..end`` (the splitter's hot path)."""
        blank = self.blank
        if start < 1:
            start = 1
        if end > self.n:
            end = self.n
        while start <= end and blank[start]:
            start += 1
        while end >= start and blank[end]:
            end -= 1
        if start > end:
            return 0
        if end in self._crossing:
            alone = self._alone.get(end)
            if alone is None:
                alone = self._alone[end] = tokens.count_uncached(self.lines[end - 1])
            return self._prefix[end - 1] - self._prefix[start - 1] + alone
        return self._prefix[end] - self._prefix[start - 1]

    def text_of(self, start: int, end: int) -> str:
        s, e = self.trim(start, end)
        return "".join(self.lines[s - 1:e]) if s <= e else ""

    def span(self, start: int, end: int) -> Span | None:
        s, e = self.trim(start, end)
        if s > e:
            return None
        return Span(s, e, "".join(self.lines[s - 1:e]), self.cost(s, e))

    def windows(self, start: int, end: int, budget: int) -> list[Span]:
        """Greedy runs of whole lines within ``budget``; a single line over budget is cut into token windows."""
        out: list[Span] = []
        ws = start
        i = start
        while i <= end:
            if self.cost(ws, i) <= budget:
                i += 1
                continue
            if ws < i and (piece := self.span(ws, i - 1)) is not None:
                out.append(piece)
                ws = i
                continue  # line i again, now on its own
            out.extend(self.split_line(i, budget))
            i += 1
            ws = i
        if ws <= end and (piece := self.span(ws, end)) is not None:
            out.append(piece)
        return out

    def split_line(self, i: int, budget: int) -> list[Span]:
        """One over-long line as consecutive pieces of at most ``budget`` tokens that join back to it."""
        rest = self.lines[i - 1]
        out: list[Span] = []
        while rest:
            head = tokens.truncate_to(rest, budget) or rest[:1]  # a character is never dropped
            if head.strip():  # a piece of only the trailing newline carries nothing
                out.append(Span(i, i, head, tokens.count(head), partial=True))
            rest = rest[len(head):]
        return out
