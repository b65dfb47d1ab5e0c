"""The ``ingest`` flow: walk → chunk (thread) → memory, overlapped, incremental, with progress.

Files are chunked one at a time in a worker thread while earlier files' batches are in flight to
memory (at most ``MAX_IN_FLIGHT`` calls at once), so a run proceeds at about the embedding rate.
A batch is one ``replace_files`` call (one transaction, one embedding batch on memory's side) of up
to ``BATCH_CHUNKS`` chunks.

Incremental: a file whose sha256 equals memory's ``file_hashes`` entry is not even decoded; a
changed file is swapped atomically by memory; a file memory holds under the path that is gone (or
now skipped) is deleted with ``delete_file``. Progress goes to the requester only: CHUNKING and
INDEXING events (throttled), COMPLETE, then the summary reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from batos.errors import ServiceError
from proto import ErrorCode
from proto.bodies import memory as M
from services.ingestor import walker
from services.ingestor.files import Outcome, chunk_file, classify
from services.ingestor.model import FileChunks

MAX_IN_FLIGHT = 3  # memory calls at once: enough to keep its embedder busy, few enough to bound memory use
BATCH_CHUNKS = 64  # ~2-3 s of embedding on 2 CPU cores per call: progress stays lively
BATCH_FILES = 32
PROGRESS_INTERVAL = 0.5  # seconds between progress events of one stage
CALL_TIMEOUT_BASE = 120.0  # seconds for a memory call, plus CALL_TIMEOUT_PER_CHUNK for each chunk in it
CALL_TIMEOUT_PER_CHUNK = 1.0
FATAL_CODES = frozenset({ErrorCode.UNAVAILABLE, ErrorCode.UNKNOWN_SERVICE, ErrorCode.CANCELLED})

Emit = Callable[..., Awaitable[None]]
RunBlocking = Callable[..., Awaitable[Any]]


class MemoryClient:
    """The calls ingestion makes to ``memory``, with its typed bodies (anything with batos.client's ``request``)."""

    def __init__(self, client: Any):
        self.client = client

    async def file_hashes(self, root: str) -> dict[str, str]:
        reply = await self.client.request(M.FileHashes(root=root), timeout=CALL_TIMEOUT_BASE)
        return {p: h for p, h in reply.hashes.items() if p == root or p.startswith(root.rstrip(os.sep) + os.sep)}

    async def replace(self, batch: list[FileChunks]) -> None:
        n = sum(len(f.chunks) + len(f.summaries) for f in batch)
        timeout = CALL_TIMEOUT_BASE + CALL_TIMEOUT_PER_CHUNK * n
        try:  # memory's own request type checks the batch here, before it travels
            body = msgspec.convert({"files": [f.payload(with_context_header=True) for f in batch]}, M.ReplaceFiles)
        except msgspec.ValidationError as e:
            raise ServiceError(ErrorCode.BAD_ARGS, f"memory.replace_files: {e}") from None
        await self.client.request(body, timeout=timeout, idempotent=True)

    async def delete(self, path: str) -> None:
        await self.client.request(M.DeleteFile(file_path=path), timeout=CALL_TIMEOUT_BASE, idempotent=True)


@dataclass
class _Progress:
    emit: Emit
    files_total: int
    started: float = field(default_factory=time.monotonic)
    last: dict[str, float] = field(default_factory=dict)

    async def send(self, stage: str, files_done: int, chunks: int, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last.get(stage, 0.0) < PROGRESS_INTERVAL:
            return
        self.last[stage] = now
        elapsed = max(now - self.started, 1e-6)
        files_rate = files_done / elapsed
        eta = (self.files_total - files_done) / files_rate if files_rate > 0 else None
        await self.emit("progress", stage=stage, files_done=files_done, files_total=self.files_total,
                        chunks=chunks, rate=round(chunks / elapsed, 2), eta_s=None if eta is None else round(eta, 1))


@dataclass
class _Run:
    """Counters of one ingest run; ``reply()`` is the request's answer."""

    root: str
    files: int = 0
    chunks: int = 0
    summaries: int = 0
    lines: int = 0
    unchanged: int = 0
    removed: int = 0
    unsupported: int = 0  # files of other types under the path (not counted as skipped)
    skipped: Counter[str] = field(default_factory=Counter)
    errors: list[dict[str, str]] = field(default_factory=list)
    chunked_files: int = 0
    chunked_chunks: int = 0
    refused: list[dict[str, str]] = field(default_factory=list)

    def reply(self, seconds: float) -> dict[str, Any]:
        return {"root": self.root, "files": self.files, "chunks": self.chunks, "summaries": self.summaries,
                "lines": self.lines, "skipped": sum(self.skipped.values()), "skipped_by_reason": dict(self.skipped),
                "unchanged": self.unchanged, "removed": self.removed, "unsupported": self.unsupported,
                "errors": self.errors, "refused": self.refused,
                "seconds": round(seconds, 3)}


async def _default_run_blocking(fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args)


async def ingest(path: str, *, client: Any, emit: Emit, max_chunk_tokens: int, max_file_bytes: int,
                 cancelled: threading.Event | None = None, run_blocking: RunBlocking = _default_run_blocking,
                 use_unparse: bool = False, beneath: str | None = None) -> dict[str, Any]:
    """Ingest ``path`` (a file or a directory tree) into memory; returns the summary reply. ``beneath``: the
    ingest root every file is opened from without following symlinks (services.ingestor.roots)."""
    started = time.monotonic()
    cancelled = cancelled or threading.Event()
    root = os.path.realpath(os.path.expanduser(path))
    if not os.path.exists(root):
        raise ServiceError(ErrorCode.NOT_FOUND, f"no such file or directory: {path}")
    memory = MemoryClient(client)
    refused: list[dict[str, str]] = []  # symlinks leaving the root, special files: skipped and reported
    walked: list[str] = await run_blocking(walker.walk, root, refused)
    paths = [p for p in walked if classify(p) is not None]
    known = await memory.file_hashes(root)
    run = _Run(root, unsupported=len(walked) - len(paths), refused=refused)
    progress = _Progress(emit, len(paths))
    sender = _Sender(memory, run, progress)
    present: set[str] = set()  # files that exist and are ingestible now: memory keeps (or gets) them
    try:
        batch: list[FileChunks] = []
        for done, p in enumerate(paths, start=1):
            if cancelled.is_set():
                raise ServiceError(ErrorCode.CANCELLED, "ingest cancelled")
            outcome: Outcome = await run_blocking(_chunk_one, p, max_chunk_tokens, max_file_bytes, known.get(p),
                                                  use_unparse, beneath)
            _account(run, outcome, present)
            if outcome.result is not None:
                batch.append(outcome.result)
                if sum(len(f.chunks) for f in batch) >= BATCH_CHUNKS or len(batch) >= BATCH_FILES:
                    await sender.submit(batch)
                    batch = []
            await progress.send("CHUNKING", done, run.chunked_chunks, force=done == len(paths))
        if batch:
            await sender.submit(batch)
        await sender.drain()
    finally:
        await sender.close()
    for gone in sorted(set(known) - present):
        if cancelled.is_set():
            raise ServiceError(ErrorCode.CANCELLED, "ingest cancelled")
        await memory.delete(gone)
        run.removed += 1
    # every file was dealt with (ingested, unchanged, skipped or failed): the bar ends full
    await progress.send("COMPLETE", progress.files_total, run.chunks, force=True)
    return run.reply(time.monotonic() - started)


def _chunk_one(path: str, max_tokens: int, max_bytes: int, known_hash: str | None, use_unparse: bool,
               beneath: str | None) -> Outcome:
    try:
        return chunk_file(path, max_tokens, max_bytes, known_hash=known_hash, use_unparse=use_unparse,
                          beneath=beneath)
    except Exception as e:  # one bad file never stops the run: it is reported with its error
        return Outcome(path, "skipped", "error", error=f"{type(e).__name__}: {e}")


def _account(run: _Run, outcome: Outcome, present: set[str]) -> None:
    if outcome.status == "skipped":
        run.skipped[outcome.reason] += 1
        if outcome.error:
            run.errors.append({"file_path": outcome.path, "error": outcome.error})
        return
    present.add(outcome.path)
    if outcome.status == "unchanged":
        run.unchanged += 1
        return
    if outcome.error:  # a Python file that did not parse: chunked as line windows, reported
        run.errors.append({"file_path": outcome.path, "error": outcome.error})
    if outcome.result is not None:
        run.chunked_files += 1
        run.chunked_chunks += len(outcome.result.chunks)


class _Sender:
    """Batches in flight to memory, at most MAX_IN_FLIGHT at once; a fatal error stops the run."""

    def __init__(self, memory: MemoryClient, run: _Run, progress: _Progress):
        self.memory = memory
        self.run = run
        self.progress = progress
        self.slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self.tasks: set[asyncio.Task[None]] = set()
        self.fatal: ServiceError | None = None

    async def submit(self, batch: list[FileChunks]) -> None:
        self._raise_fatal()
        await self.slots.acquire()
        self._raise_fatal()
        task = asyncio.create_task(self._send(batch))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _send(self, batch: list[FileChunks]) -> None:
        try:
            await self.memory.replace(batch)
        except ServiceError as e:
            if e.code in FATAL_CODES:
                self.fatal = self.fatal or ServiceError(e.code, f"memory: {e.message}")
                return
            for f in batch:  # the batch is one transaction: none of its files landed
                self.run.errors.append({"file_path": f.file_path, "error": f"memory {e.code}: {e.message}"})
            return
        finally:
            self.slots.release()
        for f in batch:
            self.run.files += 1
            self.run.chunks += len(f.chunks)
            self.run.summaries += len(f.summaries)
            self.run.lines += f.lines
        await self.progress.send("INDEXING", self.run.files + self.run.unchanged, self.run.chunks)

    def _raise_fatal(self) -> None:
        if self.fatal is not None:
            raise self.fatal

    async def drain(self) -> None:
        while self.tasks:
            await asyncio.gather(*list(self.tasks))
        self._raise_fatal()
        await self.progress.send("INDEXING", self.run.files + self.run.unchanged, self.run.chunks, force=True)

    async def close(self) -> None:
        """Cancel what is still in flight (after an error or a cancel); memory rolls those back."""
        for t in list(self.tasks):
            t.cancel()
        for t in list(self.tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
