"""Hybrid ranking for memory search: dense, lexical and exact-name channels fused, then reranked.

Channels, each a ranking of the candidate rows (live, of the wanted levels, inside the filters):
- ``dense``: cosine of the query vector (MiniLM) against chunks and summaries;
- ``lexical``: BM25 over code-aware tokens (lexical.py);
- ``exact``: rows whose name is an identifier the question names, or whose file is a path it names,
  ordered by their dense score.
Reciprocal rank fusion (Cormack et al. 2009) adds ``weight / (RRF_K + rank)`` over the channels: it
needs no score calibration between cosine and BM25. The fused top ``RERANK_TOP`` are then reranked
(``rerank``): see bench/retrieval.py and bench/RESULTS.md for the figures that chose each part.
A hit's ``score`` is the final score (fused, raised by the rerank) divided by the best possible (rank 1
in every channel and the full rerank bonus), so hits come back in score order, scores stay in 0..1,
and a caller that merges two hit lists by score (the ReAct loop does) merges like with like;
``dense_score`` keeps the cosine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from .lexical import named_identifiers, tokenize
from .vectors import VectorIndex, normalize

Mode = Literal["hybrid", "dense", "lexical"]
RRF_K = 60  # the constant of the original paper; rank 1 and rank 10 differ by ~14%
CHANNEL_TOP = 100  # rows each channel contributes to the fusion
RERANK_TOP = 30  # fused rows the rerank stage may reorder
# dense counts twice: on the three codebases of bench/retrieval.py (2026-12-06) MRR@10 .505/.624/.649 with
# weight 2 against .503/.601/-- with 1; the lexical channel alone is weaker on two of them
WEIGHTS = {"dense": 2.0, "lexical": 1.0, "exact": 1.0}
ALPHA = 0.0  # > 0: convex fusion with this weight on dense (see convex); 0: reciprocal rank fusion
EXACT_BONUS = 0.1  # convex fusion: added for a row whose name or path the question names
NAME_BONUS = 0.25  # rerank: share of the query's content words found in the row's own name


@dataclass
class Ranked:
    row: int
    oid: int
    level: int
    score: float
    dense: float
    ranks: dict[str, int] = field(default_factory=dict)


def top_rows(scores: np.ndarray, n: int, positive: bool = False) -> np.ndarray:
    """Indices of the ``n`` best finite scores, best first (only scores > 0 when ``positive``)."""
    ok = scores > 0 if positive else np.isfinite(scores)
    live = int(np.count_nonzero(ok))
    if live == 0:
        return np.zeros(0, dtype=np.int64)
    s = np.where(ok, scores, -np.inf)
    take = min(n, live)
    idx = np.argpartition(-s, take - 1)[:take]
    return idx[np.argsort(-s[idx], kind="stable")]


def fuse(rankings: dict[str, np.ndarray]) -> dict[int, float]:
    fused: dict[int, float] = {}
    for channel, rows in rankings.items():
        w = WEIGHTS[channel]
        for rank, row in enumerate(rows.tolist(), start=1):
            fused[row] = fused.get(row, 0.0) + w / (RRF_K + rank)
    return fused


def convex(rankings: dict[str, np.ndarray], dense: np.ndarray, lex: np.ndarray) -> tuple[dict[int, float], float]:
    """Convex combination of min-max normalised scores over the channels' candidates (Bruch et al. 2023):
    ``ALPHA`` x dense + (1 - ``ALPHA``) x BM25, plus ``EXACT_BONUS`` for a row the question names."""
    cand = np.unique(np.concatenate(list(rankings.values())))
    top = dense[rankings["dense"]]
    lo, hi = float(top.min()), float(top.max())
    dn = np.clip((dense[cand] - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    lmax = float(lex[cand].max()) if cand.size else 0.0
    ln = lex[cand] / lmax if lmax > 0 else np.zeros(cand.size, dtype=np.float32)
    score = ALPHA * dn + (1.0 - ALPHA) * ln
    bonus = 0.0
    if "exact" in rankings:
        bonus = EXACT_BONUS
        score = score + EXACT_BONUS * np.isin(cand, rankings["exact"])
    return dict(zip(cand.tolist(), score.tolist(), strict=True)), 1.0 + bonus


def search(index: VectorIndex, query: np.ndarray | None, text: str, k: int, levels: set[int] | None,
           rows: np.ndarray | None, mode: Mode = "hybrid") -> list[Ranked]:
    """The top ``k`` rows for a question (``text``; ``query`` its vector, None in lexical mode)."""
    q = normalize(query)[0] if query is not None else None
    with index.lock:
        n = index.rows
        mask = index.candidate_mask(levels, rows)
        if n == 0 or not mask.any():
            return []
        dense = np.where(mask, index.matrix[:n] @ q, -np.inf) if q is not None else np.zeros(n, dtype=np.float32)
        rankings: dict[str, np.ndarray] = {}
        depth = max(CHANNEL_TOP, k)
        if mode != "lexical":
            rankings["dense"] = top_rows(dense, depth if mode == "hybrid" else k)
        if mode != "dense":
            lex = index.lexical.scores(text, n)
            lex[~mask] = 0.0
            rankings["lexical"] = top_rows(lex, depth, positive=True)
        if mode == "hybrid":
            names, paths = named_identifiers(text)
            exact = [r for r in index.lexical.exact_rows(names, paths, n) if mask[r]] if names or paths else []
            if exact:
                ex = np.asarray(exact, dtype=np.int64)
                rankings["exact"] = ex[np.argsort(-dense[ex], kind="stable")][:depth]
        if mode == "dense":
            picked = rankings["dense"]
            return [Ranked(int(r), int(index.oids[r]), int(index.levels[r]), float(dense[r]), float(dense[r]))
                    for r in picked]
        if ALPHA > 0 and mode == "hybrid" and q is not None:
            fused, best = convex(rankings, dense, lex)
        else:
            fused = fuse(rankings)
            best = sum(WEIGHTS[c] for c in rankings) / (RRF_K + 1)
        order = sorted(fused, key=lambda r: -fused[r])
        # the rerank raises the top rows' scores (never lowers one), so a row beyond the top stays below
        # them, and the returned score orders the hits as returned: callers may merge hit lists by score
        fused.update(rerank(index, text, order[:RERANK_TOP], fused))
        best *= 1.0 + NAME_BONUS
        order = sorted(fused, key=lambda r: -fused[r])
        out = []
        for r in order[:k]:
            ranks = {c: int(np.flatnonzero(v == r)[0]) + 1 for c, v in rankings.items() if r in v}
            out.append(Ranked(r, int(index.oids[r]), int(index.levels[r]), round(fused[r] / best, 6),
                              float(dense[r]) if q is not None else 0.0, ranks))
        return out


def rerank(index: VectorIndex, text: str, rows: list[int], fused: dict[int, float]) -> dict[int, float]:
    """New scores for the fused top rows by a structural cue: a row whose own name (the definition it
    holds) shares words with the question gains ``NAME_BONUS`` x the top score x the share of the
    question's words it covers."""
    words = set(tokenize(text))
    if not words or not rows or NAME_BONUS == 0:
        return {}
    names = index.lexical.names
    top = max(fused[r] for r in rows)
    out = {}
    for r in rows:
        name = names.get(r, "")
        shared = len(words & set(tokenize(name))) if name else 0
        out[r] = fused[r] + NAME_BONUS * top * shared / len(words)
    return out
