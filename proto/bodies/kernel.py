"""The ``kernel`` service's bodies (services/kernel): Table 1 commands and the convenience commands."""

from __future__ import annotations

from typing import Any

from proto.bodies.runtime import Status, StatusReply
from proto.contract import Call, command


class KernelStatusReply(StatusReply):
    broker: dict[str, Any] | None = None  # the broker's worker table, or {"error": ...}
    kernel: dict[str, Any] | str | None = None  # this kernel's cycles and loops; "starting" while it wakes


@command("kernel", "status")
class KernelStatus(Status, Call[KernelStatusReply]):
    pass
