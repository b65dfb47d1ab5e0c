"""The ZEO server's configuration file (``runzeo -C FILE``).

``runzeo`` has no blob option on its command line, so supervisord starts it with a
config file holding a ``<zeo>`` address section and an ``<oidsafefilestorage>`` section (a
FileStorage that never hands out an oid twice across restarts: ``batos.zeo_storage``) with the
Living Image's path and blob directory. The default address is a unix socket in the owner-only var/
(``batos.transport``): another local user cannot open the image through ZEO.
Usage: ``python -m services.memory_weaver.zeo_conf OUT``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from batos.transport import prepare_socket_dir

# A client stuck between vote and finish holds the commit lock for everyone; after this
# many seconds the server disconnects it and aborts its transaction.
TRANSACTION_TIMEOUT = 60
# Invalidations kept for clients that reconnect; beyond this they drop their whole cache.
INVALIDATION_QUEUE_SIZE = 10_000


def render_zeo_conf(settings: Any) -> str:
    var = Path(settings.var_dir).resolve()
    addr = settings.zeo_client_address  # a unix socket path or (host, port)
    address = addr if isinstance(addr, str) else f"{addr[0]}:{addr[1]}"
    # a FileStorage that never hands out an oid twice across restarts (batos/zeo_storage)
    storage = "oidsafefilestorage" if settings.zeo_restart_safe else "filestorage"
    return (
        "# Written by services.memory_weaver.zeo_conf; regenerate rather than edit.\n"
        "%import batos.zeo_storage\n"
        "<zeo>\n"
        f"  address {address}\n"
        f"  transaction-timeout {TRANSACTION_TIMEOUT}\n"
        f"  invalidation-queue-size {INVALIDATION_QUEUE_SIZE}\n"
        "</zeo>\n"
        f"<{storage}>\n"
        f"  path {var / 'live_image.fs'}\n"
        f"  blob-dir {var / 'blobs'}\n"
        f"</{storage}>\n"
    )


def write_zeo_conf(settings: Any, path: str | Path) -> Path:
    """Write the config to ``path`` (creating var/ and the blob dir); returns the path."""
    out = Path(path)
    var = Path(settings.var_dir).resolve()
    (var / "blobs").mkdir(parents=True, exist_ok=True)
    addr = settings.zeo_client_address
    if isinstance(addr, str):  # a unix socket: only in a directory nobody else can enter (batos.transport)
        prepare_socket_dir(Path(addr), var)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(render_zeo_conf(settings))
    tmp.replace(out)  # atomic: a concurrently starting runzeo never reads half a file
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m services.memory_weaver.zeo_conf OUT", file=sys.stderr)
        return 2
    from batos.config import load

    print(write_zeo_conf(load(), args[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
