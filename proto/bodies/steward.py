"""The ``steward`` service's bodies (services/forge/steward*.py): upgrades and their history."""

from __future__ import annotations

from typing import Any

from proto.bodies.runtime import Status, StatusReply
from proto.contract import Call, command


class StewardStatusReply(StatusReply):
    runs: list[dict[str, Any]] = []
    last_forge: dict[str, str] = {}  # persona -> time of its latest forge
    busy: list[str] = []
    current: dict[str, Any] | None = None


@command("steward", "status")
class StewardStatus(Status, Call[StewardStatusReply]):
    pass
