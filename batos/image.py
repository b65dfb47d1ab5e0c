"""The Living Image from asyncio: a ZEO client DB whose connections are owned by threads.

ZODB connections must stay in one thread, and touching a persistent object may block on
the network, so asyncio code never touches them. Every unit of work runs on a thread that
owns one connection and one ``TransactionManager(explicit=True)`` (which raises if an
object changes outside begin/commit); the loop awaits a future.

- ``transact(fn, *args)``: fn(root, conn) in a fresh transaction on a pool thread,
  committed; ConflictError (transient) retried via ``tm.attempts(retries)``.
- ``read(fn, *args)``: the same, always aborted.
- ``session()``: a thread of its own holding one transaction open across awaits (the
  kernel's REASONING state): ``run`` as often as needed, then ``commit`` or ``abort``.
- ``lane()``: a dedicated thread for ``transact``/``read`` (e.g. one searcher whose
  in-memory index must follow one connection's snapshot).

Clients use ``server_sync=True``: each transaction begins with a server round trip, so a
transaction that starts after another process's commit returned always sees it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import transaction
import ZODB
from ZODB.POSException import ConflictError

from batos.uvm import awaken

log = logging.getLogger(__name__)

T = TypeVar("T")
Work = Callable[..., Any]  # fn(root, conn, *args)
# a connection thread's queue: (future, work) pairs, then None to stop
Jobs = queue.SimpleQueue["tuple[Future[Any], Callable[[_ConnThread], Any]] | None"]

POOL_THREADS = 2  # each thread holds a connection (and its object cache); 2 cores
OPEN_TIMEOUT = 30.0  # seconds to wait for the ZEO server at open()
DB_OPEN_ATTEMPTS = 3


class ImageClosed(RuntimeError):
    pass


class _ConnThread:
    """One thread, one connection, one explicit TransactionManager; runs jobs from a queue."""

    _ids = itertools.count(1)

    def __init__(self, db: ZODB.DB, jobs: Jobs, name: str):
        self.db = db
        self.jobs = jobs
        self.tm = transaction.TransactionManager(explicit=True)
        self.conn: Any = None
        self._ready = threading.Event()
        self._open_error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name=f"{name}-{next(self._ids)}", daemon=True)
        self.thread.start()
        self._ready.wait()
        if self._open_error is not None:
            raise self._open_error

    def _main(self) -> None:
        try:
            self.conn = self.db.open(transaction_manager=self.tm)
        except BaseException as e:  # reported to the constructor
            self._open_error = e
            self._ready.set()
            return
        self._ready.set()
        try:
            while True:
                job = self.jobs.get()
                if job is None:
                    break
                fut, work = job
                if not fut.set_running_or_notify_cancel():
                    continue
                try:
                    fut.set_result(work(self))
                except BaseException as e:
                    fut.set_exception(e)
        finally:
            self._abort_quietly()
            try:
                self.conn.close()
            except Exception:
                log.exception("closing a ZODB connection failed")

    def in_transaction(self) -> bool:
        try:
            self.tm.get()
        except transaction.interfaces.NoTransaction:
            return False
        return True

    def _abort_quietly(self) -> None:
        if self.in_transaction():
            try:
                self.tm.abort()
            except Exception:
                log.exception("abort failed")


def _transact_job(fn: Work, args: tuple[Any, ...], retries: int) -> Callable[[_ConnThread], Any]:
    def job(ct: _ConnThread) -> Any:
        ct._abort_quietly()
        result = None
        for attempt in ct.tm.attempts(retries):
            with attempt:
                result = fn(ct.conn.root(), ct.conn, *args)
        return result

    return job


def _read_job(fn: Work, args: tuple[Any, ...]) -> Callable[[_ConnThread], Any]:
    def job(ct: _ConnThread) -> Any:
        ct._abort_quietly()
        ct.tm.begin()
        try:
            return fn(ct.conn.root(), ct.conn, *args)
        finally:
            ct.tm.abort()

    return job


class Lane:
    """A dedicated connection thread: work sent to it always runs on the same connection."""

    def __init__(self, db: ZODB.DB, name: str, registry: list[Lane] | None = None):
        self._jobs: Jobs = queue.SimpleQueue()
        self._thread = _ConnThread(db, self._jobs, name)
        self.closed = False
        self._registry = registry
        if registry is not None:
            registry.append(self)

    def submit(self, work: Callable[[_ConnThread], T]) -> asyncio.Future[T]:
        if self.closed:
            raise ImageClosed("this connection thread is closed")
        fut: Future[T] = Future()
        self._jobs.put((fut, work))
        return asyncio.wrap_future(fut)

    def close_nowait(self) -> None:
        if not self.closed:
            self.closed = True
            self._jobs.put(None)
            if self._registry is not None and self in self._registry:
                self._registry.remove(self)

    async def close(self) -> None:
        self.close_nowait()
        await asyncio.to_thread(self._thread.thread.join, 10.0)


class Session:
    """A transaction spanning awaits, on one dedicated thread + connection."""

    def __init__(self, db: ZODB.DB, registry: list[Lane] | None = None):
        self._lane = Lane(db, "zodb-session", registry)

    async def run(self, fn: Work, *args: Any) -> Any:
        """fn(root, conn, *args) inside this session's transaction (begun on first use)."""

        def job(ct: _ConnThread) -> Any:
            if not ct.in_transaction():
                ct.tm.begin()
            return fn(ct.conn.root(), ct.conn, *args)

        return await self._lane.submit(job)

    async def commit(self) -> None:
        """Commit (raises ConflictError if another writer won; the transaction is then aborted)."""

        def job(ct: _ConnThread) -> None:
            if not ct.in_transaction():
                return
            try:
                ct.tm.commit()
            except BaseException:
                ct._abort_quietly()
                raise

        await self._lane.submit(job)

    async def abort(self) -> None:
        await self._lane.submit(lambda ct: ct._abort_quietly())

    async def close(self) -> None:
        """Abort anything pending and release the connection."""
        if not self._lane.closed:
            await self._lane.close()

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def make_client_storage(settings: Any, addr: Any = None, wait_timeout: float = OPEN_TIMEOUT) -> Any:
    """A ZEO client storage for ``settings`` (or an explicit address, e.g. a test server's).

    ``RestartSafeClientStorage``, not ZEO's own: the stock one keeps oids preallocated from a
    server that then restarts and hands them out again (objects sharing an oid; issue 14).
    """
    from ZEO.ClientStorage import ClientStorage

    from batos.zeo_client import RestartSafeClientStorage

    address = addr if addr is not None else settings.zeo_client_address
    # The client-side blob cache (blobs downloaded from the server; ZEO lets processes on one host
    # share it). Under var/ so an installation (or a test's temp dir) keeps it with its image.
    blob_dir = Path(settings.var_dir) / "blob_cache" / _addr_label(address)
    blob_dir.mkdir(parents=True, exist_ok=True)
    # ZODB creates <blob_dir>/tmp and the layout marker with check-then-create; two processes starting
    # together (kernel and memory share this cache) race on both, and the loser dies. Create them first,
    # the marker atomically, with the layout ZEO uses for a client cache.
    (blob_dir / "tmp").mkdir(exist_ok=True)
    marker = blob_dir / ".layout"
    if not marker.exists():
        staged = blob_dir / f".layout.{os.getpid()}.{threading.get_ident()}"  # unique per opener
        staged.write_text("zeocache")
        staged.replace(marker)
    cls = RestartSafeClientStorage if settings.zeo_restart_safe else ClientStorage
    return cls(
        address,
        blob_dir=str(blob_dir),
        shared_blob_dir=False,
        blob_cache_size=settings.blob_cache_size,
        wait=True,
        wait_timeout=wait_timeout,
        server_sync=True,
    )


