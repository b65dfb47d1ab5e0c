"""Is an answer grounded in the evidence its prompt showed? VALIDATING's checks, each with a reason in words.

  labels       the answer cites at least one evidence label ([E1]) and every label it cites was in the prompt
               (an answer citing none but naming code that all occurs in the evidence is cited by those names:
               the pieces defining them);
  identifiers  every code identifier the answer names -- dotted names (``a.b``), `code spans`, call-like
               tokens ``foo(``, snake_case and camelCase words -- occurs in the evidence it cites or in the
               question (the leading parts of a dotted name may come from any evidence shown, or a file path);
               a name found only in a piece it was shown but did not cite adds that piece to its citations (a
               small model cites [E1] and names E2's function: the name is real, the citation incomplete);
  names code   it names at least one code identifier (checked as above): an answer that names nothing says
               nothing that can be verified;
  says something  its prose (the Function line apart) has at least NEW_WORDS_MIN content words the question
               does not have: a restated question is no answer, whatever function it names;
  not a loop   the answer's prose (its Answer:/Sources: form left out) is not empty or a repetition loop
               (degenerate.py).
A small model invents plausible names ("handle_dead_worker") and cites labels that do not exist; these checks
are what lets SUCCESS mean grounded.
"""

from __future__ import annotations

import builtins
import keyword
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from services.kernel import degenerate

_LABEL = re.compile(r"\[\s*((?:E\d+\s*,?\s*)+)\]")
_SOURCES_LINE = re.compile(r"^\s*Sources?\s*:(.*)$", re.I | re.M)
_BARE_LABEL = re.compile(r"\bE\d+\b")
_FORM_WORD = re.compile(r"^\s*\**(?:answer|sources?|function)\**\s*:\**", re.I | re.M)
_SPAN = re.compile(r"`([^`\n]{1,120})`")
_END = r"(?!\w|\.\w)"  # a sentence's full stop may follow a name
_DOTTED = re.compile(r"(?<![\w.])[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+(?![\w(]|\.\w)")
_CALL = re.compile(r"(?<![\w.])([A-Za-z_][\w.]*)\(")
_SNAKE = re.compile(r"(?<![\w.])_*[A-Za-z][A-Za-z0-9]*(?:_[A-Za-z0-9]+)+_*" + _END + r"|(?<![\w.])_[A-Za-z]\w*" + _END)
_CAMEL = re.compile(r"(?<![\w.])(?:[a-z]+[A-Z]\w*|[A-Z][a-z0-9]+[A-Z]\w*|[A-Z]{2,}[a-z]\w*)" + _END)
_NAME = re.compile(r"[A-Za-z_]\w*")
_FUNCTION_LINE = re.compile(r"^\s*\**function\**\s*:.*$", re.I | re.M)
_WORD = re.compile(r"[a-z]{3,}")
_STOP_WORDS = frozenset("the and for are that this with from into when what which does how where why its has have was "
                        "were will not but can all any one then than there their they them these those been being also "
                        "only each more most such very use used uses using".split())
NEW_WORDS_MIN = 2  # "says something": content words beyond the question's own
_FILE_SUFFIXES = {"py", "pyi", "txt", "md", "json", "toml", "cfg", "ini", "yaml", "yml", "conf", "rst", "html"}
_COMMON = set(keyword.kwlist) | set(dir(builtins)) | {"self", "cls", "e.g", "i.e", "etc"}


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class Verdict:
    checks: list[Check]
    cited: list[str] = field(default_factory=list)  # labels cited that exist, in order of first mention

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def reason(self) -> str:
        return "; ".join(c.detail for c in self.checks if not c.ok)

    def record(self) -> list[dict[str, Any]]:
        return [{"check": c.name, "ok": c.ok, "detail": c.detail} for c in self.checks]


def cited_labels(text: str) -> list[str]:
    """Labels the text cites, in order: [E1], [E1, E2], and bare E1 on a Sources line."""
    found: list[str] = []
    for m in _LABEL.finditer(text):
        found += _BARE_LABEL.findall(m.group(1))
    for m in _SOURCES_LINE.finditer(text):
        found += _BARE_LABEL.findall(m.group(1))
    return list(dict.fromkeys(found))


def prose(text: str) -> str:
    """What the answer says, its form's words (Answer:, Sources: and the labels) left out: a reply that is only its
    Sources line says nothing, whatever it cites."""
    return _FORM_WORD.sub(" ", _LABEL.sub(" ", _SOURCES_LINE.sub(" ", text))).strip()


