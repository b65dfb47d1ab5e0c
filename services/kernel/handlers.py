"""The kernel's whitelist: wire command -> handler. Every handler is the same two steps: the request becomes a
Table 1 object (commands.from_console, or the raw object for ``command``), then commands.dispatch runs it with
events going to the requester only (``req.emit``). ``ping`` and ``status`` are answered by the worker runtime
(``status`` merges kernel.status_hook: the broker's worker table and this kernel's cycles and loops).

``audit_event`` is not a console command: other processes (the forge worker) send their Table 3 events here,
because the kernel is the audit log's single writer (audit_event.py).
"""

from __future__ import annotations

from typing import Any

from batos.errors import ServiceError
from batos.worker import Request
from proto import ErrorCode
from proto.roles import KERNEL_CONSOLE_COMMANDS
from services.kernel import commands
from services.kernel.audit_event import record_event


def _kernel(req: Request) -> Any:
    kernel = req.ctx.state.get("kernel")
    if kernel is None:
        raise ServiceError(ErrorCode.UNAVAILABLE, "the kernel is still awakening; try again in a moment")
    return kernel


def _convenience(name: str):
    async def handle(req: Request) -> dict[str, Any]:
        return await commands.dispatch(_kernel(req), req.emit, commands.from_console(name, req.args))

    handle.__name__ = f"handle_{name}"
    return handle


async def handle_command(req: Request) -> dict[str, Any]:
    """A raw Table 1 object (the console's `{...}` lines, or any client)."""
    return await commands.dispatch(_kernel(req), req.emit, commands.parse(req.args))


async def handle_audit_event(req: Request) -> dict[str, Any]:
    """{event: Table 3 object} from another process -> validated and written to the audit log."""
    if "event" not in req.args:
        raise ServiceError(ErrorCode.BAD_ARGS, "audit_event: missing argument 'event' (a Table 3 object)")
    return await record_event(_kernel(req).env, req.args["event"])


HANDLERS = {"command": handle_command, "audit_event": handle_audit_event,
            **{name: _convenience(name) for name in KERNEL_CONSOLE_COMMANDS}}
