"""The ``llm`` and ``forge`` services' bodies (services/forge: one process serves both)."""

from __future__ import annotations

from typing import Any

from proto.bodies.runtime import Status, StatusReply
from proto.contract import Call, command


class LLMStatusReply(StatusReply):
    llm: dict[str, Any] | None = None  # the backend's info and queue, or {"ready": false, "error": ...}


@command("llm", "status")
class LLMStatus(Status, Call[LLMStatusReply]):
    pass


@command("forge", "status")
class ForgeStatus(Status, Call[LLMStatusReply]):
    pass
