"""Roles on the wire: who may register as a worker and who may call what (issue 13 item 7).

With CurveZMQ on, every message arrives with the public key its sender proved it holds (the ZAP
``User-Id``, the key in z85). The broker maps keys to grants from the allow-list directory
(``var/keys/authorized/``), read at start:

- ``<name>.key`` beside a ``<name>.services`` list is a *service* key that may serve exactly the services
  listed there (one name per line or comma separated, ``#`` comments, ``*`` = any service): a memory host's
  key listed for ``memory`` cannot register as ``llm``. An empty list makes a service that serves nothing
  but may call internal commands;
- any other listed key is a *console* key (a key named ``service*`` without a list too: least privilege,
  with a warning in the broker's log).

Then:

- only service keys may send READY (and so answer anyone's requests) or worker output, each only for the
  services on its list;
- a console may call only the broker's read-only commands and the kernel's console commands
  (:data:`proto.roles.CONSOLE_COMMANDS`); internal commands (``kernel.audit_event``,
  ``memory.delete_file``, ``llm.generate``, ...) answer ``unauthorized``;
- a registered worker's identity is pinned to the key and the connection it registered with:
  output for that identity from another key or another connection (an identity taken over with
  ROUTER_HANDOVER) is refused and the worker is dropped, so its requests are re-dispatched or failed;
- the ``workers`` table shows consoles no identities (nothing to impersonate).

With Curve off every peer is trusted as a service: the local transport is the wall (an ``ipc://`` socket in
the owner-only var/, batos.transport); the checks cost nothing then. See the module docstring of
:mod:`proto.roles` for the command lists.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import zmq

from batos.curve import SERVICES_SUFFIX
from proto.roles import BROKER_COMMANDS_FOR_CONSOLES, CONSOLE_COMMANDS, Role

ANY_SERVICE = "*"

log = logging.getLogger("broker.roles")


@dataclass(frozen=True)
class Grant:
    """What one key may do: its role, and for a service key the services it may serve."""

    role: Role
    services: frozenset[str] = frozenset()

    def serves(self, service: str) -> bool:
        return self.role == Role.SERVICE and (ANY_SERVICE in self.services or service in self.services)


CONSOLE = Grant(Role.CONSOLE)
ALL_SERVICES = Grant(Role.SERVICE, frozenset({ANY_SERVICE}))


def parse_services(text: str) -> frozenset[str]:
    """A ``.services`` list: names separated by newlines, commas or spaces; ``#`` starts a comment."""
    names: set[str] = set()
    for line in text.splitlines():
        names.update(n for n in re.split(r"[\s,]+", line.split("#", 1)[0]) if n)
    return frozenset(names)


def key_grants(authorized: Path) -> dict[str, Grant]:
    """z85 public key -> grant, from the allow-list directory the authenticator reads."""
    import zmq.auth

    grants: dict[str, Grant] = {}
    for path in sorted(authorized.glob("*.key")):
        public, _ = zmq.auth.load_certificate(str(path))
        listing = path.with_suffix(SERVICES_SUFFIX)
        if listing.is_file():
            grants[public.decode()] = Grant(Role.SERVICE, parse_services(listing.read_text()))
        else:
            if path.stem.startswith("service"):
                log.warning("%s has no %s list: it is a console key until one is written", path, listing.name)
            grants[public.decode()] = CONSOLE
    return grants


class Access:
    """The broker's role checks; ``enforcing`` is False (and every check a no-op) with Curve off."""

    def __init__(self, grants: dict[str, Grant] | None):
        self.grants = grants or {}
        self.enforcing = grants is not None

    def user(self, frame: zmq.Frame | None) -> str:
        if not self.enforcing or frame is None:
            return ""
        try:
            return str(frame.get("User-Id"))
        except zmq.ZMQError:
            return ""

    def grant(self, user: str) -> Grant:
        if not self.enforcing:
            return ALL_SERVICES
        return self.grants.get(user, CONSOLE)  # an unknown key is never more than a console

    def role(self, user: str) -> Role:
        return self.grant(user).role

    def may_request(self, role: Role, service: str, command: str) -> str | None:
        """None when allowed, else the reason (for an ``unauthorized`` answer)."""
        if role == Role.SERVICE:
            return None
        if service == "broker" and command in BROKER_COMMANDS_FOR_CONSOLES:
            return None
        if service == "kernel" and command in CONSOLE_COMMANDS:
            return None
        return (f"a console may call only the kernel's console commands; {service}.{command} is "
                "internal to BAT OS")

    def may_serve(self, role: Role, service: str | None = None, user: str = "") -> str | None:
        """None when a READY for ``service`` from ``user``'s key is allowed, else the reason."""
        if role != Role.SERVICE:
            return "only service keys may register as workers; this key is a console key"
        if service is None or self.grant(user).serves(service):
            return None
        return f"this service key may not serve {service!r} (not on its .services list in var/keys/authorized/)"
