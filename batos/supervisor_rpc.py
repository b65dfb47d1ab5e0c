"""The one supervisord XML-RPC client: ``batos.ctl`` (make up/status/down) and the steward both use it.

supervisorctl's own arrangement: ``SupervisorTransport`` knows the real address (a unix socket or
http://host:port), the proxy's url is nominal. :func:`proxy` gives the raw interface (``.supervisor.*``);
:class:`Supervisor` wraps the three calls the steward's protocol needs with plain errors.
"""

from __future__ import annotations

import http.client
import xmlrpc.client
from pathlib import Path
from typing import Any

from supervisor.xmlrpc import SupervisorTransport

from batos.config import Settings


class SupervisorError(RuntimeError):
    pass


def url_for(settings: Settings) -> str:
    """``settings.supervisor_url``, else the socket supervisord.conf makes in the var dir."""
    return settings.supervisor_url or f"unix://{Path(settings.var_dir) / 'supervisor.sock'}"


def proxy(url: str) -> xmlrpc.client.ServerProxy:
    if not url.startswith(("unix://", "http://")):
        raise SupervisorError(f"supervisor url must be unix://PATH or http://HOST:PORT, not {url!r}")
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=SupervisorTransport(None, None, url))


def running(url: str) -> bool:
    """Whether a supervisord answers at ``url`` and is RUNNING."""
    try:
        return proxy(url).supervisor.getState()["statename"] == "RUNNING"
    except (OSError, xmlrpc.client.Fault):
        return False


class Supervisor:
    """stop / start / state of one program, waiting for each transition, errors as :class:`SupervisorError`."""

    def __init__(self, url: str):
        self.url = url
        self._proxy = proxy(url)

    def _call(self, method: str, *args: Any) -> Any:
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
        return str(self._call("getProcessInfo", program)["statename"])

    def pid(self, program: str) -> int:
        return int(self._call("getProcessInfo", program)["pid"])

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