def identifiers(text: str) -> list[str]:
    """Code identifiers the text names (see the module docstring), file names and builtins left out."""
    text = _LABEL.sub(" ", text)
    names: list[str] = []
    for span in _SPAN.findall(text):
        names += [n for n in re.findall(r"[A-Za-z_][\w.]*", span) if "_" in n or "." in n or len(n) > 2]
    prose = _SPAN.sub(" ", text)
    names += _DOTTED.findall(prose) + _CALL.findall(prose) + _SNAKE.findall(prose) + _CAMEL.findall(prose)
    out = []
    for name in (n.strip(".") for n in names):
        parts = name.split(".")
        if not name or name in _COMMON or parts[-1].lower() in _FILE_SUFFIXES or any(not p for p in parts):
            continue
        out.append(name)
    return list(dict.fromkeys(out))


def _words(texts: Iterable[str]) -> set[str]:
    return {w for t in texts for w in _NAME.findall(t)}


def occurs(name: str, cited: set[str], shown: set[str]) -> bool:
    parts = [p for p in name.split(".") if p not in ("self", "cls")]
    if not parts:
        return True
    return parts[-1] in cited and all(p in shown or p in cited for p in parts[:-1])


def inferred_labels(text: str, labels: dict[str, list[str]], question: str) -> list[str]:
    """An answer that cites no label but names code: the pieces defining (else containing) each name it uses, if
    every one of them is in the evidence; [] otherwise. A small model often names the right function and forgets
    the label: the names it uses are then its citation."""
    asked = _words([question])
    # a dunder (``__init__``) names no particular code: it cannot stand for a citation
    names = [n for n in identifiers(text) if n.split(".")[-1] not in asked and not n.split(".")[-1].startswith("__")]
    return holders(names, labels)


def holders(names: list[str], labels: dict[str, list[str]]) -> list[str]:
    """For each name, the label of the piece defining it (else the first containing it); [] if any is nowhere."""
    out: list[str] = []
    for name in names:
        last = name.split(".")[-1]
        defining = [c for c, texts in labels.items() if len(texts) > 1 and texts[1] == last]
        containing = [c for c, texts in labels.items() if last in _words(texts)]
        if not containing and not defining:
            return []
        out.append((defining or containing)[0])
    return list(dict.fromkeys(out))


def check(text: str, labels: dict[str, list[str]], question: str) -> Verdict:
    """``labels``: each evidence label shown in the prompt -> the texts it stands for (code, path, names)."""
    checks: list[Check] = []
    loop = degenerate.check(prose(text))
    checks.append(Check("not a loop", not loop.degenerate, loop.reason))
    cited_all = cited_labels(text)
    cited = [c for c in cited_all if c in labels]
    unknown = [c for c in cited_all if c not in labels]
    if unknown:
        checks.append(Check("labels", False, f"cites evidence that was not shown: {', '.join(unknown)}"))
    elif not cited:
        cited = inferred_labels(text, labels, question)
        checks.append(Check("labels", bool(cited), f"no label cited; the evidence that defines the names it uses: "
                                                   f"{', '.join(cited)}" if cited else "cites no evidence label"))
    else:
        checks.append(Check("labels", True))
    shown_words = _words([question, *(t for ts in labels.values() for t in ts)])
    # without a usable label the labels check has failed already; names are then read against all evidence shown
    cited_words = _words([question, *(t for c in cited for t in labels[c])]) if cited else shown_words
    named = identifiers(text)
    missing = [n for n in named if not occurs(n, cited_words, shown_words)]
    completed = holders(missing, {c: t for c, t in labels.items() if c not in cited}) if cited and missing else []
    if completed:  # each name it uses is in a piece it was shown but did not cite: that piece is cited too
        cited = [*cited, *completed]
        cited_words = _words([question, *(t for c in cited for t in labels[c])])
        missing = [n for n in named if not occurs(n, cited_words, shown_words)]
    checks.append(Check("identifiers", not missing,
                        f"names {', '.join(missing[:5])} not found in the evidence it cites" if missing else
                        f"the names it uses also cite {', '.join(completed)}" if completed else ""))
    # an answer naming no code at all passes the check above vacuously: "the field names are taken from the first
    # row" restates the question and cannot be verified against anything (Qwen 0.5B, bench/RESULTS.md 2026-12-06)
    checks.append(Check("names code", bool(named),
                        "" if named else "names no function, class or other code from the evidence"))
    # ... and so does one whose Function line names code and whose prose restates the question (the same answer
    # with "Function: Sniffer.has_header" before it, Qwen 0.5B on csv, 2026-12-06, issue 16)
    new = new_words(text, question)
    checks.append(Check("says something", len(new) >= NEW_WORDS_MIN,
                        "" if len(new) >= NEW_WORDS_MIN else "its prose only restates the question"))
    return Verdict(checks, cited)


def new_words(text: str, question: str) -> set[str]:
    """Content words of the answer's prose (its form and Function line apart) that the question does not hold."""
    def stems(t: str) -> set[str]:
        return {w.removesuffix("s") for w in _WORD.findall(t.lower()) if w not in _STOP_WORDS}

    return stems(prose(_FUNCTION_LINE.sub(" ", text))) - stems(question)
