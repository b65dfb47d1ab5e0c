"""What every kernel operation needs, in one object: settings, the image, the audit log, a service client."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from batos.config import Settings

Emit = Callable[..., Awaitable[None]]  # req.emit(name, **data)


class AuditSink(Protocol):
    async def log(self, event: Any) -> None: ...


class ServiceCaller(Protocol):
    async def call(self, service: str, command: str, body: dict[str, Any] | None = None, *,
                   on_event: Any = None, timeout: float | None = 60.0, idempotent: bool = False) -> dict[str, Any]: ...


def instance_name() -> str:
    """Which kernel this is, for recovery: a restarted kernel fails only the cycles of its own name.

    One kernel per host by default; a deployment running several sets BATOS_KERNEL_INSTANCE per worker so
    that one kernel's restart does not fail the cycles another is still running.
    """
    return os.environ.get("BATOS_KERNEL_INSTANCE") or f"kernel@{socket.gethostname()}"


@dataclass
class KernelEnv:
    settings: Settings
    image: Any  # batos.image.Image: transact / read / session
    audit: AuditSink
    client: ServiceCaller
    instance: str = field(default_factory=instance_name)
    active: dict[str, Any] = field(default_factory=dict)  # cycle_id -> CycleRun running in this process
    started: float = field(default_factory=time.time)
    info: dict[str, Any] = field(default_factory=dict)  # autotelic loop and recovery facts for `status`

    def setting(self, name: str, default: Any) -> Any:
        """A setting that batos.config.Settings may not have yet: its field if it has one, else the environment's
        ``BATOS_<NAME>`` read as ``default``'s type (how every other setting is read), else ``default``."""
        if name in getattr(type(self.settings), "model_fields", {}):
            return getattr(self.settings, name)
        raw = os.environ.get(f"BATOS_{name.upper()}")
        if raw is None:
            return getattr(self.settings, name, default)
        try:
            return type(default)(raw) if default is not None else raw
        except ValueError:
            raise ValueError(f"BATOS_{name.upper()}={raw!r} is not a valid {type(default).__name__}") from None
