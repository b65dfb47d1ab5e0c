"""Roles on the wire: who may register as a worker and who may call what (issue 13 item 7).

With CurveZMQ on, every message arrives with the public key its sender proved it holds (the ZAP
``User-Id``, the key in z85). The broker maps keys to roles from the allow-list directory
(``var/keys/authorized/``): a key file named ``services*.key`` is a service key, any other listed
key is a console key. Then:

- only service keys may send READY (and so answer anyone's requests) or worker output;
- a console may call only the broker's read-only commands and the kernel's console commands
  (:data:`proto.roles.CONSOLE_COMMANDS`); internal commands (``kernel.audit_event``,
  ``memory.delete_file``, ``llm.generate``, ...) answer ``unauthorized``;
- a registered worker's identity is pinned to the key and the connection it registered with:
  output for that identity from another key or another connection (an identity taken over with
  ROUTER_HANDOVER) is refused and the worker is dropped, so its requests are re-dispatched or failed;
- the ``workers`` table shows consoles no identities (nothing to impersonate).

With Curve off every peer is trusted as a service (the local transport is the wall); the checks
cost nothing then. See the module docstring of :mod:`proto.roles` for the command lists.
"""

from __future__ import annotations

from pathlib import Path

import zmq

from proto.roles import BROKER_COMMANDS_FOR_CONSOLES, CONSOLE_COMMANDS, Role


def key_roles(authorized: Path) -> dict[str, Role]:
    """z85 public key -> role, from the allow-list directory the authenticator reads."""
    import zmq.auth

    roles: dict[str, Role] = {}
    for path in sorted(authorized.glob("*.key")):
        public, _ = zmq.auth.load_certificate(str(path))
        roles[public.decode()] = Role.SERVICE if path.stem.startswith("service") else Role.CONSOLE
    return roles


class Access:
    """The broker's role checks; ``enforcing`` is False (and every check a no-op) with Curve off."""

    def __init__(self, roles: dict[str, Role] | None):
        self.roles = roles or {}
        self.enforcing = roles is not None

    def user(self, frame: zmq.Frame | None) -> str:
        if not self.enforcing or frame is None:
            return ""
        try:
            return str(frame.get("User-Id"))
        except zmq.ZMQError:
            return ""

    def role(self, user: str) -> Role:
        if not self.enforcing:
            return Role.SERVICE
        return self.roles.get(user, Role.CONSOLE)  # an unknown key is never more than a console

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

    def may_serve(self, role: Role) -> str | None:
        if role == Role.SERVICE:
            return None
        return "only service keys may register as workers; this key is a console key"
