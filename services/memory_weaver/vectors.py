"""Vectors: persisted in the image as append-only shards, served from an in-memory matrix.

Persisted (inside the Living Image, so every memory worker shares them):

- ``VectorStore``: dimension, shard size, the list of shards, ``row_of`` (an LLBTree from
  an object's OID to its global row), a live-row counter.
- ``VectorShard``: up to ``shard_rows`` rows as a tuple of immutable ``VectorSegment``s
  (one per committing transaction: appending never rewrites earlier rows) plus ``dead``,
  the tombstoned offsets. A shard that fills up is compacted into one segment, so a cold
  start loads a few large records instead of one per commit (one object per vector made a
  100k cold load take 30-60 s; shards of ~1,000 rows load in ~1 s).
- ``VectorSegment``: float32 rows (L2-normalised), their OIDs (uint64) and levels (uint8).

In memory (``VectorIndex``): one float32 matrix in which global row ``r`` is matrix row
``r``. ``refresh(store)`` runs at the start of each search transaction: every shard whose
``_p_serial`` differs from the one cached is re-read (ZEO invalidations ghost exactly
the shards another process changed; unchanged shards sit in the connection cache and
cost nothing), and within a shard only segments not yet loaded are copied. So two memory
processes searching after a commit agree.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import persistent
from BTrees.Length import Length
from BTrees.LLBTree import LLBTree

from .lexical import LexDoc, LexicalIndex

LEVEL_CHUNK, LEVEL_SUMMARY, LEVEL_FRACTAL = 0, 1, 2
LEVEL_NAMES = {LEVEL_CHUNK: "chunk", LEVEL_SUMMARY: "summary", LEVEL_FRACTAL: "fractal"}
LEVEL_CODES = {name: code for code, name in LEVEL_NAMES.items()}


def normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (cosine similarity becomes a dot product)."""
    v = np.asarray(vectors, dtype=np.float32)
    if v.ndim == 1:
        v = v[None, :]
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return (v / norms).astype(np.float32, copy=False)


