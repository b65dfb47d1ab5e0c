"""The one supervisord XML-RPC client: ``batos.ctl`` (make up/status/down) and the steward both use it.

supervisorctl's own arrangement: ``SupervisorTransport`` knows the real address (a unix socket or
http://host:port), the proxy's url is nominal. :func:`proxy` gives the raw interface (``.supervisor.*``);
:class:`Supervisor` wraps the three calls the steward's protocol needs with plain errors.
"""

from __future__ import annotations

import http.client
import xmlrpc.client
from pathlib import Path
from typing import Any, TypedDict

from supervisor.xmlrpc import SupervisorTransport

from batos.config import Settings


class SupervisorError(RuntimeError):
    pass


class ProcessInfo(TypedDict):
    """The fields of a ``getProcessInfo`` reply BAT OS reads (supervisord sends more; see ``process_info``)."""

    name: str
    statename: str  # RUNNING, STOPPED, FATAL, BACKOFF, EXITED, ...
    pid: int  # 0 when not running
    description: str  # "pid 123, uptime 0:01:02" or why it is not running


def process_info(reply: object) -> ProcessInfo:
    """One ``getProcessInfo`` / ``getAllProcessInfo`` entry, checked: XML-RPC replies are untyped on the wire."""
    if isinstance(reply, dict):
        name, statename, pid, description = (reply.get(k) for k in ("name", "statename", "pid", "description"))
        if (isinstance(name, str) and isinstance(statename, str) and isinstance(pid, int)
                and isinstance(description, str)):
            return {"name": name, "statename": statename, "pid": pid, "description": description}
    raise SupervisorError(f"supervisord sent a process info of an unexpected shape: {reply!r:.200}")


def all_process_info(reply: object) -> list[ProcessInfo]:
    """A ``getAllProcessInfo`` reply, each entry checked as by :func:`process_info`."""
    if not isinstance(reply, list):
        raise SupervisorError(f"supervisord sent a process list of an unexpected shape: {reply!r:.200}")
    return [process_info(entry) for entry in reply]


def url_for(settings: Settings) -> str:
    """``settings.supervisor_url``, else the socket supervisord.conf makes in the var dir."""
    return settings.supervisor_url or f"unix://{Path(settings.var_dir) / 'supervisor.sock'}"


def proxy(url: str) -> xmlrpc.client.ServerProxy:
    if not url.startswith(("unix://", "http://")):
        raise SupervisorError(f"supervisor url must be unix://PATH or http://HOST:PORT, not {url!r}")
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=SupervisorTransport(None, None, url))


def supervisor_pid(rpc: xmlrpc.client.ServerProxy) -> int:
    """supervisord's own pid (``getPID``)."""
    pid = rpc.supervisor.getPID()
    if not isinstance(pid, int):
        raise SupervisorError(f"supervisord sent a pid of an unexpected shape: {pid!r:.200}")
    return pid


def running(url: str) -> bool:
    """Whether a supervisord answers at ``url`` and is RUNNING."""
    try:
        state = proxy(url).supervisor.getState()
        return isinstance(state, dict) and "RUNNING" == state.get("statename")
    except (OSError, xmlrpc.client.Fault):
        return False


class Supervisor:
    """stop / start / state of one program, waiting for each transition, errors as :class:`SupervisorError`."""

    def __init__(self, url: str):
        self.url = url
        self._proxy = proxy(url)

    def _call(self, method: str, *args: Any) -> object:
        try:
            return getattr(self._proxy.supervisor, method)(*args)
        except xmlrpc.client.Fault as e:
            raise SupervisorError(f"supervisord {method}{args}: {e.faultString}") from e
        except (OSError, http.client.HTTPException) as e:
            # The transport keeps one persistent connection; after a failure it is unusable
            # ("CannotSendRequest") until dropped, so drop it and let the next call reconnect.
            self._proxy("transport").close()
            raise SupervisorError(f"supervisord at {self.url} unreachable: {e}") from e

    def state(self, program: str) -> str:
        return process_info(self._call("getProcessInfo", program))["statename"]

    def pid(self, program: str) -> int:
        return process_info(self._call("getProcessInfo", program))["pid"]

    def stop(self, program: str) -> str:
        try:
            self._call("stopProcess", program, True)
        except SupervisorError as e:
            if "NOT_RUNNING" not in str(e):  # already stopped is what we want
                raise
        return self.state(program)

    def start(self, program: str) -> str:
        try:
            self._call("startProcess", program, True)
        except SupervisorError as e:
            if "ALREADY_STARTED" not in str(e):
                raise
        return self.state(program)
