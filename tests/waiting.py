"""Tests wait for a condition, never for a guessed number of seconds (issue 15 item 8).

``await until(check, what=...)`` polls ``check`` (a function, or a coroutine function) until it returns
something true and returns that; past ``timeout`` it fails naming what it waited for and the last value seen.
A sleep stays only where the sleep is the behaviour under test (a slow handler, an idle period).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")
POLL_S = 0.05


async def until(check: Callable[[], T | Awaitable[T]], *, what: str, timeout: float = 30.0,
                poll: float = POLL_S) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]  # an awaited T
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout} s for {what}; last seen: {value!r:.300}")
        await asyncio.sleep(poll)


def until_sync(check: Callable[[], T], *, what: str, timeout: float = 30.0, poll: float = POLL_S) -> T:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout} s for {what}; last seen: {value!r:.300}")
        time.sleep(poll)
    return value
