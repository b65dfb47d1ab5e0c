"""A FileStorage for the ZEO server that never hands out an object id twice, even across restarts.

ZODB's FileStorage keeps its oid counter in memory only and, when it opens, starts again from the
largest oid that was *committed*. Ids a ZEO server handed out to clients but that were not yet
committed (ClientStorage preallocates them 100 at a time) are handed out again after a restart,
graceful or ``kill -9``: two new objects then share an oid (issue 14; ``tests/faults``).

``OidSafeFileStorage`` reserves oids in blocks of ``RESERVE`` and records the end of the current
block in ``<path>.oids`` (written and fsynced before any id of the block is handed out); on open
it starts past the recorded end. Cost: one small fsync per ``RESERVE`` new oids; a restart skips
at most ``RESERVE`` ids of a 64-bit space.

``runzeo`` uses it through ZConfig: ``%import batos.zeo_storage`` and an ``<oidsafefilestorage>``
section, which takes every key ``<filestorage>`` takes (``component.xml``).
"""

from __future__ import annotations

import os
import threading
from typing import Any

from ZODB.config import BaseConfig
from ZODB.FileStorage import FileStorage
from ZODB.utils import p64, u64

RESERVE = 10_000
OPTIONS = ("blob_dir", "create", "read_only", "quota", "pack_gc", "pack_keep_old")  # <filestorage> keys


class OidSafeFileStorage(FileStorage):  # type: ignore[misc]  # ZODB ships no type information
    def __init__(self, file_name: str, *args: Any, **kwargs: Any):
        self._oid_reserve_lock = threading.Lock()
        super().__init__(file_name, *args, **kwargs)
        self._oid_file = f"{file_name}.oids"
        self._reserved = max(u64(self._oid), _read_mark(self._oid_file))
        self.set_max_oid(p64(self._reserved))  # start past every id an earlier run may have handed out

    def new_oid(self) -> bytes:
        with self._oid_reserve_lock:
            oid: bytes = super().new_oid()
            if u64(oid) > self._reserved:
                self._reserved = u64(oid) + RESERVE
                _write_mark(self._oid_file, self._reserved)
            return oid


def _read_mark(path: str) -> int:
    try:
        with open(path, "rb") as f:
            data = f.read(8)
    except FileNotFoundError:
        return 0
    return u64(data) if len(data) == 8 else 0


def _write_mark(path: str, value: int) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(p64(value))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic: a crash leaves the old mark or the new one, never half of one


class OidSafeFileStorageOpener(BaseConfig):  # type: ignore[misc]  # ZODB ships no type information
    """ZConfig datatype of ``<oidsafefilestorage>``: ZODB's ``<filestorage>`` keys, this class."""

    def open(self) -> OidSafeFileStorage:
        config = self.config
        options = {name: getattr(config, name) for name in OPTIONS if getattr(config, name, None) is not None}
        return OidSafeFileStorage(config.path, **options)
