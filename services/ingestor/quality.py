"""The chunker's invariants as a checker, shared by the tests and the benchmark.

For one file's chunks: every non-blank line is in exactly one chunk (the pieces of a cut line
count as one and must join back to it); a chunk's text is exactly the source lines it claims;
every unflagged chunk parses (``parsecheck.parses``) and fits the budget; ``token_count`` is the
exact count of the text.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from batos import tokens
from services.ingestor import parsecheck
from services.ingestor.model import PARTIAL_LINE, SYNTAX_FALLBACK, Chunk
from services.ingestor.source import split_lines


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    chunks: int = 0
    flagged: int = 0
    parseable: int = 0  # among all chunks
    parseable_unflagged: int = 0
    unflagged: int = 0
    lines: int = 0  # non-blank lines in the file
    covered: int = 0


def check(text: str, chunks: list[Chunk], budget: int, *, parse: bool = True) -> Report:
    lines = split_lines(text)
    r = Report(chunks=len(chunks))
    owner: dict[int, int] = {}
    pieces: dict[int, list[str]] = defaultdict(list)
    for i, c in enumerate(chunks):
        m = c.metadata
        s, e, flags = m["start_line"], m["end_line"], m["flags"]
        where = f"chunk {i} (lines {s}-{e})"
        if m["token_count"] != tokens.count(c.text):
            r.problems.append(f"{where}: token_count {m['token_count']} != {tokens.count(c.text)}")
        if PARTIAL_LINE in flags:
            pieces[s].append(c.text)
            if s != e:
                r.problems.append(f"{where}: a partial line spans several lines")
        elif c.text != "".join(lines[s - 1:e]):
            r.problems.append(f"{where}: text is not the source lines it claims")
        else:
            for k in range(s, e + 1):
                if k in owner:
                    r.problems.append(f"line {k} is in chunks {owner[k]} and {i}")
                owner[k] = i
        if flags:
            r.flagged += 1
        else:
            r.unflagged += 1
            if m["token_count"] > budget:
                r.problems.append(f"{where}: {m['token_count']} tokens > budget {budget}, unflagged")
        if parse and SYNTAX_FALLBACK not in flags:
            ok = parsecheck.parses(c.text)
            r.parseable += ok
            if not flags:
                r.parseable_unflagged += ok
                if not ok:
                    r.problems.append(f"{where}: unflagged chunk does not parse")
    for k, parts in pieces.items():
        if "".join(parts).strip() != lines[k - 1].strip():
            r.problems.append(f"line {k}: its pieces do not join back to it")
        if k in owner:
            r.problems.append(f"line {k} is both whole and cut")
        owner[k] = -1
    for k, line in enumerate(lines, start=1):
        if line.strip():
            r.lines += 1
            if k in owner:
                r.covered += 1
            else:
                r.problems.append(f"line {k} is in no chunk")
    return r
