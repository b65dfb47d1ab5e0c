"""Roles on the wire: the two kinds of peer, and what a console may address.

A *service* (a worker process and the clients inside services) may register for services and call
anything. A *console* may call only the commands below. The kernel's console commands mirror
``services.kernel.handlers.CONSOLE_COMMANDS`` plus ``command`` (a raw Table 1 object) and the
runtime's ``ping``/``status``; ``audit_event`` is deliberately absent (it feeds the forge's training
data). A console command added to the kernel must be added here too, or consoles (with Curve on,
where roles are enforced) get ``unauthorized`` for it.
"""

from __future__ import annotations

import enum


class Role(enum.StrEnum):
    CONSOLE = "console"
    SERVICE = "service"


CONSOLE_COMMANDS = frozenset({
    "command", "ping", "status",
    "ask", "send", "define", "display_yourself", "ingest", "search", "inspect", "stats", "trace", "audit",
    "forge", "verify", "watch", "cancel", "help",
})
BROKER_COMMANDS_FOR_CONSOLES = frozenset({"ping", "status", "workers", "held"})
