"""Local transports whose file permissions are the authentication (issue 13 item 7).

With Curve off, the broker listens on ``ipc://<var>/broker.sock`` and ZEO on ``<var>/zeo.sock``: unix
sockets in a directory only the owner can enter (0700, owned by the user running BAT OS). Another local
user cannot reach either socket (``connect`` fails with EACCES at the directory), so no key is needed.
The socket files themselves are made 0600 as well.

TCP stays available as a setting (``BATOS_BROKER_ENDPOINT=tcp://HOST:PORT``, ``BATOS_ZEO_ADDRESS=HOST:PORT``);
without Curve any process that can reach the port (on loopback: every local user) is trusted as a
service. :func:`exposure_warning` says so in the broker's log.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

IPC_PREFIX = "ipc://"
SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux


class TransportError(Exception):
    """A socket cannot be placed where asked: the message says why and what to do."""


def default_broker_endpoint(var_dir: Path) -> str:
    return f"{IPC_PREFIX}{Path(var_dir).resolve() / 'broker.sock'}"


def ipc_path(endpoint: str) -> Path | None:
    """The socket file of an ``ipc://`` endpoint, None for any other transport."""
    return Path(endpoint[len(IPC_PREFIX):]) if endpoint.startswith(IPC_PREFIX) else None


def private_dir(path: Path, *, may_tighten: bool) -> Path:
    """Make sure ``path`` is a real directory owned by this user that nobody else can enter.

    ``may_tighten``: create it and chmod it 0700 (BAT OS's own var dir). Otherwise (a directory the user
    named) it must already be private: BAT OS never changes the mode of a directory it does not own."""
    path = Path(path)
    if may_tighten:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise TransportError(f"{path} does not exist; create it with mode 0700") from None
    if not stat.S_ISDIR(st.st_mode):
        raise TransportError(f"{path} is not a directory (a symlink or a file): sockets go in a real 0700 directory")
    if st.st_uid != os.geteuid():
        raise TransportError(f"{path} belongs to uid {st.st_uid}, not to this user ({os.geteuid()}): "
                             "a socket there is not protected by its permissions")
    if stat.S_IMODE(st.st_mode) & 0o077:
        if not may_tighten:
            raise TransportError(f"{path} is mode {stat.S_IMODE(st.st_mode):04o}: other users could reach a socket "
                                 f"there; `chmod 700 {path}` or put the socket in a directory only you can enter")
        os.chmod(path, 0o700)
    return path


def prepare_socket_dir(socket_file: Path, var_dir: Path) -> None:
    """Before binding a unix socket: its directory is private; the path fits in ``sun_path``."""
    socket_file = Path(socket_file)
    if len(os.fsencode(str(socket_file))) > SUN_PATH_MAX:
        raise TransportError(f"socket path {socket_file} is longer than {SUN_PATH_MAX} bytes (a unix socket limit); "
                             "use a shorter BATOS_VAR_DIR or set the endpoint explicitly")
    parent = socket_file.parent.resolve()
    private_dir(parent, may_tighten=parent == Path(var_dir).resolve())


def restrict_socket(socket_file: Path) -> None:
    """0600 on the socket file itself (connecting needs write permission on it): a second wall."""
    os.chmod(socket_file, 0o600)


def exposure_warning(endpoint: str, curve: bool) -> str | None:
    """What a log should say when the broker is reachable without any authentication."""
    if endpoint.startswith("tcp://") and not curve:
        return (f"broker on {endpoint} without Curve: every process that can reach this port (on loopback: every "
                "local user) may register as a service and call internal commands; use the default ipc:// "
                "endpoint, or set BATOS_CURVE_ENABLED=1 with TCP")
    return None
