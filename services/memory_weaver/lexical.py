"""The lexical channel of memory search: BM25 over code-aware tokens, plus exact names and paths.

Tokens: every identifier is split on underscores and case changes (``readHeaderLine`` and
``read_header_line`` both give ``read header line``), lowercased, English and Python stop words and
one-letter pieces dropped, plurals folded (``headers`` -> ``header``); an identifier made of several
pieces is also kept whole, so a question naming it exactly scores higher still.

The index is per process and in memory, keyed by the same global rows as the vector matrix
(``vectors.VectorIndex`` feeds it as it loads segments), so it follows the image exactly as vectors
do: a row's document never changes (rows are append-only) and a dead row is masked by the same
``alive`` mask. Document frequencies count every row ever loaded, dead ones included: re-ingesting
a file shifts idf slightly, never the set of candidates.
"""

from __future__ import annotations

import functools
import math
import re
from array import array
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

K1 = 1.2  # BM25 term-frequency saturation (the usual 1.2-2.0; code repeats names, so low)
B = 0.75  # BM25 length normalisation

STOP_WORDS = frozenset("""
a an the and or but not no nor of to in on at by for with from into onto as is are was were be been being
it its this that these those there here than then so such if else elif when while which who whom whose
what where how why all any each every both either neither some other same only own more most less few
can could may might must shall should will would do does did done has have had having get gets got
i me my we us our you your he him his she her they them their also just very too about above below
over under again further once up down out off yes per via eg ie etc
self cls def class return returns returned none true false pass lambda import from yield await async
str int bool float dict list tuple set bytes object type args kwargs kw param params
""".split())

_WORD = re.compile(r"[A-Za-z0-9_]+")
_PIECE = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")
_DOTTED = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")
_PATH = re.compile(r"[\w.-]*(?:/[\w.-]+)+|[\w-]+\.(?:py|pyi|md|txt|toml|cfg|ini|json|yaml|yml|rst)\b")
_CALL = re.compile(r"([A-Za-z_]\w*)\s*\(")
_TICKS = re.compile(r"`([^`]+)`")


def _fold(piece: str) -> str:
    """A crude plural fold: enough for docstring prose to meet identifiers (headers/header)."""
    if len(piece) > 4 and piece.endswith("ies"):
        return piece[:-3] + "y"
    if len(piece) > 3 and piece.endswith("s") and not piece.endswith(("ss", "us", "is")):
        return piece[:-1]
    return piece


def split_identifier(word: str) -> list[str]:
    """``parseHTTPHeader_line2`` -> ``['parse', 'http', 'header', 'line', '2']``."""
    return [p.lower() for part in word.split("_") for p in _PIECE.findall(part)]


@functools.lru_cache(maxsize=1 << 17)
def _word_tokens(word: str) -> tuple[str, ...]:
    """One word's tokens (cached: code repeats its identifiers, and splitting is the indexing cost)."""
    pieces = split_identifier(word)
    out = [_fold(p) for p in pieces if len(p) > 1 and p not in STOP_WORDS]
    if len(pieces) > 1:
        out.append(word.lower())  # the identifier whole
    return tuple(out)


def tokenize(text: str) -> list[str]:
    out: list[str] = []
    for word in _WORD.findall(text):
        out.extend(_word_tokens(word))
    return out


def named_identifiers(question: str) -> tuple[set[str], set[str]]:
    """(identifiers, paths) a question names explicitly: `code spans`, dotted names, calls, snake_case and
    camelCase words, and file paths. Identifiers are lowercased last components (``a.b.c`` -> ``c``)."""
    names: set[str] = set()
    paths = {p.strip("./") for p in _PATH.findall(question) if p.strip("./")}
    for span in _TICKS.findall(question):
        names.update(w for w in _WORD.findall(span) if not w.isdigit())
    for dotted in _DOTTED.findall(question):
        if not any(dotted.startswith(p) or p.startswith(dotted) for p in paths):
            names.add(dotted.rsplit(".", 1)[-1])
    names.update(_CALL.findall(question))
    for word in _WORD.findall(question):
        if "_" in word.strip("_") or re.search(r"[a-z][A-Z]", word):
            names.add(word)
    return {n.lower() for n in names if len(n) > 1 and n.lower() not in STOP_WORDS}, paths


