"""Roles on the wire: the two kinds of peer, and what a console may address.

A *service* (a worker process and the clients inside services) may register for services and call
anything. A *console* may call only the commands below: the kernel's Table 1 commands (the kernel
registers its handlers from :data:`KERNEL_CONSOLE_COMMANDS`, so the two cannot drift apart), ``command``
(a raw Table 1 object) and the runtime's ``ping``/``status``; ``audit_event`` is deliberately absent (it
feeds the forge's training data).
"""

from __future__ import annotations

import enum
import hashlib


class Role(enum.StrEnum):
    CONSOLE = "console"
    SERVICE = "service"


# The kernel's Table 1 commands a console may send by name; the kernel registers a handler for each.
KERNEL_CONSOLE_COMMANDS = ("ask", "send", "define", "display_yourself", "ingest", "search", "inspect", "stats",
                           "trace", "audit", "forge", "verify", "watch")
CONSOLE_COMMANDS = frozenset({"command", "ping", "status", "watch", "cancel", "help", *KERNEL_CONSOLE_COMMANDS})
BROKER_COMMANDS_FOR_CONSOLES = frozenset({"ping", "status", "workers", "held"})


def requester_tag(identity: str) -> str:
    """Who started a piece of work, as other consoles see it (``watch``): a digest, never the identity itself,
    which the broker routes replies by (with ROUTER_HANDOVER a peer presenting it would take them over). A
    console computes its own tag to recognise its own work."""
    return hashlib.sha256(identity.encode()).hexdigest()[:8] if identity else ""
