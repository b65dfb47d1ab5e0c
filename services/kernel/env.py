"""What every kernel operation needs, in one object: settings, the image, the audit log, a service client."""

from __future__ import annotations

import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from batos.config import Settings
from batos.image import Image
from proto.contract import Call, Reply

if TYPE_CHECKING:
    from services.kernel.run import CycleRun
    from services.kernel.watch import WatchHub

Emit = Callable[..., Awaitable[None]]  # req.emit(name, **data)
R = TypeVar("R", bound=Reply)


class AuditSink(Protocol):
    async def log(self, event: Any) -> None: ...


class ServiceCaller(Protocol):
    async def call(self, service: str, command: str, body: dict[str, Any] | None = None, *,
                   on_event: Any = None, timeout: float | None = 60.0,
                   idempotent: bool | None = None) -> dict[str, Any]: ...

    async def request(self, body: Call[R], *, on_event: Any = None, timeout: float | None = 60.0) -> R: ...


def instance_name(settings: Settings) -> str:
    """Which kernel this is, for recovery: a restarted kernel fails only the cycles of its own name.

    One kernel per host by default; a deployment running several sets BATOS_KERNEL_INSTANCE per worker so
    that one kernel's restart does not fail the cycles another is still running.
    """
    return settings.kernel_instance or f"kernel@{socket.gethostname()}"


@dataclass
class KernelEnv:
    settings: Settings
    image: Image
    audit: AuditSink
    client: ServiceCaller
    instance: str = ""  # "" = instance_name(settings)
    active: dict[str, CycleRun] = field(default_factory=dict)  # the cycles running in this process, by id
    started: float = field(default_factory=time.time)
    info: dict[str, Any] = field(default_factory=dict)  # autotelic loop and recovery facts for `status`
    watch_hub: WatchHub | None = None  # made on first use (services.kernel.watch.hub_of)

    def __post_init__(self) -> None:
        self.instance = self.instance or instance_name(self.settings)