class VectorSegment(persistent.Persistent):
    """Immutable rows appended by one transaction, with each row's lexical document (path, name, text)
    so the lexical index loads in the same records as the vectors (None in segments written before it)."""

    lex: tuple[tuple[str, str, str], ...] | None = None

    def __init__(self, vectors: np.ndarray, oids: np.ndarray, levels: np.ndarray,
                 lex: tuple[tuple[str, str, str], ...] | None = None):
        self.n = int(vectors.shape[0])
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32).tobytes()
        self.oids = np.ascontiguousarray(oids, dtype=np.uint64).tobytes()
        self.levels = np.ascontiguousarray(levels, dtype=np.uint8).tobytes()
        if lex is not None:
            if len(lex) != self.n:
                raise ValueError(f"{len(lex)} lexical documents for {self.n} rows")
            self.lex = tuple(lex)

    def arrays(self, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (
            np.frombuffer(self.vectors, dtype=np.float32).reshape(self.n, dim),
            np.frombuffer(self.oids, dtype=np.uint64),
            np.frombuffer(self.levels, dtype=np.uint8),
        )


class VectorShard(persistent.Persistent):
    def __init__(self, index: int, capacity: int):
        self.index = index
        self.capacity = capacity
        self.nrows = 0
        self.segments: tuple[VectorSegment, ...] = ()
        self.dead: frozenset[int] = frozenset()

    @property
    def free(self) -> int:
        return self.capacity - self.nrows


class VectorStore(persistent.Persistent):
    def __init__(self, dim: int, shard_rows: int):
        if dim <= 0 or shard_rows <= 0:
            raise ValueError("dim and shard_rows must be positive")
        self.dim = dim
        self.shard_rows = shard_rows
        self.shards: tuple[VectorShard, ...] = ()
        self.row_of = LLBTree()  # OID (int) -> global row
        self.live = Length(0)

    @property
    def total_rows(self) -> int:
        return self.shards[-1].index * self.shard_rows + self.shards[-1].nrows if self.shards else 0

    def append(self, vectors: np.ndarray, oids: list[int], levels: list[int],
               lex: list[tuple[str, str, str]] | None = None) -> list[int]:
        """Append normalised rows for ``oids`` (and their lexical documents); returns their global rows.
        Inside a transaction."""
        vecs = normalize(vectors)
        if vecs.shape != (len(oids), self.dim) or len(levels) != len(oids):
            raise ValueError(f"expected {len(oids)} vectors of dimension {self.dim}, got {vecs.shape}")
        if lex is not None and len(lex) != len(oids):
            raise ValueError(f"expected {len(oids)} lexical documents, got {len(lex)}")
        oid_arr = np.asarray(oids, dtype=np.uint64)
        lvl_arr = np.asarray(levels, dtype=np.uint8)
        rows: list[int] = []
        replaced = 0
        done = 0
        while done < len(oids):
            shard = self._tail()
            take = min(shard.free, len(oids) - done)
            part = slice(done, done + take)
            seg = VectorSegment(vecs[part], oid_arr[part], lvl_arr[part], None if lex is None else tuple(lex[part]))
            start = shard.index * self.shard_rows + shard.nrows
            shard.segments = (*shard.segments, seg)
            shard.nrows += take
            if shard.free == 0 and len(shard.segments) > 1:
                self._compact(shard)
            for i, oid in enumerate(oids[part]):
                old = self.row_of.get(oid)
                if old is not None:  # re-embedding an object: its earlier row dies
                    self.tombstone_rows([old])
                    replaced += 1
                self.row_of[oid] = start + i
                rows.append(start + i)
            done += take
        self.live.change(len(oids) - replaced)
        return rows

    def _tail(self) -> VectorShard:
        if not self.shards or self.shards[-1].free == 0:
            self.shards = (*self.shards, VectorShard(len(self.shards), self.shard_rows))
        return self.shards[-1]

    def _compact(self, shard: VectorShard) -> None:
        parts = [s.arrays(self.dim) for s in shard.segments]
        lex = None
        if all(s.lex is not None for s in shard.segments):
            lex = tuple(d for s in shard.segments for d in s.lex or ())
        shard.segments = (
            VectorSegment(
                np.concatenate([p[0] for p in parts]),
                np.concatenate([p[1] for p in parts]),
                np.concatenate([p[2] for p in parts]),
                lex,
            ),
        )

    def remove(self, oids: list[int]) -> int:
        """Tombstone the rows of ``oids`` (those that have one); returns how many."""
        rows = [self.row_of.pop(oid) for oid in oids if oid in self.row_of]
        self.tombstone_rows(rows)
        self.live.change(-len(rows))
        return len(rows)

    def tombstone_rows(self, rows: list[int]) -> None:
        by_shard: dict[int, set[int]] = {}
        for row in rows:
            by_shard.setdefault(row // self.shard_rows, set()).add(row % self.shard_rows)
        for index, offsets in by_shard.items():
            shard = self.shards[index]
            shard.dead = shard.dead | offsets

    def row(self, oid: int) -> int | None:
        return self.row_of.get(oid)


@dataclass
class _ShardState:
    serial: bytes = b""
    segment_oids: tuple[bytes, ...] = ()
    loaded_rows: int = 0


@dataclass
class VectorIndex:
    """The in-memory matrix of one process, following the persisted store."""

    dim: int = 0
    shard_rows: int = 0
    matrix: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.float32))
    oids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint64))
    levels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint8))
    alive: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    rows: int = 0
    store_oid: bytes | None = None
    shards: list[_ShardState] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    refreshed_shards: int = 0  # how many shard reloads so far (tests and stats)
    lexical: LexicalIndex = field(default_factory=LexicalIndex)
    missing_lex: list[tuple[int, int]] = field(default_factory=list)  # (row, oid) whose segment has no documents
    _masks: dict[frozenset[int] | None, tuple[np.ndarray, int]] = field(default_factory=dict)

    def refresh(self, store: VectorStore) -> int:
        """Bring the matrix to ``store``'s state in the caller's transaction; returns shards reloaded."""
        with self.lock:
            if store._p_oid != self.store_oid or store.dim != self.dim or store.shard_rows != self.shard_rows:
                self._reset(store)
            changed = 0
            for shard in store.shards:
                shard._p_activate()
                if shard.index < len(self.shards) and self.shards[shard.index].serial == shard._p_serial:
                    continue
                self._load_shard(shard)
                changed += 1
            if changed or self.rows != store.total_rows:
                self._masks.clear()
            self.rows = store.total_rows
            self.refreshed_shards += changed
            return changed

    def _reset(self, store: VectorStore) -> None:
        self.dim, self.shard_rows, self.store_oid = store.dim, store.shard_rows, store._p_oid
        self.shards = []
        self._masks.clear()
        self.lexical.reset()
        self.missing_lex.clear()
        self.matrix = np.zeros((0, self.dim), dtype=np.float32)
        self._ensure_capacity(0)
        self.rows = 0

    def _ensure_capacity(self, rows: int) -> None:
        have = self.matrix.shape[0] if self.matrix.shape[1:] == (self.dim,) else 0
        if have >= rows and have > 0:
            return
        cap = max(rows, self.shard_rows, 2 * have)
        grow = np.zeros((cap, self.dim), dtype=np.float32)
        oids = np.zeros(cap, dtype=np.uint64)
        levels = np.zeros(cap, dtype=np.uint8)
        alive = np.zeros(cap, dtype=bool)
        if have > 0:
            grow[:have], oids[:have], levels[:have], alive[:have] = self.matrix, self.oids, self.levels, self.alive
        self.matrix, self.oids, self.levels, self.alive = grow, oids, levels, alive

    def _load_shard(self, shard: VectorShard) -> None:
        while len(self.shards) <= shard.index:
            self.shards.append(_ShardState())
        state = self.shards[shard.index]
        base = shard.index * self.shard_rows
        self._ensure_capacity(base + shard.capacity)
        seg_oids = tuple(s._p_oid for s in shard.segments)
        if seg_oids[: len(state.segment_oids)] == state.segment_oids and state.segment_oids:
            new_segments = shard.segments[len(state.segment_oids):]  # only the appended ones
            offset = state.loaded_rows
        else:
            new_segments = shard.segments  # first sight or compacted: read it all
            offset = 0
        for seg in new_segments:
            vecs, oids, levels = seg.arrays(self.dim)
            end = base + offset + seg.n
            self.matrix[base + offset:end] = vecs
            self.oids[base + offset:end] = oids
            self.levels[base + offset:end] = levels
            self._load_lex(base + offset, seg, oids)
            offset += seg.n
        alive = self.alive[base:base + shard.capacity]
        alive[:] = False
        alive[:shard.nrows] = True
        if shard.dead:
            alive[np.fromiter(shard.dead, dtype=np.int64)] = False
        state.serial, state.segment_oids, state.loaded_rows = shard._p_serial, seg_oids, offset

    def _load_lex(self, start: int, seg: VectorSegment, oids: np.ndarray) -> None:
        lex = seg.lex
        if lex is None:  # written before segments carried documents: the caller resolves them from objects
            self.missing_lex.extend((start + i, int(o)) for i, o in enumerate(oids) if not self.lexical.has(start + i))
            return
        for i, (path, name, text) in enumerate(lex):
            self.lexical.add(start + i, LexDoc(path, name, text))

    def take_missing_lex(self) -> list[tuple[int, int]]:
        with self.lock:
            out, self.missing_lex = self.missing_lex, []
            return out

    def candidate_mask(self, levels: set[int] | None, rows: np.ndarray | None) -> np.ndarray:
        """Live rows of the wanted levels (and among ``rows`` when given), over the first ``self.rows``."""
        mask, _ = self._mask(levels)
        if rows is None:
            return mask
        cand = np.asarray(rows, dtype=np.int64)
        cand = cand[(cand >= 0) & (cand < self.rows)]
        sub = np.zeros(self.rows, dtype=bool)
        sub[cand] = True
        return sub & mask

    def search(
        self,
        query: np.ndarray,
        k: int,
        levels: set[int] | None = None,
        rows: np.ndarray | None = None,
    ) -> list[tuple[int, int, float]]:
        """Top-k (oid, level, cosine) among live rows, optionally restricted to ``rows``/levels."""
        q = normalize(query)[0]
        if q.shape != (self.dim,):
            raise ValueError(f"query has dimension {q.shape[0]}, the index {self.dim}")
        with self.lock:
            n = self.rows
            if rows is None:
                # Score every row (one BLAS call, no gather copy), then mask the dead and
                # the wrong levels: cheaper than selecting candidates first unless few qualify.
                candidates = None
                mask, live = self._mask(levels)
                scores = np.where(mask, self.matrix[:n] @ q, -np.inf)
            else:
                cand = np.asarray(rows, dtype=np.int64)
                cand = cand[(cand >= 0) & (cand < n)]
                cand = cand[self.alive[cand]]
                if levels is not None:
                    cand = cand[np.isin(self.levels[cand], list(levels))]
                candidates = cand
                scores = self.matrix[candidates] @ q
                live = int(scores.size)
            if live == 0:
                return []
            top = min(k, live)
            idx = np.argpartition(-scores, top - 1)[:top]
            idx = idx[np.argsort(-scores[idx], kind="stable")]
            picked = idx if candidates is None else candidates[idx]
            hits = zip(picked, idx, strict=True)
            return [(int(self.oids[r]), int(self.levels[r]), float(scores[i])) for r, i in hits]

    def _mask(self, levels: set[int] | None) -> tuple[np.ndarray, int]:
        """alive & level mask over the first ``rows`` rows, cached until the next change."""
        key = frozenset(levels) if levels is not None else None
        hit = self._masks.get(key)
        if hit is None:
            mask = self.alive[: self.rows].copy()
            if levels is not None:
                lut = np.zeros(256, dtype=bool)
                lut[list(levels)] = True
                mask &= lut[self.levels[: self.rows]]
            hit = self._masks[key] = (mask, int(np.count_nonzero(mask)))
        return hit

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {"rows": self.rows, "live": int(self.alive[: self.rows].sum()), "dim": self.dim,
                    "shards": len(self.shards), "shard_reloads": self.refreshed_shards,
                    "lexical_docs": self.lexical.docs, "lexical_terms": len(self.lexical._postings)}
