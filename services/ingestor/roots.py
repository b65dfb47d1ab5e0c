"""Where ingest may read: only under its roots (issue 13 item 8).

The roots are the directory ``make up`` was run from (``ingest_home``, set by ``batos.ctl up``; the
ingestor's own working directory when unset) plus those listed in ``ingest_roots`` (comma or
``os.pathsep`` separated). Every path is resolved (``~``, ``..`` and symlinks) before the containment
check, so ``/etc``, ``~root`` or a symlink planted under a root that points elsewhere are refused.
The check runs here, in the ingestor, the process that reads the files.
"""

from __future__ import annotations

import os
import re
import stat
from typing import Any

from batos.errors import ServiceError
from proto import ErrorCode


def allowed(settings: Any) -> list[str]:
    """The resolved roots, the home first."""
    home = settings.ingest_home or os.getcwd()
    extra = re.split(rf"[,{re.escape(os.pathsep)}]", settings.ingest_roots)
    roots: list[str] = []
    for p in [home, *extra]:
        if p.strip():
            real = os.path.realpath(os.path.expanduser(p.strip()))
            if real not in roots:
                roots.append(real)
    return roots


def within(path: str, root: str) -> bool:
    """``path`` (resolved) is ``root`` or below it."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def check(path: str, roots: list[str]) -> str:
    """The resolved ``path`` if it lies under a root and is a regular file or a directory; else ``bad_args``
    (``not_found`` when nothing is there) saying what was refused and why."""
    real = os.path.realpath(os.path.expanduser(path))
    if not any(within(real, r) for r in roots):
        shown = f"{path} (resolves to {real})" if real != path else path
        raise ServiceError(ErrorCode.BAD_ARGS,
                           f"ingest refused {shown}: outside the ingest roots {', '.join(roots)} "
                           "(add a root with the setting BATOS_INGEST_ROOTS)")
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        raise ServiceError(ErrorCode.NOT_FOUND, f"no such file or directory: {path}") from None
    except OSError as e:
        raise ServiceError(ErrorCode.BAD_ARGS, f"ingest refused {path}: cannot read it ({e.strerror})") from None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise ServiceError(ErrorCode.BAD_ARGS,
                           f"ingest refused {path}: a special file ({special_kind(mode)}), not a file or directory")
    return real


def special_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"
