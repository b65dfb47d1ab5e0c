"""What "a chunk parses" means, exactly (used by the tests and the benchmark, and by ``use_unparse``).

1. ``normalize``: remove the chunk's margin, the indentation of its first line that is neither blank
   nor a comment, from every line (a line with less leading whitespace loses all of it; such lines
   are comments or lines inside multi-line strings, which do not affect parsing). ``textwrap.dedent``
   is not enough: a method holding a string whose lines start in column 0 has no common margin.
2. A chunk parses when ``ast.parse(normalize(text))`` succeeds.
3. A chunk that begins with a continuation clause of a split compound statement (``elif``, ``else``,
   ``except``, ``finally``, ``case``) also parses when it does so after the minimal opener that
   clause needs, from the fixed table ``OPENERS`` below (``case`` clauses are indented under
   ``match _:``). Symmetrically, a chunk that ends inside the ``try:`` clause of a split ``try``
   statement (its handlers went to the next chunk) parses when ``except Exception: pass`` is
   appended at that ``try``'s indentation (for nested ``try`` lines, innermost first).
   Nothing else is wrapped: a body fragment must parse on its own.
"""

from __future__ import annotations

import ast
import re
import textwrap
import warnings

from services.ingestor.source import split_lines

OPENERS: dict[str, tuple[str, ...]] = {
    "elif": ("if True:\n    pass\n",),
    "else": ("if True:\n    pass\n", "try:\n    pass\nexcept Exception:\n    pass\n"),
    "except": ("try:\n    pass\n",),
    "finally": ("try:\n    pass\n",),
}
_CLAUSE = re.compile(r"(elif|else|except|finally|case)\b")
_TRY = re.compile(r"^([ \t]*)try[ \t]*:", re.MULTILINE)


def _margin(lines: list[str]) -> str:
    for line in lines:
        stripped = line.lstrip()
        if stripped and not stripped.startswith("#"):
            return line[: len(line) - len(stripped)]
    return ""


def normalize(text: str) -> str:
    lines = split_lines(text)
    width = len(_margin(lines))
    if not width:
        return text
    out = []
    for line in lines:
        lead = len(line) - len(line.lstrip(" \t\f"))
        out.append(line[min(lead, width):])
    return "".join(out)


def _try_parse(text: str) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SyntaxWarning for odd escapes in old code is not a failure
            ast.parse(text)
    except (SyntaxError, ValueError):
        return False
    return True


def leading_clause(text: str) -> str | None:
    """The continuation keyword the chunk's first code line starts with, if any."""
    for line in normalize(text).splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            m = _CLAUSE.match(stripped)
            return m.group(1) if m else None
    return None


def _open_tries(body: str) -> list[str]:
    """Indentations of ``try:`` lines whose ``except``/``finally`` is not in ``body``, innermost last."""
    open_: list[str] = []
    for line in body.split("\n"):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        indent = line[: len(line) - len(line.lstrip())]
        while open_ and len(indent) < len(open_[-1]):
            open_.pop()  # dedented past it: it was closed (or the text is broken anyway)
        if open_ and indent == open_[-1] and re.match(r"(except|finally)\b", stripped):
            open_.pop()
        if _TRY.match(line):
            open_.append(indent)
    return open_


def _completions(body: str) -> list[str]:
    """The text with ``except`` clauses closing the ``try:`` lines left open, innermost first."""
    tail = body if body.endswith("\n") else body + "\n"
    open_ = _open_tries(body)
    if not open_:
        return []
    return [tail + "".join(f"{i}except Exception:\n{i}    pass\n" for i in reversed(open_))]


def parses(text: str) -> bool:
    body = normalize(text)
    if _try_parse(body):
        return True
    clause = leading_clause(text)
    candidates = [body, *_completions(body)]
    if clause == "case":
        return any(_try_parse("match _:\n" + textwrap.indent(c, "    ", lambda _line: True)) for c in candidates)
    openers = OPENERS.get(clause or "", ())
    return any(_try_parse(o + c) for c in candidates for o in ("", *openers) if o or c is not body)


def parses_plain(text: str) -> bool:
    """Rule 2 alone (no clause openers): reported beside ``parses`` in the benchmark."""
    return _try_parse(normalize(text))
