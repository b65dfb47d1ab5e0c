"""The kernel's whitelist: wire command -> handler. The worker runtime decodes each body into its type in
proto.bodies.kernel (a convenience such as ``Ask``, or the raw Table 1 object of ``command``) before a handler
runs, and encodes the typed reply; every handler is then one step: commands.dispatch runs it with events going to
the requester only (``req.emit``). ``ping`` and ``status`` are answered by the worker runtime (``status`` merges
kernel.status_hook: the broker's worker table and this kernel's cycles and loops).

``audit_event`` is not a console command: other processes (the forge worker) send their Table 3 events here,
because the kernel is the audit log's single writer (audit_event.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from batos.errors import ServiceError
from batos.worker import Handler, Request
from proto import ErrorCode, contract
from proto.bodies.kernel import AuditEvent, AuditEventReply, Table1Command
from proto.contract import Call, Reply
from proto.roles import KERNEL_CONSOLE_COMMANDS
from services.kernel import commands
from services.kernel.audit_event import record_event

if TYPE_CHECKING:
    from services.kernel.kernel import Kernel


def _kernel(req: Request) -> Kernel:
    kernel: Kernel | None = req.ctx.state.get("kernel")
    if kernel is None:
        raise ServiceError(ErrorCode.UNAVAILABLE, "the kernel is still awakening; try again in a moment")
    return kernel


def _convenience(name: str) -> Handler:
    """The handler of one console command, annotated with that command's own request and reply types."""
    s = contract.spec("kernel", name)
    if s is None:  # a programming error, found at import
        raise LookupError(f"kernel.{name} has no request type in proto.bodies.kernel")

    async def handle(req: Request, body: Call[Any]) -> Reply:
        return await commands.dispatch(_kernel(req), req.emit, body)

    handle.__name__ = handle.__qualname__ = f"handle_{name}"
    handle.__annotations__ = {"req": Request, "body": s.request, "return": s.reply}
    return handle


async def handle_command(req: Request, body: Table1Command) -> Reply:
    """A raw Table 1 object (the console's `{...}` lines, or any client); answered with the reply of the
    convenience it stands for (proto.bodies.kernel.reply_type)."""
    return await commands.dispatch(_kernel(req), req.emit, body)


async def handle_audit_event(req: Request, body: AuditEvent) -> AuditEventReply:
    """A Table 3 event from another process -> written to the audit log."""
    return await record_event(_kernel(req).env, body.event)


HANDLERS: dict[str, Handler] = {"command": handle_command, "audit_event": handle_audit_event,
                                **{name: _convenience(name) for name in KERNEL_CONSOLE_COMMANDS}}
