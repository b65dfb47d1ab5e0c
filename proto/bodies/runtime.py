"""Commands every worker answers, whatever its service: ``ping`` and ``status`` (batos.worker's own).

A service whose ``status`` reports more than the runtime's fields registers its own ``status`` request
with a reply that subclasses :class:`StatusReply` (the kernel's adds its cycles and the broker's table).
"""

from __future__ import annotations

from proto.contract import ANY_SERVICE, Call, Reply, command


class PingReply(Reply):
    pong: bool
    service: str


@command(ANY_SERVICE, "ping")
class Ping(Call[PingReply]):
    pass


class StatusReply(Reply):
    service: str
    identity: str
    pid: int
    version: str
    uptime_s: float
    served: int
    inflight: int
    commands: list[str]


@command(ANY_SERVICE, "status")
class Status(Call[StatusReply]):
    pass
