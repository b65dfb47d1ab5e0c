"""The ``memory`` service's bodies (services/memory_weaver)."""

from __future__ import annotations

from typing import Any

from proto.bodies.runtime import Status, StatusReply
from proto.contract import Call, command


class MemoryStatusReply(StatusReply):
    index: dict[str, Any] | None = None  # the vector index's own figures; absent while memory starts


@command("memory", "status")
class MemoryStatus(Status, Call[MemoryStatusReply]):
    pass
