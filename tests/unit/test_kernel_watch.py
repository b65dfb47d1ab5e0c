"""The watch hub (services/kernel/watch.py): every activity's events to every watcher, bounded; `watch ID` replays
then follows; a slow watcher loses events (counted), never the work; worker restarts from the broker's table."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest

from batos.errors import ServiceError
from proto.bodies import kernel as K
from proto.bodies.broker import WorkerTable
from services.kernel import commands
from services.kernel.autotelic import Autotelic
from services.kernel.kernel import Kernel
from services.kernel.watch import WatchHub, hub_of, watch
from tests.unit.test_kernel_cycle import *  # noqa: F403  (the kernel test kit: fixtures)
from tests.unit.test_kernel_cycle import Events, memory_stats, worker_table


@pytest.fixture
def kernel(env):
    return Kernel(env, Autotelic(env))


class Watch:
    """A `watch` request in flight against ``kernel``, its events collected as they are sent."""

    def __init__(self, kernel: Kernel, ident: str = "", *, gate: asyncio.Event | None = None):
        self.events = Events()
        self.gate = gate  # while clear, the watcher's console is not reading: each send waits
        self.seen = asyncio.Event()
        self.task = asyncio.create_task(watch(kernel, self._emit, ident))

    async def _emit(self, name: str, **data: Any) -> None:
        if self.gate is not None:
            await self.gate.wait()
        await self.events(name, **data)
        self.seen.set()

    async def until(self, match: Any, timeout: float = 5.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                found = [d for n, d in self.events.items if match(n, d)]
                if found:
                    return found[0]
                self.seen.clear()
                await self.seen.wait()

    async def stop(self) -> None:
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task


def _settle() -> Any:
    return asyncio.sleep(0)


async def test_a_watcher_sees_every_activity_begin_events_end_whoever_asked(kernel, client):
    client.handlers[("memory", "search")] = lambda body, ev: {"hits": []}
    w = Watch(kernel)
    await w.until(lambda n, d: n == "watching")
    asker = Events()
    with pytest.raises(ServiceError):  # no llm here: the cycle fails after its own transitions
        await commands.dispatch(kernel, asker, K.Ask(question="who watches?"))
    end = await w.until(lambda n, d: n == "end")
    cycle_id = asker.items[0][1]["cycle_id"]
    begin = next(d for n, d in w.events.items if n == "begin")
    assert begin["command"] == "ask" and begin["about"] == "who watches?"
    # every event the asker got, the watcher got too, tagged with the activity, in the same order
    mine = [(n, d.get("state")) for n, d in w.events.items if d.get("cycle_id") == cycle_id]
    assert mine == [(n, d.get("state")) for n, d in asker.items]
    assert {d["activity"] for n, d in w.events.items if n in ("begin", "state", "end")} == {begin["activity"]}
    assert end["ok"] is False and end["code"] and "FAILED" in end["message"]
    # read-only lookups are not activities
    client.handlers[("memory", "stats")] = lambda body, ev: memory_stats({})
    await commands.dispatch(kernel, Events(), K.Stats())
    await _settle()
    assert [n for n, _ in w.events.items].count("begin") == 1
    await w.stop()
    assert not hub_of(kernel.env).watchers


async def test_a_slow_watcher_loses_the_oldest_events_counted_and_never_holds_the_work(kernel):
    hub = WatchHub(queue_events=5)
    kernel.env.watch_hub = hub
    gate = asyncio.Event()  # the watcher's console stops reading
    w = Watch(kernel, gate=gate)
    await _settle()
    activity = hub.begin("ingest", about="/src")
    for i in range(100):  # publishing never waits, however far behind the watcher is
        hub.publish(activity, "progress", {"stage": "CHUNKING", "done": i + 1, "total": 100})
    hub.end(activity, {"ok": True, "files": 100})
    gate.set()
    end = await w.until(lambda n, d: n == "end")
    missed = sum(d["count"] for d in w.events.of("missed"))
    progress = w.events.of("progress")
    assert missed > 0 and end["files"] == 100
    # what it got plus what it was told it missed is everything published to it (begin + 100 + end)
    delivered = [n for n, d in w.events.items if d.get("activity") == activity.id]
    assert len(delivered) + missed == 102 and delivered[-1] == "end"
    assert progress[-1]["done"] == 100  # the oldest went, the newest stayed
    await w.stop()


async def test_watch_id_replays_the_cycle_so_far_then_follows_it_to_its_end(kernel):
    hub = WatchHub(replay_events=4)
    kernel.env.watch_hub = hub
    activity = hub.begin("ask", about="q")
    cid = "1a2b3c4d-0000-4000-8000-000000000001"
    for state in ("IDLE", "DECOMPOSING", "REASONING"):
        hub.publish(activity, "state", {"cycle_id": cid, "state": state})
    hub.publish(activity, "thought", {"cycle_id": cid, "step": 1, "text": "look at the broker"})
    hub.publish(activity, "state", {"cycle_id": cid, "state": "SYNTHESIZING"})
    for word in ("The ", "broker ", "relays."):
        hub.publish(activity, "token", {"cycle_id": cid, "text": word})
    w = Watch(kernel, "1a2b3c4d")  # the prefix the console shows
    hello = await w.until(lambda n, d: n == "watching")
    assert hello["target"]["id"] == cid and hello["target"]["state"] == "SYNTHESIZING"
    replay = [(n, d.get("state") or d.get("text")) for n, d in w.events.items if d.get("replay")]
    # bounded: the first two transitions were not kept (and the watcher is told so); tokens are one text
    assert replay == [("state", "REASONING"), ("thought", "look at the broker"), ("state", "SYNTHESIZING"),
                      ("token", "The broker relays.")]
    assert w.events.of("missed") == [{"count": 2, "earlier": True}]
    hub.publish(activity, "state", {"cycle_id": cid, "state": "VALIDATING"})
    hub.publish(activity, "state", {"cycle_id": cid, "state": "COMPLETE", "note": "SUCCESS"})
    reply = await asyncio.wait_for(w.task, 5)
    live = [d["state"] for n, d in w.events.items if n == "state" and not d.get("replay")]
    assert live == ["VALIDATING", "COMPLETE"]
    assert reply.watched == cid and reply.state == "COMPLETE" and reply.note == "SUCCESS"
    assert reply.missed == 2
    assert not hub.watchers
    # just too late is still in time: a cycle that ended recently replays and ends at once
    late = Watch(kernel, cid)
    reply = await asyncio.wait_for(late.task, 5)
    assert reply.state == "COMPLETE" and late.events.of("state")[-1]["replay"] is True


async def test_ids_are_found_by_unique_prefix_and_unknown_ones_are_clear_errors(kernel):
    hub = hub_of(kernel.env)
    a, b = hub.begin("ingest"), hub.begin("forge")
    assert hub.find(a.id[:8]).id == a.id and hub.find(b.id.upper()).id == b.id
    with pytest.raises(ServiceError, match="no activity or cycle") as info:
        hub.find("ffffffffffff")
    assert info.value.code == "not_found"
    hub.begin("audit")
    shared = next((x.id[:4] for x in hub.trails.values() if sum(t.startswith(x.id[:4]) for t in hub.trails) > 1),
                  None)
    if shared is not None:  # 3 random ids rarely share 4 hex digits; when they do, the prefix is ambiguous
        with pytest.raises(ServiceError, match="names 2"):
            hub.find(shared)
    with pytest.raises(msgspec.ValidationError, match=r"at `\$\.id`"):  # the id's rule is Watch's type
        msgspec.convert({"id": "not hex!"}, K.Watch)


async def test_watchers_are_bounded_and_leave_nothing_behind(kernel, client, settings):
    kernel.env.watch_hub = WatchHub(max_watchers=2, worker_poll_s=0.01)
    client.handlers[("broker", "workers")] = lambda body, ev: worker_table()
    first, second = Watch(kernel), Watch(kernel)
    await first.until(lambda n, d: n == "watching")
    await second.until(lambda n, d: n == "watching")
    with pytest.raises(ServiceError, match="already has 2 watchers") as info:
        await watch(kernel, Events(), "")
    assert info.value.code == "busy"
    hub = kernel.env.watch_hub
    assert hub._poller is not None and not hub._poller.done()
    await first.stop()
    await second.stop()
    assert not hub.watchers and hub._poller is None


async def test_a_quiet_watch_sends_keepalives(kernel, settings):
    kernel.env.settings = settings.model_copy(update={"watch_keepalive_s": 0.05})
    w = Watch(kernel)
    await w.until(lambda n, d: n == "keepalive")
    await w.stop()


def test_worker_restarts_and_broker_restarts_are_seen_in_the_worker_table():
    hub = WatchHub()
    seen: list[dict[str, Any]] = []

    class Sink:  # a watcher of everything, read directly
        target = None

        def wants(self, event: dict[str, Any]) -> bool:
            return True

        def offer(self, event: dict[str, Any]) -> None:
            seen.append(event)

    hub.watchers.add(Sink())  # type: ignore[arg-type]

    def table(*workers: tuple[str, str, int, bool]) -> WorkerTable:
        return msgspec.convert(worker_table(*workers), WorkerTable)

    hub.workers_seen(table(("llm", "forge-a", 10, True), ("memory", "mem-a", 11, True)), "boot1")
    assert seen == []  # the first table is the baseline
    hub.workers_seen(table(("memory", "mem-a", 11, False)), "boot1")
    hub.workers_seen(table(("llm", "forge-b", 12, True), ("memory", "mem-a", 11, True)), "boot2")
    assert [(e["event"], e.get("change"), e.get("service"), e.get("pid")) for e in seen] == [
        ("worker", "gone", "llm", 10), ("worker", "silent", "memory", 11),
        ("broker", "restarted", None, None), ("worker", "joined", "llm", 12), ("worker", "alive again", "memory", 11)]


async def test_watch_of_an_ingest_replays_its_latest_progress_and_ends_with_it(kernel):
    hub = hub_of(kernel.env)
    activity = hub.begin("ingest", about="/src", by="0badf00d")
    for stage, total in (("CHUNKING", 3), ("EMBEDDING", 40)):
        for done in range(1, total + 1):
            hub.publish(activity, "progress", {"stage": stage, "done": done, "total": total})
    w = Watch(kernel, activity.id[:8])
    hello = await w.until(lambda n, d: n == "watching")
    assert hello["target"]["kind"] == "activity" and hello["target"]["progress"] == {
        "stage": "EMBEDDING", "done": 40, "total": 40}
    replay = [(n, d.get("stage"), d.get("done")) for n, d in w.events.items if d.get("replay")]
    assert replay == [("begin", None, None), ("progress", "CHUNKING", 3), ("progress", "EMBEDDING", 40)]
    hub.publish(activity, "progress", {"stage": "INDEXING", "done": 1, "total": 1})
    hub.end(activity, {"ok": True, "files": 3})
    reply = await asyncio.wait_for(w.task, 5)
    assert reply == K.WatchReply(watched=activity.id, kind="activity", command="ingest", state=None, missed=0, ok=True)
    assert [n for n, d in w.events.items if not d.get("replay")][-2:] == ["progress", "end"]
