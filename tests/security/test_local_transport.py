"""Roles with Curve off: the local transport's file permissions are the authentication (issue 13 item 7).

Before: the broker listened on tcp://127.0.0.1:5555, so any local user could register as a service, call
internal commands or answer the kernel's requests. Now the default is ``ipc://<var>/broker.sock`` (and ZEO
``<var>/zeo.sock``) in a 0700 directory: another uid's ``connect`` fails with EACCES. The other uid is
simulated by a forked child that drops to ``nobody`` (needs root, as in CI); a TCP broker, which stays
available as a setting, is the control that shows the same child does get in there.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import sys
from pathlib import Path

import pytest

from batos import transport
from batos.client import Client

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")


def connect_as(uid: int | None, address: str | tuple[str, int]) -> int:
    """errno of ``connect`` from a forked child running as ``uid`` (None: this user); 0 = connected."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child only switches uid and makes syscalls, then leaves without cleanup
        code = 255
        try:
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            s = socket.socket(family, socket.SOCK_STREAM)
            try:
                s.connect(address)
                code = 0
            except OSError as e:
                code = e.errno or 254
        finally:
            os.write(write_end, bytes([code]))
            os._exit(0)
    os.close(write_end)
    try:
        result = os.read(read_end, 1)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    return result[0]


def test_default_endpoints_are_unix_sockets_in_var(tmp_path: Path) -> None:
    from batos.config import load

    settings = load(var_dir=tmp_path / "var")
    assert settings.broker_endpoint == f"ipc://{(tmp_path / 'var' / 'broker.sock').resolve()}"
    assert settings.zeo_client_address == str(tmp_path / "var" / "zeo.sock")


@as_root
def test_another_user_cannot_reach_broker_or_zeo(system) -> None:
    system.var.mkdir(parents=True)
    system.var.chmod(0o755)  # as a fresh checkout might leave it: the broker tightens its own var dir
    system.start_zeo()
    system.start_broker()
    broker_sock = transport.ipc_path(system.endpoint)
    zeo_sock = system.settings.zeo_client_address
    assert broker_sock is not None and broker_sock.parent == system.var.resolve()
    assert stat.S_IMODE(system.var.stat().st_mode) == 0o700
    assert stat.S_IMODE(broker_sock.stat().st_mode) == 0o600
    for address in (str(broker_sock), str(zeo_sock)):
        assert connect_as(None, address) == 0, f"the owner must reach {address}"
        assert connect_as(NOBODY, address) == errno.EACCES, f"another uid reached {address}"


@as_root
def test_tcp_without_curve_is_open_to_every_local_user(system) -> None:
    """The control: what TCP without Curve means (and why it is not the default)."""
    system.start_broker("tcp://127.0.0.1:*")
    host, port = system.endpoint.removeprefix("tcp://").rsplit(":", 1)
    assert connect_as(NOBODY, (host, int(port))) == 0
    assert "without Curve" in system.procs[-1].log.read_text()


async def test_services_and_clients_work_over_ipc(system) -> None:
    system.start_broker(BATOS_EXTRA_SERVICES="echo")
    assert system.endpoint.startswith("ipc://")
    system.start_test_worker("echo", BATOS_EXTRA_SERVICES="echo")
    async with Client(system.settings, identity="ipc-client") as c:
        await c.wait_for_broker(20)
        await system.wait_registered(c, {"echo": 1})
        assert (await c.call("echo", "echo", {"over": "ipc"}))["echo"] == {"over": "ipc"}


def test_broker_refuses_an_ipc_socket_in_a_shared_directory(system, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    endpoint = f"ipc://{shared / 'broker.sock'}"
    proc = system.spawn("broker", [sys.executable, "-m", "broker"], BATOS_BROKER_ENDPOINT=endpoint)
    assert proc.popen is not None and proc.popen.wait(30) == 2
    assert "other users could reach a socket there" in proc.tail()
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755  # a directory BAT OS does not own is never changed
    assert not (shared / "broker.sock").exists()


def test_private_dir_refuses_what_it_cannot_trust(tmp_path: Path) -> None:
    var = tmp_path / "var"
    transport.private_dir(var, may_tighten=True)
    assert stat.S_IMODE(var.stat().st_mode) == 0o700
    link = tmp_path / "link"
    link.symlink_to(var)
    with pytest.raises(transport.TransportError, match="not a directory"):
        transport.private_dir(link, may_tighten=False)
    with pytest.raises(transport.TransportError, match="longer than"):
        transport.prepare_socket_dir(var / ("x" * 120), var)
    if os.geteuid() == 0:
        foreign = tmp_path / "foreign"
        foreign.mkdir(mode=0o700)
        os.chown(foreign, NOBODY, NOBODY)
        with pytest.raises(transport.TransportError, match="belongs to uid"):
            transport.private_dir(foreign, may_tighten=True)
