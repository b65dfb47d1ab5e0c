"""`audit_event`: a Table 3 event from another process, written through the kernel's AuditLog.

The audit log has a single writer (an advisory lock on the file; batos/audit.py) and that writer is the kernel.
A process with something to record -- the forge worker's adapter incarnation (``ADAPTER_INCARNATION``) --
sends the event here. The worker runtime has already checked it against ``AuditEventStruct`` (generated from
batos.audit.AuditEvent, the schema's one definition: proto.bodies.kernel.AuditEvent), so a malformed event is
refused with the field that is wrong (bad_args) before this runs; here it becomes the pydantic model the log
writes. The reply comes after the line is on disk (flush), so a sender that marks its event "recorded" on the
reply never loses it to a kernel crash.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from batos.audit import AuditEvent
from batos.errors import ServiceError
from proto import ErrorCode
from proto.bodies.kernel import AuditEventReply
from services.kernel.env import KernelEnv


def model_of(event: dict[str, Any]) -> AuditEvent:
    """The decoded event as the model the log writes; the two validate alike (batos/audit.py), so a refusal
    here is rare (a check only the model makes) and names its reasons."""
    try:
        return AuditEvent.model_validate(event)
    except ValidationError as e:
        reasons = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'event'}: {err['msg']}" for err in e.errors())
        raise ServiceError(ErrorCode.BAD_ARGS, f"audit_event: not a Table 3 event: {reasons}") from None


async def record_event(env: KernelEnv, event: dict[str, Any]) -> AuditEventReply:
    """Log, flush; the reply names the event that was written."""
    model = model_of(event)
    await env.audit.log(model)
    flush = getattr(env.audit, "flush", None)
    if flush is not None:
        await flush()
    return AuditEventReply(logged=True, event_id=model.event_id, event_type=model.event_type,
                           cycle_id=model.cycle_id)
