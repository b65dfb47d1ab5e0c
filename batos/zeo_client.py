"""A ZEO ClientStorage that stays correct when the ZEO server restarts under it.

The stock ``ZEO.ClientStorage`` fetches new object ids from the server in batches of 100
(``new_oids``) and keeps the unused ones in ``_oids`` for the life of the process. The
server's FileStorage only remembers the largest oid that was *committed*: after a restart
(``kill -9`` or a graceful one alike) it hands out again every id that was preallocated but
not yet committed. A client that kept its old batch then gives the same id to two new
objects, either in two processes (the second commit is a conflict, or its cache already
holds the other object: "A different object already has the same oid") or inside ONE
transaction, where ZODB silently keeps only the last object added under the id: a lost
object, and every reference to it now pointing at another (a cross-linked index).
``tests/faults/test_zeo_oids.py`` reproduces both with the stock class.

``RestartSafeClientStorage`` closes it on the client side:

- every (re)connect and disconnect drops the preallocated ids, and a batch that was asked
  of one server but arrives after a reconnect is discarded, so ids only ever come from the
  server that is up now;
- it never hands out an id at or below the highest one it handed out before: a transaction
  that took ids from the old server and goes on after the restart (ZODB's Connection files
  new objects in a dict by oid, so a repeated id silently drops the first object before the
  storage ever sees it) gets ids the new server has not handed out to this process yet.
  Asking for those also moves the new server's counter past them, for every other client.

One window stays open for a client that is not this one: another process that fetched a batch
from the new server *before* this process moved the counter past its old ids. The server then
rejects the second commit of an id as a conflict (FileStorage checks committed oids), which
ZODB retries; ``batos.zeo_storage`` closes the window on the server side.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from ZEO.ClientStorage import ClientStorage
from ZODB.utils import u64, z64

log = logging.getLogger(__name__)


class RestartSafeClientStorage(ClientStorage):  # type: ignore[misc]  # ZEO ships no type information
    """``ClientStorage`` whose oids never repeat, whatever the server forgot in a restart."""

    _oids: list[bytes]  # ClientStorage's preallocated oids
    _oid_high: bytes

    def __init__(self, *args: Any, **kwargs: Any):
        self._oids_lock = threading.Lock()  # new_oid from many connection threads: one at a time
        self._oid_high = z64  # the highest oid this client has handed out
        super().__init__(*args, **kwargs)

    def notify_connected(self, conn: Any, info: Any) -> None:
        dropped = len(self._oids)
        self._oids = []  # ids from the previous server may be handed out again by this one
        if dropped:
            log.info("ZEO (re)connected: dropped %d oids preallocated from the previous connection", dropped)
        super().notify_connected(conn, info)

    def notify_disconnected(self) -> None:
        self._oids = []
        super().notify_disconnected()

    def new_oid(self) -> bytes:
        with self._oids_lock:
            skipped = 0
            while True:
                while self._oids:
                    oid = self._oids.pop()
                    if oid > self._oid_high:
                        if skipped:
                            log.warning("ZEO server handed out %d oids this client had already used (it "
                                        "restarted and forgot them); skipped past them", skipped)
                        self._oid_high = oid
                        return oid
                    skipped += 1
                generation = self._connection_generation
                batch = self._call("new_oids")  # raises ClientDisconnected while there is no server
                if generation == self._connection_generation:
                    self._oids[:0] = reversed(batch)
                # else the server went away (and maybe came back) during the call: ask again.

    @property
    def highest_oid_handed_out(self) -> int:
        high: int = u64(self._oid_high)
        return high


__all__ = ["RestartSafeClientStorage"]
