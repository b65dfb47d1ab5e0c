"""`audit_event`: a Table 3 event from another process, written through the kernel's AuditLog.

The audit log has a single writer (an advisory lock on the file; batos/audit.py) and that writer is the kernel.
A process with something to record -- the forge worker's adapter incarnation (``ADAPTER_INCARNATION``) --
sends the event here. It is validated exactly as the kernel's own events are (batos.audit.AuditEvent); a
malformed one is refused with the reasons (bad_args) and never written. The reply comes after the line is on
disk (flush), so a sender that marks its event "recorded" on the reply never loses it to a kernel crash.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from batos.audit import AuditEvent
from batos.errors import ServiceError
from proto import ErrorCode
from services.kernel.env import KernelEnv

MAX_REASONS = 5  # validation errors named in the refusal; the rest are counted


def validate_event(raw: Any) -> AuditEvent:
    """The event as an AuditEvent, or bad_args naming what is wrong with it (field path: reason)."""
    if not isinstance(raw, dict):
        raise ServiceError(ErrorCode.BAD_ARGS, f"audit_event: 'event' must be a Table 3 object, not "
                                               f"{type(raw).__name__}")
    try:
        return AuditEvent.model_validate(raw)
    except ValidationError as e:
        errors = e.errors()
        reasons = [f"{'.'.join(str(p) for p in err['loc']) or 'event'}: {err['msg']}" for err in errors[:MAX_REASONS]]
        more = f" (and {len(errors) - MAX_REASONS} more)" if len(errors) > MAX_REASONS else ""
        message = f"audit_event: not a Table 3 event: {'; '.join(reasons)}{more}"
        raise ServiceError(ErrorCode.BAD_ARGS, message) from None


async def record_event(env: KernelEnv, raw: Any) -> dict[str, Any]:
    """Validate, log, flush; the reply names the event that was written."""
    event = validate_event(raw)
    await env.audit.log(event)
    flush = getattr(env.audit, "flush", None)
    if flush is not None:
        await flush()
    return {"logged": True, "event_id": event.event_id, "event_type": event.event_type, "cycle_id": event.cycle_id}