def _addr_label(address: Any) -> str:
    text = f"{address[0]}_{address[1]}" if isinstance(address, tuple) else str(address)
    return "".join(c if c.isalnum() else "_" for c in text)


class Image:
    """One ZEO client DB per process; all access through owned threads."""

    def __init__(
        self,
        settings: Any,
        *,
        addr: Any = None,
        storage_factory: Callable[[], Any] | None = None,
        pool_threads: int = POOL_THREADS,
        do_awaken: bool = True,
    ):
        self.settings = settings
        self._addr = addr
        self._storage_factory = storage_factory
        self._pool_threads = pool_threads
        self._do_awaken = do_awaken
        self.db: ZODB.DB | None = None
        self._jobs: Jobs = queue.SimpleQueue()
        self._pool: list[_ConnThread] = []
        self._lanes: list[Lane] = []

    async def open(self) -> Image:
        self.db = await asyncio.to_thread(self._open_db)
        self._pool = [_ConnThread(self.db, self._jobs, "zodb-pool") for _ in range(self._pool_threads)]
        if self._do_awaken:
            await self.transact(lambda root, conn: awaken(root))
        return self

    def _open_db(self) -> ZODB.DB:
        for attempt in range(DB_OPEN_ATTEMPTS):
            factory = self._storage_factory or (lambda: make_client_storage(self.settings, self._addr))
            storage = factory()
            try:
                return ZODB.DB(storage, cache_size=self.settings.zodb_cache_size,
                               cache_size_bytes=self.settings.zodb_cache_bytes)
            except ConflictError:
                # ZODB.DB() creates the root of a brand-new image; two processes starting together
                # (kernel and memory at `make up`) both try, and the loser gets a conflict on oid 0.
                # The root exists now: open again.
                storage.close()
                if attempt == DB_OPEN_ATTEMPTS - 1:
                    raise
                log.info("another process created the image's root at the same time; opening again")
        raise AssertionError("unreachable")

    async def close(self) -> None:
        for lane in list(self._lanes):
            await lane.close()
        for _ in self._pool:
            self._jobs.put(None)
        for ct in self._pool:
            await asyncio.to_thread(ct.thread.join, 10.0)
        self._pool.clear()
        if self.db is not None:
            db, self.db = self.db, None
            await asyncio.to_thread(db.close)

    async def __aenter__(self) -> Image:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _submit(self, work: Callable[[_ConnThread], T], lane: Lane | None) -> asyncio.Future[T]:
        if lane is not None:
            return lane.submit(work)
        if self.db is None:
            raise ImageClosed("the image is not open")
        fut: Future[T] = Future()
        self._jobs.put((fut, work))
        return asyncio.wrap_future(fut)

    async def transact(self, fn: Work, *args: Any, retries: int = 3, lane: Lane | None = None) -> Any:
        """fn(root, conn, *args) in its own transaction, committed; ConflictError retried."""
        if retries < 1:
            raise ValueError("retries must be >= 1")
        return await self._submit(_transact_job(fn, args, retries), lane)

    async def read(self, fn: Work, *args: Any, lane: Lane | None = None) -> Any:
        """fn(root, conn, *args) against a fresh snapshot; never committed."""
        return await self._submit(_read_job(fn, args), lane)

    def session(self) -> Session:
        if self.db is None:
            raise ImageClosed("the image is not open")
        return Session(self.db, self._lanes)

    def lane(self, name: str = "zodb-lane") -> Lane:
        if self.db is None:
            raise ImageClosed("the image is not open")
        return Lane(self.db, name, self._lanes)


__all__ = ["ConflictError", "Image", "ImageClosed", "Lane", "Session", "make_client_storage"]
