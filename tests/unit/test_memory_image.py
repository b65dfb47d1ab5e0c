"""Image: owned connection threads, transact/read/session, retries, two clients agreeing.

Also home of the in-process ZEO fixtures the other test_memory_* files import.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
import ZEO
from ZODB.POSException import ConflictError

from batos.config import load
from batos.image import Image
from batos.uvm import PROTOTYPE_NAMES, UvmObject, oid_hex, resolve_oid


@pytest.fixture
def zeo_addr(tmp_path):
    addr, stop = ZEO.server(path=str(tmp_path / "x.fs"), blob_dir=str(tmp_path / "blobs"))
    yield addr
    stop()


@pytest.fixture
def settings(tmp_path):
    return load(var_dir=tmp_path / "var", cache_dir=tmp_path / "cache", vector_shard_rows=8)


@pytest.fixture
async def image(settings, zeo_addr):
    img = Image(settings, addr=zeo_addr)
    await img.open()
    yield img
    await img.close()


@pytest.fixture
async def image2(settings, zeo_addr):
    """A second client of the same server (as a second process would be)."""
    img = Image(settings, addr=zeo_addr)
    await img.open()
    yield img
    await img.close()


async def test_open_awakens_idempotently(image, image2):
    names = await image.read(lambda root, conn: sorted(root["prototypes"]))
    assert names == sorted(PROTOTYPE_NAMES)
    oids = await image.read(lambda root, conn: {n: oid_hex(p) for n, p in root["prototypes"].items()})
    oids2 = await image2.read(lambda root, conn: {n: oid_hex(p) for n, p in root["prototypes"].items()})
    assert oids == oids2  # the second client's awakening added nothing


async def test_transact_commits_and_other_client_sees_it(image, image2):
    def make(root, conn):
        root["thing"] = root["prototypes"]["traits"].clone("thing", n=1)
        conn.add(root["thing"])
        return oid_hex(root["thing"])

    oid = await image.transact(make)
    assert await image2.read(lambda root, conn: resolve_oid(conn, oid).n) == 1

    def bump(root, conn):
        root["thing"].n += 1

    await image2.transact(bump)
    # server_sync: a transaction begun after the other client's commit sees it
    assert await image.read(lambda root, conn: root["thing"].n) == 2


async def test_read_never_commits(image):
    def mutate(root, conn):
        root["x"] = 1
        return "done"

    assert await image.read(mutate) == "done"
    assert await image.read(lambda root, conn: "x" in root) is False


async def test_work_runs_off_the_loop_thread(image):
    loop_thread = threading.get_ident()
    tid = await image.read(lambda root, conn: threading.get_ident())
    assert tid != loop_thread


async def test_exception_aborts_transaction(image):
    def boom(root, conn):
        root["half"] = 1
        raise ValueError("bad")

    with pytest.raises(ValueError):
        await image.transact(boom)
    assert await image.read(lambda root, conn: "half" in root) is False


async def test_conflict_is_retried(image, image2):
    await image.transact(lambda root, conn: root.__setitem__("counter", UvmObject("c", n=0)))
    calls = {"n": 0}
    gate = asyncio.Event()

    def slow_increment(root, conn):
        calls["n"] += 1
        value = root["counter"].n
        if calls["n"] == 1:
            # let the other client commit a write to the same object meanwhile
            fut = asyncio.run_coroutine_threadsafe(_other_writer(image2, gate), loop)
            fut.result(10)
        root["counter"].n = value + 1

    loop = asyncio.get_running_loop()
    await image.transact(slow_increment)
    assert calls["n"] == 2  # first attempt hit ConflictError and was retried
    assert await image.read(lambda root, conn: root["counter"].n) == 101


async def _other_writer(img, gate):
    def w(root, conn):
        root["counter"].n = 100

    await img.transact(w)


async def test_conflict_surfaces_after_retries(image, image2):
    await image.transact(lambda root, conn: root.__setitem__("c2", UvmObject("c", n=0)))
    loop = asyncio.get_running_loop()

    def always_conflicting(root, conn):
        root["c2"].n += 1
        asyncio.run_coroutine_threadsafe(_bump(image2), loop).result(10)

    with pytest.raises(ConflictError):
        await image.transact(always_conflicting, retries=2)


async def _bump(img):
    def w(root, conn):
        root["c2"].n += 10

    await img.transact(w)


async def test_session_spans_awaits(image, image2):
    session = image.session()
    await session.run(lambda root, conn: root.__setitem__("s", UvmObject("s", v=1)))
    await asyncio.sleep(0)
    await session.run(lambda root, conn: root["s"].set_slot("w", 2))
    assert await image2.read(lambda root, conn: "s" in root) is False  # not committed yet
    await session.commit()
    assert await image2.read(lambda root, conn: root["s"].own_slots()) == {"v": 1, "w": 2}
    await session.run(lambda root, conn: root["s"].set_slot("v", 99))
    await session.abort()
    assert await image2.read(lambda root, conn: root["s"].v) == 1
    await session.close()


async def test_processes_opening_a_brand_new_image_together_all_succeed(settings, tmp_path):
    """Each ZODB.DB() creates the root of an empty image; the losers of that race open again."""
    for attempt in range(3):  # fresh servers: the race is timing-dependent
        addr, stop = ZEO.server(path=str(tmp_path / f"new{attempt}.fs"), blob_dir=str(tmp_path / f"b{attempt}"))
        images = [Image(settings, addr=addr, do_awaken=False, pool_threads=1) for _ in range(4)]
        try:
            await asyncio.gather(*(img.open() for img in images))
            roots = {await img.read(lambda root, conn: root._p_oid) for img in images}
            assert roots == {b"\0" * 8}
        finally:
            for img in images:
                await img.close()
            stop()


def test_bound_heap_applies_on_glibc():
    import platform

    from batos.malloc_tuning import bound_heap

    assert bound_heap(0, 0)  # nothing asked, nothing refused
    if platform.libc_ver()[0] == "glibc":
        assert bound_heap(load().malloc_mmap_threshold, load().malloc_arena_max)