@dataclass
class LexDoc:
    """What the lexical channel knows of one row: its file, its name and its text."""

    path: str
    name: str
    text: str


@dataclass
class LexicalIndex:
    """BM25 postings over global rows; exact-name and path tables."""

    doc_len: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    indexed: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    docs: int = 0
    total_len: float = 0.0
    # term -> (rows, term frequencies) as typed arrays: 8 bytes a posting, not ~60 as Python lists of objects
    _postings: dict[str, tuple[array, array]] = field(default_factory=dict)
    _arrays: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    by_name: dict[str, list[int]] = field(default_factory=dict)
    by_path: dict[str, list[int]] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)  # row -> its definition's name (for the rerank)

    def reset(self) -> None:
        vars(self).update(vars(LexicalIndex()))  # every field back to its default

    def _grow(self, rows: int) -> None:
        have = self.doc_len.shape[0]
        if rows <= have:
            return
        cap = max(rows, 2 * have, 1024)
        dl = np.zeros(cap, dtype=np.float32)
        ix = np.zeros(cap, dtype=bool)
        dl[:have], ix[:have] = self.doc_len, self.indexed
        self.doc_len, self.indexed = dl, ix

    def has(self, row: int) -> bool:
        return row < self.indexed.shape[0] and bool(self.indexed[row])

    def add(self, row: int, doc: LexDoc) -> None:
        """Index ``doc`` at ``row``; a row already indexed is left alone (rows never change)."""
        if self.has(row):
            return
        self._grow(row + 1)
        counts = Counter(tokenize(doc.text))
        for term, tf in counts.items():
            posting = self._postings.get(term)
            if posting is None:
                posting = self._postings[term] = (array("q"), array("f"))
            posting[0].append(row)
            posting[1].append(float(tf))
            self._arrays.pop(term, None)
        n = float(sum(counts.values()))
        self.doc_len[row] = n
        self.indexed[row] = True
        self.docs += 1
        self.total_len += n
        if doc.name:
            self.names[row] = doc.name
            self.by_name.setdefault(doc.name.lower(), []).append(row)
        if doc.path:
            self.by_path.setdefault(doc.path, []).append(row)

    def _posting(self, term: str) -> tuple[np.ndarray, np.ndarray] | None:
        got = self._arrays.get(term)
        if got is None:
            raw = self._postings.get(term)
            if raw is None:
                return None
            got = self._arrays[term] = (np.frombuffer(raw[0], dtype=np.int64).copy(),
                                        np.frombuffer(raw[1], dtype=np.float32).copy())
        return got

    def scores(self, query: str, n_rows: int) -> np.ndarray:
        """BM25 score of every row below ``n_rows`` (0 where no query term occurs)."""
        scores = np.zeros(n_rows, dtype=np.float32)
        if self.docs == 0:
            return scores
        avgdl = self.total_len / self.docs or 1.0
        for term, qtf in Counter(tokenize(query)).items():
            posting = self._posting(term)
            if posting is None:
                continue
            rows, tfs = posting
            keep = rows < n_rows
            rows, tfs = rows[keep], tfs[keep]
            df = rows.size
            if df == 0:
                continue
            idf = math.log(1.0 + (self.docs - df + 0.5) / (df + 0.5))
            denom = tfs + K1 * (1.0 - B + B * self.doc_len[rows] / avgdl)
            scores[rows] += float(idf * min(qtf, 2)) * tfs * (K1 + 1.0) / denom
        return scores

    def exact_rows(self, names: set[str], paths: set[str], n_rows: int) -> list[int]:
        """Rows whose name is one the question names, or whose file path ends with a path it names."""
        found: list[int] = []
        for name in names:
            found.extend(self.by_name.get(name, ()))
        for want in paths:
            for path, rows in self.by_path.items():
                if path == want or path.endswith("/" + want):
                    found.extend(rows)
        return [r for r in dict.fromkeys(found) if r < n_rows]
