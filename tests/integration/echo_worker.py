"""A real worker process for broker tests: the production runtime with tiny test handlers.

Typed like every production handler: each command's request and reply types live in
tests/integration/echo_bodies.py and are registered for the service name this process serves.
"""

from __future__ import annotations

import asyncio
import os
import time

from batos.worker import Request, run_service
from proto.contract import Reply
from tests.integration.echo_bodies import (
    Big,
    BigReply,
    Echo,
    EchoReply,
    Fail,
    Relay,
    RelayReply,
    Slow,
    SlowReply,
    Spin,
    SpinReply,
    register,
)


async def echo(req: Request, body: Echo) -> EchoReply:
    return EchoReply(echo=req.args, pid=os.getpid())  # the body as sent: echo's type takes any fields


async def slow(req: Request, body: Slow) -> SlowReply:
    for i in range(body.steps):
        await req.emit("tick", i=i, pid=os.getpid())
        await asyncio.sleep(body.delay)
    return SlowReply(done=body.steps, pid=os.getpid())


async def spin(req: Request, body: Spin) -> SpinReply:
    """Blocking work in a thread: heartbeats must keep flowing meanwhile."""

    def burn() -> int:
        end, n = time.monotonic() + body.seconds, 0
        while time.monotonic() < end and not req.cancelled.is_set():
            n += 1
        return n

    return SpinReply(iterations=await req.run_blocking(burn), pid=os.getpid())


async def big(req: Request, body: Big) -> BigReply:
    """A reply of ``size`` bytes: over the frame limit, the runtime must answer with an error instead."""
    return BigReply(data=b"x" * body.size, pid=os.getpid())


async def relay(req: Request, body: Relay) -> RelayReply:
    """Wait on another service, as the kernel waits on memory: the wait must not hold this worker's slot."""
    reply = await req.client.call(body.service, "echo", {"via": os.getpid()}, timeout=60)
    return RelayReply(relayed=reply, pid=os.getpid())


class ClientDisconnected(Exception):
    """Named like ZEO's: the runtime recognises the class name, as it does for the real one."""


async def fail(req: Request, body: Fail) -> Reply:
    """Raise what a library would: its raw text must not reach the caller."""
    if body.kind == "zeo":
        raise ClientDisconnected("[Errno 104] Connection reset by peer")
    raise ValueError("internal detail: /srv/secret/path line 42")


HANDLERS = {"echo": echo, "slow": slow, "spin": spin, "big": big, "fail": fail, "relay": relay}


if __name__ == "__main__":
    service = os.environ.get("BATOS_TEST_SERVICE", "echo")
    register(service)
    run_service(service, HANDLERS, capacity=int(os.environ.get("BATOS_TEST_CAPACITY", "4")))
