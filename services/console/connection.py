"""Watching the broker from the console: say when it is unreachable, when it is back, and when it
restarted. The DEALER socket reconnects by itself; this only observes and reports."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from batos.client import Client
from batos.errors import ServiceError

# While connected, a ping this often notices a dead broker within about PING_TIMEOUT + UP_INTERVAL.
UP_INTERVAL = 2.0
# While disconnected, retry more often so the console says "back" soon after the broker is.
DOWN_INTERVAL = 1.0
PING_TIMEOUT = 2.0


class BrokerMonitor:
    def __init__(self, client: Client, notify: Callable[[str, str], None], *, endpoint: str = ""):
        self.client = client
        self.notify = notify
        self.endpoint = endpoint or client.endpoint
        self.up: bool | None = None  # None until the first answer or failure
        self.boot_id: str | None = None

    async def run(self) -> None:
        while True:
            up = await self.check()
            await asyncio.sleep(UP_INTERVAL if up else DOWN_INTERVAL)

    async def check(self, *, quiet: bool = False) -> bool:
        try:
            pong = await self.client.ping(timeout=PING_TIMEOUT)
        except ServiceError:
            if self.up is not False and not quiet:
                self.notify(f"the broker at {self.endpoint} is not answering; retrying every "
                            f"{DOWN_INTERVAL:g} s (commands fail until it is back)", "warning")
            self.up = False
            return False
        boot = pong.boot_id
        if self.up is False:
            self.notify(f"connected to the broker at {self.endpoint}", "notice")
        elif self.up is True and self.boot_id is not None and boot != self.boot_id:
            self.notify("the broker restarted; requests in flight go on (workers hand them over) "
                        "or are sent again where safe", "warning")
        self.up = True
        self.boot_id = boot if isinstance(boot, str) else None
        return True

    async def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the broker; say once that we are waiting."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if await self.check(quiet=True):
            return True
        self.notify(f"waiting up to {timeout:g} s for the broker at {self.endpoint} ...", "warning")
        while loop.time() < deadline:
            await asyncio.sleep(min(DOWN_INTERVAL, max(0.0, deadline - loop.time())))
            if await self.check(quiet=True):
                return True
        return False
