"""Where ingest may read: only under its roots (issue 13 item 8).

The roots are the directory ``make up`` was run from (``ingest_home``, set by ``batos.ctl up``; the
ingestor's own working directory when unset) plus those listed in ``ingest_roots`` (comma or
``os.pathsep`` separated). Every path is resolved (``~``, ``..`` and symlinks) before the containment
check, so ``/etc``, ``~root`` or a symlink planted under a root that points elsewhere are refused.
The check runs here, in the ingestor, the process that reads the files.

Checking a path and then opening it by name would race: a directory under a root that another user can
write could be swapped for a symlink to ``/etc`` in between. So files are opened with :func:`open_beneath`:
from a descriptor of the root, one component at a time, none of them followed if it is a symlink
(``O_NOFOLLOW`` with ``dir_fd``). A path that changed after the check fails to open and is refused.
"""

from __future__ import annotations

import errno
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


def root_of(real: str, roots: list[str]) -> str:
    """The root ``real`` (a resolved path that passed :func:`check`) lies under."""
    for root in roots:
        if within(real, root):
            return root
    raise ServiceError(ErrorCode.BAD_ARGS, f"{real} is outside the ingest roots {', '.join(roots)}")


class OutsideRoot(PermissionError):
    """The file resolves outside its root (a symlink, or a path changed since it was checked)."""


def resolve_within(path: str, root: str) -> str:
    """``path`` with every symlink resolved, if that stays under ``root``; else :class:`OutsideRoot`."""
    real = os.path.realpath(path)
    if not within(real, root):
        raise OutsideRoot(f"{path} resolves to {real}, outside the ingest root {root}")
    return real


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_beneath(root: str, path: str, flags: int) -> int:
    """A descriptor for ``path`` opened from ``root`` downwards without following any symlink.

    The resolved path is opened one component at a time relative to the previous directory's descriptor
    with ``O_NOFOLLOW``: a component swapped for a symlink after :func:`resolve_within` fails the open
    (ELOOP / ENOTDIR, raised as :class:`OutsideRoot`) instead of reading what it points to."""
    real = resolve_within(path, root)
    rel = os.path.relpath(real, root)
    parts = [] if rel == os.curdir else rel.split(os.sep)
    if not parts:
        raise IsADirectoryError(errno.EISDIR, "the ingest root itself is not a file", path)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
        return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise OutsideRoot(f"{path} changed into a symlink after it was checked: not read") from None
        raise
    finally:
        os.close(fd)


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
