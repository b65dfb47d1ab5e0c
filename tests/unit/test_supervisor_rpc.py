"""batos.supervisor_rpc against a stand-in supervisord (a real XML-RPC server on a free port): replies are checked
into typed values, and a reply of another shape is a SupervisorError naming it, not a KeyError further on."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any
from xmlrpc.server import SimpleXMLRPCServer

import pytest

from batos.supervisor_rpc import (
    Supervisor,
    SupervisorError,
    all_process_info,
    process_info,
    proxy,
    running,
    supervisor_pid,
)

KERNEL = {"name": "kernel", "group": "kernel", "statename": "RUNNING", "state": 20, "pid": 4242,
          "description": "pid 4242, uptime 0:00:07", "exitstatus": 0, "logfile": "/tmp/k.log"}


class StandIn:
    """The supervisord calls BAT OS makes, with replies a test can bend out of shape."""

    def __init__(self) -> None:
        self.infos: dict[str, Any] = {"kernel": dict(KERNEL)}
        self.state: Any = {"statecode": 1, "statename": "RUNNING"}
        self.pid: Any = 99

    def serve(self, server: SimpleXMLRPCServer) -> None:
        server.register_function(lambda: self.state, "supervisor.getState")
        server.register_function(lambda: self.pid, "supervisor.getPID")
        server.register_function(lambda name: self.infos[name], "supervisor.getProcessInfo")
        server.register_function(lambda: list(self.infos.values()), "supervisor.getAllProcessInfo")


@pytest.fixture
def stand_in() -> Iterator[tuple[StandIn, str]]:
    server = SimpleXMLRPCServer(("127.0.0.1", 0), logRequests=False, allow_none=True)
    fake = StandIn()
    fake.serve(server)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_replies_become_typed_values(stand_in: tuple[StandIn, str]) -> None:
    fake, url = stand_in
    sup = Supervisor(url)
    assert (sup.state("kernel"), sup.pid("kernel")) == ("RUNNING", 4242)
    assert running(url)
    assert supervisor_pid(proxy(url)) == 99
    # only the fields BAT OS reads, with their types checked
    assert all_process_info(proxy(url).supervisor.getAllProcessInfo()) == [
        {"name": "kernel", "statename": "RUNNING", "pid": 4242, "description": "pid 4242, uptime 0:00:07"}]
    fake.state = {"statecode": 0, "statename": "RESTARTING"}
    assert not running(url)


@pytest.mark.parametrize("bent", [
    {"statename": "RUNNING", "pid": 1, "description": ""},  # no name
    {**KERNEL, "pid": "4242"},  # a pid as text
    {**KERNEL, "statename": None},
    ["kernel", "RUNNING"],  # not a struct at all
])
def test_a_process_info_of_another_shape_is_a_supervisor_error(stand_in: tuple[StandIn, str], bent: Any) -> None:
    fake, url = stand_in
    fake.infos["kernel"] = bent
    with pytest.raises(SupervisorError, match="unexpected shape"):
        Supervisor(url).state("kernel")
    with pytest.raises(SupervisorError, match="unexpected shape"):
        all_process_info(proxy(url).supervisor.getAllProcessInfo())


def test_other_replies_of_another_shape(stand_in: tuple[StandIn, str]) -> None:
    fake, url = stand_in
    fake.state, fake.pid = "RUNNING", "99"  # not the struct / int supervisord sends
    assert not running(url)
    with pytest.raises(SupervisorError, match="pid of an unexpected shape"):
        supervisor_pid(proxy(url))
    with pytest.raises(SupervisorError, match="process list of an unexpected shape"):
        all_process_info({"kernel": KERNEL})
    assert process_info(KERNEL)["description"] == "pid 4242, uptime 0:00:07"
