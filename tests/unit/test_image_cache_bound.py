"""Issue 14 item 10: a process's ZODB object caches are bounded in bytes, not only in objects.

With ``cache_size`` (objects) alone, a connection that reads the whole image keeps all of it: bench/rss.py found
a 110k-line image (11,404 objects) held whole by one connection, 63 MiB by ZODB's estimate, ~140 MiB of RSS,
in each connection of each worker. ``settings.zodb_cache_bytes`` caps each connection's cache.
"""

from __future__ import annotations

from typing import Any

import pytest
from persistent.mapping import PersistentMapping
from ZODB.MappingStorage import MappingStorage

from batos.config import load
from batos.image import Image

OBJECTS = 300
OBJECT_BYTES = 8 * 1024  # 300 x 8 KiB: ~2.4 MB of state, well over the bound below
BOUND = 512 * 1024


def write_all(root: Any, conn: Any) -> None:
    for i in range(OBJECTS):
        root[f"o{i}"] = PersistentMapping(text="x" * OBJECT_BYTES, n=i)


def read_all(root: Any, conn: Any) -> int:
    return sum(root[f"o{i}"]["n"] for i in range(OBJECTS))


def cache_bytes(root: Any, conn: Any) -> int:
    """What the connection's cache holds (ZODB's estimate) at the start of a transaction."""
    return int(conn._cache.total_estimated_size)


async def cache_after_reading_everything(tmp_path: Any, bound: int) -> int:
    settings = load(var_dir=tmp_path, zodb_cache_bytes=bound)
    image = Image(settings, storage_factory=MappingStorage, pool_threads=1, do_awaken=False)
    await image.open()
    try:
        await image.transact(write_all)
        assert await image.transact(read_all) == OBJECTS * (OBJECTS - 1) // 2
        return int(await image.transact(cache_bytes))
    finally:
        await image.close()


def test_default_settings_bound_the_cache_in_bytes(tmp_path: Any) -> None:
    assert 0 < load(var_dir=tmp_path).zodb_cache_bytes <= 256 * 1024 * 1024


@pytest.mark.parametrize("bound", [0, BOUND])
async def test_a_connection_keeps_at_most_the_bound(tmp_path: Any, bound: int) -> None:
    held = await cache_after_reading_everything(tmp_path, bound)
    if bound == 0:  # the object count alone (100,000) lets the connection keep every object it read
        assert held > OBJECTS * OBJECT_BYTES
    else:  # ZODB evicts at transaction boundaries down to the byte target
        assert held <= bound
