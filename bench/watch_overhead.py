"""What `watch` costs the kernel per event (issue 14 item 9).

Every event the kernel streams to a requester also goes to the watch hub (services/kernel/watch.py). Measured in
one process, against the work the worker runtime already does per event (encode the event envelope, the
baseline):

1. publish: the hub's bookkeeping per event (trails, every watcher's queue) with 0, 1 and 16 watchers;
2. delivered: with W real `watch` loops draining their queues and encoding each event for their console (what a
   watcher really costs: one more envelope per watcher per event).

Prints microseconds per event and the ratio to the baseline.

    .venv/bin/python bench/watch_overhead.py [--events 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from types import SimpleNamespace
from typing import Any

import proto
from batos.config import load
from services.kernel.watch import WatchHub, watch

REQ = proto.request("kernel", "ask", {"question": "q"})
CYCLE = "1a2b3c4d-0000-4000-8000-000000000001"


def encode(name: str, data: dict[str, Any]) -> bytes:
    return proto.encode(proto.event(REQ, name, data))


async def baseline_emit(name: str, **data: Any) -> None:
    encode(name, data)


async def emit_events(emit: Any, n: int) -> float:
    started = time.process_time()  # CPU time: the machine is shared, wall time is noise
    for i in range(n):
        await emit("token", cycle_id=CYCLE, text=f"word{i % 50} ")
        if i % 64 == 0:
            await asyncio.sleep(0)  # the kernel yields between LLM tokens: watchers get their turn
    return time.process_time() - started


async def publish_only(n: int, watchers: int) -> float:
    hub = WatchHub(max_watchers=watchers + 1)
    for _ in range(watchers):
        hub.subscribe("")  # never drained: each queue stays full and drops its oldest
    tapped, activity = hub.tap(baseline_emit, "ask")
    took = await emit_events(tapped, n)
    hub.end(activity, {"ok": True})
    return took


async def delivered(n: int, watchers: int) -> float:
    """Publishing plus W watch loops that encode every event for their console (CPU time of the whole loop)."""
    hub = WatchHub(max_watchers=watchers + 1, queue_events=n + 10)
    settings = load(watch_keepalive_s=3600.0)
    kernel = SimpleNamespace(env=SimpleNamespace(settings=settings, watch_hub=hub, client=None, instance="bench"))
    hub.follow_workers = lambda client: None  # type: ignore[method-assign]  (no broker here)
    tasks = [asyncio.create_task(watch(kernel, baseline_emit)) for _ in range(watchers)]
    await asyncio.sleep(0)
    tapped, activity = hub.tap(baseline_emit, "ask")
    started = time.process_time()
    await emit_events(tapped, n)
    while any(w.queue for w in hub.watchers):
        await asyncio.sleep(0)
    took = time.process_time() - started
    hub.end(activity, {"ok": True})
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return took


async def main(n: int) -> None:
    await emit_events(baseline_emit, n // 4)  # warm up
    base = await emit_events(baseline_emit, n)
    per = lambda s: s / n * 1e6
    print(f"baseline (encode one event envelope): {per(base):.2f} µs/event")
    for w in (0, 1, 16):
        took = await publish_only(n, w)
        print(f"publish, {w:>2} watchers (not draining): {per(took):6.2f} µs/event  ({took / base:.2f}x baseline)")
    for w in (1, 4, 16):
        took = await delivered(n, w)
        print(f"delivered to {w:>2} watchers (each encodes it): {per(took):6.2f} µs/event  ({took / base:.2f}x "
              f"baseline; {took / base / (1 + w):.2f}x per envelope sent)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=20000)
    asyncio.run(main(p.parse_args().events))
