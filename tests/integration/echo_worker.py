"""A real worker process for broker tests: the production runtime with tiny test handlers."""

from __future__ import annotations

import asyncio
import os

from batos.worker import Request, run_service


async def echo(req: Request) -> dict:
    return {"echo": req.args, "pid": os.getpid()}


async def slow(req: Request) -> dict:
    steps = req.arg("steps", int, 5)
    for i in range(steps):
        await req.emit("tick", i=i, pid=os.getpid())
        await asyncio.sleep(req.arg("delay", float, 0.2))
    return {"done": steps, "pid": os.getpid()}


async def spin(req: Request) -> dict:
    """Blocking work in a thread: heartbeats must keep flowing meanwhile."""
    seconds = req.arg("seconds", float, 5.0)

    def burn() -> int:
        import time

        end, n = time.monotonic() + seconds, 0
        while time.monotonic() < end and not req.cancelled.is_set():
            n += 1
        return n

    return {"iterations": await req.run_blocking(burn), "pid": os.getpid()}


async def big(req: Request) -> dict:
    """A reply of ``size`` bytes: over the frame limit, the runtime must answer with an error instead."""
    return {"data": b"x" * req.arg("size", int, 1024), "pid": os.getpid()}


async def relay(req: Request) -> dict:
    """Wait on another service, as the kernel waits on memory: the wait must not hold this worker's slot."""
    reply = await req.client.call(req.arg("service", str), "echo", {"via": os.getpid()}, timeout=60)
    return {"relayed": reply, "pid": os.getpid()}


class ClientDisconnected(Exception):
    """Named like ZEO's: the runtime recognises the class name, as it does for the real one."""


async def fail(req: Request) -> dict:
    """Raise what a library would: its raw text must not reach the caller."""
    if req.arg("kind", str, "bug") == "zeo":
        raise ClientDisconnected("[Errno 104] Connection reset by peer")
    raise ValueError("internal detail: /srv/secret/path line 42")


if __name__ == "__main__":
    run_service(os.environ.get("BATOS_TEST_SERVICE", "echo"),
                {"echo": echo, "slow": slow, "spin": spin, "big": big, "fail": fail, "relay": relay},
                capacity=int(os.environ.get("BATOS_TEST_CAPACITY", "4")))
