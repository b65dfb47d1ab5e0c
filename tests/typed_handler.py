"""Drive a typed handler as the worker runtime does (batos.worker ``_run_handler``), without a broker.

The body is decoded into the command's request type (a bad one is ``bad_args`` naming the field, before the
handler runs), the handler's typed reply is checked and encoded, and the test gets the plain dict a client
would receive.
"""

from __future__ import annotations

from typing import Any

from batos.errors import ServiceError
from proto import ProtocolError, contract


async def call_handler(service: str, command: str, handler: Any, req: Any, args: dict[str, Any] | None = None,
                       ) -> dict[str, Any]:
    s = contract.spec(service, command)
    assert s is not None, f"{service}.{command} has no contract type"
    try:
        body = contract.decode_request(s, args or {})
    except ProtocolError as e:
        raise ServiceError(e.code, e.message) from None
    return contract.encode_reply(s, await handler(req, body))
