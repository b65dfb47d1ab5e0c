"""The Memory Weaver: the `memory` service's logic, usable without the broker.

Each command takes its typed request (proto/bodies/memory.py, checked once at the worker boundary), does
CPU work (embedding) in a thread
outside any transaction, then runs one short transaction on an Image thread (store.py).
Searches run on one dedicated connection thread (a Lane) that owns the in-memory vector
matrix, so the matrix always matches the snapshot of the connection that reads the hits.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import msgspec
import numpy as np
from ZODB.POSException import ConflictError
from ZODB.utils import p64

from batos import paging
from batos.errors import ServiceError
from batos.image import Image, Lane
from proto import ErrorCode
from proto.bodies import memory as M

from . import hybrid, render, store
from .embedder import EmbeddingCancelled, TextEmbedder
from .lexical import LexDoc
from .vectors import LEVEL_CHUNK, LEVEL_CODES, LEVEL_FRACTAL, LEVEL_NAMES, LEVEL_SUMMARY, VectorIndex, VectorStore

log = logging.getLogger(__name__)

LEVELS = {
    "summaries": {LEVEL_SUMMARY},
    "chunks": {LEVEL_CHUNK},
    "fractals": {LEVEL_FRACTAL},
    "both": {LEVEL_SUMMARY, LEVEL_CHUNK},
    "all": {LEVEL_SUMMARY, LEVEL_CHUNK, LEVEL_FRACTAL},
}
WRITE_RETRIES = 6  # attempts per write transaction (ConflictError is transient)
QUERY_CACHE = 256  # recent query texts whose vectors are kept (the ReAct loop repeats queries)
RECENT_VECTORS = 8192  # recently embedded texts' vectors by hash (~12 MiB): a retried batch is not re-embedded

Progress = Callable[[int, int], None]


class MemoryWeaver:
    def __init__(self, image: Image, embedder: TextEmbedder, shard_rows: int):
        self.image = image
        self.embedder = embedder
        self.shard_rows = shard_rows
        self.index = VectorIndex()
        self._lane: Lane | None = None
        self._queries: OrderedDict[str, np.ndarray] = OrderedDict()
        self._qlock = threading.Lock()
        self._recent: OrderedDict[str, tuple[np.ndarray, int]] = OrderedDict()
        self._refreshes: set[asyncio.Future[Any]] = set()

    async def start(self) -> float:
        """Create the indexes if missing and load the vector matrix; returns seconds taken."""
        t0 = time.perf_counter()
        dim = self.embedder.dim
        await self.image.transact(lambda root, conn: store.ensure_memory(root, dim, self.shard_rows) and None)
        self._lane = self.image.lane("memory-search")
        await self.image.read(lambda root, conn: self._refresh(root), lane=self._lane)
        return time.perf_counter() - t0

    async def close(self) -> None:
        for task in list(self._refreshes):
            task.cancel()
        if self._lane is not None:
            await self._lane.close()
            self._lane = None

    async def _write(self, fn: Callable[..., Any], *args: Any) -> Any:
        """One write transaction; writers from several processes meet at the tail vector shard, so
        conflicts are expected under concurrent ingestion: retried, then reported as `conflict`."""
        try:
            result = await self.image.transact(fn, *args, retries=WRITE_RETRIES)
        except ConflictError as e:
            raise ServiceError(ErrorCode.CONFLICT, f"memory write lost {WRITE_RETRIES} conflicts; retry: {e}") from None
        self._refresh_soon()
        return result

    def _refresh_soon(self) -> None:
        """Load what this worker just wrote into the search index now, on the search lane, so that the next
        search does not pay for it: during an ingest that refresh (new vector segments and their lexical
        documents) was the largest part of a slow search (up to 30 ms of 60)."""
        if self._lane is None:
            return
        task = asyncio.ensure_future(self.image.read(lambda root, conn: self._refresh(root), lane=self._lane))
        self._refreshes.add(task)
        task.add_done_callback(self._refreshed)

    def _refreshed(self, task: asyncio.Future[Any]) -> None:
        self._refreshes.discard(task)
        if not task.cancelled() and task.exception() is not None:  # the next search refreshes again
            log.warning("search index refresh after a write failed: %s", task.exception())

    # -- embedding ---------------------------------------------------------------------------
    async def _embed(self, texts: list[str], cancelled: threading.Event | None) -> tuple[np.ndarray, list[int]]:
        if not texts:
            return np.zeros((0, self.embedder.dim), dtype=np.float32), []
        try:
            return await asyncio.to_thread(self.embedder.embed, texts, cancelled)
        except EmbeddingCancelled:
            raise ServiceError(ErrorCode.CANCELLED, "cancelled while embedding") from None

    async def _vectors_for(
        self, items: list[M.ChunkIn | M.SummaryIn], reuse: dict[str, tuple[np.ndarray, int]],
        cancelled: threading.Event | None,
    ) -> dict[str, tuple[np.ndarray, int]]:
        """embed-hash -> (vector, windows) for every item, embedding only texts not in ``reuse``."""
        out = dict(reuse)
        todo: dict[str, str] = {}
        for item in items:
            text = store.embed_text_of(item)
            h = store.text_hash(text)
            if h in out:
                continue
            recent = self._recent.get(h)
            if recent is not None:  # embedded lately (a retried batch, a text shared by files)
                out[h] = recent
            else:
                todo[h] = text
        vecs, windows = await self._embed(list(todo.values()), cancelled)
        for (h, _), vec, w in zip(todo.items(), vecs, windows, strict=True):
            out[h] = (vec, w)
            self._recent[h] = (vec, w)
        while len(self._recent) > RECENT_VECTORS:
            self._recent.popitem(last=False)
        return out

    # -- commands ----------------------------------------------------------------------------
    async def replace_files(self, req: M.ReplaceFiles, cancelled: threading.Event | None = None) -> M.ReplaceFilesReply:
        """Several files' replace in ONE transaction (and one embedding batch): ingestion's batches."""
        return M.ReplaceFilesReply(files=await self._replace(req.files, cancelled))

    async def _replace(self, files: list[M.FileIn], cancelled: threading.Event | None) -> list[M.FileReplaced]:
        def before(root: Any, conn: Any) -> list[tuple[Any, dict]]:
            return [(store.file_state(root, f.file_path), store.reusable_vectors(root, f.file_path)) for f in files]

        known = await self.image.read(before)
        results: dict[int, M.FileReplaced] = {}
        todo: list[int] = []
        reuse: dict[str, tuple[np.ndarray, int]] = {}
        for i, (f, (state, vecs)) in enumerate(zip(files, known, strict=True)):
            if state is not None and f.file_hash and state["file_hash"] == f.file_hash:
                results[i] = M.FileReplaced(file_path=f.file_path, chunks=state["chunks"],
                                            summaries=state["summaries"], oids=state["oids"], unchanged=True,
                                            reused_vectors=0)
            else:
                todo.append(i)
                reuse.update(vecs)
        items = [it for i in todo for it in _items(files[i])]
        vectors = await self._vectors_for(items, reuse, cancelled)

        def txn(root: Any, conn: Any) -> list[dict[str, Any]]:
            return [store.replace_file(root, conn, files[i].file_path, files[i].file_hash, files[i].summaries,
                                       files[i].chunks, vectors) for i in todo]

        for i, result in zip(todo, await self._write(txn) if todo else [], strict=True):
            f = files[i]
            reused = sum(1 for it in _items(f) if store.text_hash(store.embed_text_of(it)) in reuse)
            results[i] = M.FileReplaced(**result, unchanged=False, reused_vectors=reused)
        return [results[i] for i in range(len(files))]

    async def file_hashes(self, req: M.FileHashes) -> M.FileHashesReply:
        return M.FileHashesReply(hashes=await self.image.read(lambda root, conn: store.file_hashes(root, req.root)))

    async def delete_file(self, req: M.DeleteFile) -> M.DeleteFileReply:
        return M.DeleteFileReply(deleted=await self._write(lambda root, conn: store.delete_file(root, req.file_path)))

    async def search(self, req: M.Search) -> list[dict[str, Any]]:
        """The ``k`` best hits, ranked (the handler pages them)."""
        mode = req.mode if req.text is not None and req.vector is None else "dense"
        query: np.ndarray | None = None
        if req.vector is not None:
            query = np.asarray(req.vector, dtype=np.float32)
            if query.shape != (self.embedder.dim,):
                raise ServiceError(ErrorCode.BAD_ARGS,
                                   f"vector has {query.size} values; the index has dimension {self.embedder.dim}")
        elif mode != "lexical":
            query = await self._query_vector(req.text or "")
        levels = LEVELS[req.level]
        if req.within is not None:
            levels = levels & {LEVEL_CHUNK} or {LEVEL_CHUNK}  # `within` means the summaries' child chunks
        hits: list[dict[str, Any]] = await self.image.read(self._search_in_txn, query, req, levels, mode,
                                                           lane=self._search_lane())
        return hits

    def _search_lane(self) -> Lane:
        if self._lane is None:
            raise ServiceError(ErrorCode.UNAVAILABLE, "memory weaver is not started")
        return self._lane

    def _refresh(self, root: Any) -> VectorStore:
        vs = store.vector_store(root)
        self.index.refresh(vs)
        for row, oid in self.index.take_missing_lex():  # rows of segments written before they carried documents
            doc = store.lex_doc_of_oid(root, oid, int(self.index.levels[row]))
            if doc is not None:
                with self.index.lock:
                    self.index.lexical.add(row, LexDoc(*doc))
        return vs

    def _search_in_txn(self, root: Any, conn: Any, query: np.ndarray | None, req: M.Search, levels: set[int],
                       mode: hybrid.Mode) -> list:
        vs = self._refresh(root)
        rows = None
        if req.filters.any() or req.within is not None:
            f = req.filters
            oids = store.candidate_oids(root, f.file_path, f.node_type, f.node_name, req.within)
            rows = np.fromiter((r for r in (vs.row(o) for o in oids) if r is not None), dtype=np.int64)
        found = hybrid.search(self.index, query, req.text or "", req.k, levels, rows, mode)
        # A live row's object is live in this same snapshot (unindexing and tombstoning share
        # a transaction), so load the hits directly, all in one prefetch round trip.
        hit_oids = [p64(h.oid) for h in found]
        conn.prefetch(hit_oids)
        out = []
        for o, h in zip(hit_oids, found, strict=True):
            hit = store.render_hit(root, conn.get(o), LEVEL_NAMES[h.level], round(h.score, 6))
            if mode != "dense":
                hit["dense_score"] = round(h.dense, 6)
                hit["channels"] = h.ranks
            out.append(hit)
        return out

    async def _query_vector(self, text: str) -> np.ndarray:
        with self._qlock:
            cached = self._queries.get(text)
            if cached is not None:
                self._queries.move_to_end(text)
                return cached
        vec: np.ndarray
        embed_query = getattr(self.embedder, "embed_query", None)
        if embed_query is not None:  # ahead of any ingest batch in progress (embedder.py)
            vec = await asyncio.to_thread(embed_query, text)
        else:
            vec = (await self._embed([text], None))[0][0]
        with self._qlock:
            self._queries[text] = vec
            while len(self._queries) > QUERY_CACHE:
                self._queries.popitem(last=False)
        return vec

    async def inspect(self, req: M.Inspect) -> M.InspectReply:
        view = await self.image.read(lambda root, conn: render.inspect_object(root, conn, req.oid))
        return msgspec.convert(view, M.InspectReply)

    async def stats(self) -> M.StatsReply:
        def read(root: Any, conn: Any) -> dict[str, Any]:
            vs = store.vector_store(root)
            return {"counts": store.counts(root), "vectors": {"rows": vs.total_rows, "live": vs.live(),
                    "shards": len(vs.shards), "dim": vs.dim, "shard_rows": vs.shard_rows},
                    "storage_bytes": int(conn.db().getSize())}

        out = await self.image.read(read)
        return M.StatsReply(**out, index=self.index.stats())

    async def create_fractals(self, req: M.CreateFractals, cancelled: threading.Event | None = None
                              ) -> M.CreateFractalsReply:
        known = await self.image.read(lambda root, conn: store.existing_events(root, [e.event_id for e in req.events]))
        fresh = [e for e in req.events if e.event_id not in known]
        vecs, _ = await self._embed([e.summary for e in fresh], cancelled)
        vectors = {e.event_id: v for e, v in zip(fresh, vecs, strict=True)}
        offset = (req.offset.path, req.offset.value) if req.offset else None

        def txn(root: Any, conn: Any) -> M.CreateFractalsReply:
            # fractals are never deleted, so `known` stays known; a fresh event another writer
            # stored meanwhile is skipped inside store.create_fractals
            created = store.create_fractals(root, conn, fresh, vectors, offset)
            return M.CreateFractalsReply(created=created, skipped=len(req.events) - created)

        reply: M.CreateFractalsReply = await self._write(txn)
        return reply

    async def audit_offset(self, req: M.AuditOffset) -> M.AuditOffsetReply:
        return M.AuditOffsetReply(value=await self.image.read(lambda root, conn: store.audit_offset(root, req.path)))

    async def query_fractals(self, req: M.QueryFractals, page_bytes: int = paging.PAGE_BYTES
                             ) -> M.QueryFractalsReply:
        """One page (batos.paging): ``fractals`` and ``next``, the cursor to send back as ``after``."""
        page = await self.image.read(lambda root, conn: store.query_fractals(root, req, page_bytes))
        return msgspec.convert(page, M.QueryFractalsReply)


def _items(f: M.FileIn) -> list[M.ChunkIn | M.SummaryIn]:
    """What a file's replace embeds and stores: its summaries, then its chunks."""
    return [*f.summaries, *f.chunks]


__all__ = ["LEVELS", "LEVEL_CODES", "MemoryWeaver"]
