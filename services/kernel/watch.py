"""The watch hub: every console may see what the kernel is doing, whoever asked for it.

Every command the kernel runs, but the read-only lookups, is an *activity* (commands.dispatch taps its
``emit``): the hub hears its begin, each event it streams to its requester (cycle states, thoughts, actions,
observations, tokens, ingest progress, forge stages) and its end. ``publish`` is synchronous and never waits: a
watcher is a bounded queue, and when it is full the oldest event is dropped and counted, so a slow or dead
watcher can never slow or fail the work it watches; the watcher is told ``missed N`` before the next event it
does get.

Each activity and each cycle keeps a bounded trail (the last ``watch_replay_events`` events, tokens merged into
one text, progress of one stage kept as its latest), so ``watch ID`` attached mid-way first replays what the
cycle has done so far, then follows it live until it ends. Subscribing copies the trail and registers the
watcher in one synchronous step: no event falls between the replay and the live stream.

Worker restarts: while anyone watches, a poller asks the broker for its worker table every
``watch_worker_poll_s`` (the read-only ``broker.workers`` every console may call anyway) and publishes the
differences (a worker gone, one registered) and a change of the broker's boot id. Polling keeps the broker a pure
relay (it has no subscription mechanism to add), costs nothing when nobody watches, and a 2 s poll is well under
the time a worker takes to come back (2-25 s).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from batos.errors import ServiceError
from proto import ErrorCode
from proto.bodies.broker import Workers, WorkerTable
from proto.bodies.kernel import WatchReply
from proto.roles import requester_tag
from services.kernel.env import Emit, KernelEnv, ServiceCaller

if TYPE_CHECKING:
    from services.kernel.kernel import Kernel

log = logging.getLogger("batos.kernel.watch")

TERMINAL_STATES = ("COMPLETE", "FAILED")
RECENT_TRAILS = 32  # ended activities and cycles kept for a `watch ID` that comes just too late
TOKEN_REPLAY_CHARS = 8000  # streamed answer text a replay carries; the rest is in the requester's reply
TEXT_CHARS = 4000  # longer strings in a watched event are cut (the requester gets them whole)
ID_PREFIX_MIN = 4  # `watch 1a2b` may name an id by a prefix this long, when only one id has it
WORKERS_TIMEOUT = 5.0  # the broker answers `workers` itself: seconds at most


def _clipped(data: dict[str, Any]) -> dict[str, Any]:
    if not any(isinstance(v, str) and len(v) > TEXT_CHARS for v in data.values()):
        return data
    return {k: v[:TEXT_CHARS] + "…" if isinstance(v, str) and len(v) > TEXT_CHARS else v for k, v in data.items()}


@dataclass
class Trail:
    """What one activity or cycle has done so far: its last events, bounded."""

    id: str
    kind: str  # "activity" or "cycle"
    command: str
    activity: str
    limit: int
    events: deque[dict[str, Any]] = field(default_factory=deque)
    dropped: int = 0
    state: str = ""
    ended: dict[str, Any] | None = None  # the end event, once it ended
    started: float = field(default_factory=time.monotonic)

    def add(self, event: dict[str, Any]) -> None:
        name = event.get("event")
        last = self.events[-1] if self.events else None
        if name == "state":
            self.state = str(event.get("state", self.state))
        if last is not None and name == "token" and last.get("event") == "token":
            text = last.get("text", "")
            if len(text) < TOKEN_REPLAY_CHARS:  # one growing text, not hundreds of one-word events
                self.events[-1] = {**last, "text": (text + str(event.get("text", "")))[:TOKEN_REPLAY_CHARS]}
            return
        if (last is not None and name == "progress" and last.get("event") == "progress"
                and last.get("stage") == event.get("stage")):
            self.events[-1] = event  # the latest progress of a stage says all the earlier ones did
            return
        self.events.append(event)
        if len(self.events) > self.limit:
            self.events.popleft()
            self.dropped += 1

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "kind": self.kind, "command": self.command, "activity": self.activity,
                               "age_s": round(time.monotonic() - self.started, 1)}
        if self.state:
            out["state"] = self.state
        progress = next((e for e in reversed(self.events) if e.get("event") == "progress"), None)
        if progress is not None:
            out["progress"] = {k: progress[k] for k in ("stage", "done", "total") if k in progress}
        return out


class Watcher:
    """One console's view: a bounded queue; when it is full the oldest event goes and is counted."""

    def __init__(self, limit: int, target: Trail | None = None):
        self.limit = max(1, limit)
        self.target = target  # None: everything; else one activity or cycle
        self.queue: deque[dict[str, Any]] = deque()
        self.missed = 0
        self.missed_total = 0
        self.finished = False  # the target ended: its last event is in the queue
        self.replay: list[dict[str, Any]] = []
        self.replay_dropped = 0
        self._wake = asyncio.Event()

    def wants(self, event: dict[str, Any]) -> bool:
        t = self.target
        if t is None or event.get("activity") is None:  # everything, and system events (workers, broker)
            return True
        if t.kind == "cycle":
            return event.get("cycle_id") == t.id or (event.get("event") == "end" and event["activity"] == t.activity)
        return event["activity"] == t.id

    def offer(self, event: dict[str, Any]) -> None:
        if self.finished:
            return
        if len(self.queue) >= self.limit:
            self.queue.popleft()
            self.missed += 1
            self.missed_total += 1
        self.queue.append(event)
        if self.target is not None and _ends(self.target, event):
            self.finished = True
        self._wake.set()

    async def take(self, timeout: float) -> tuple[list[dict[str, Any]], int] | None:
        """What is queued and how many were dropped before it; None after ``timeout`` s of silence."""
        if not self.queue:
            self._wake.clear()
            try:
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                return None
        batch, missed = list(self.queue), self.missed
        self.queue.clear()
        self.missed = 0
        return batch, missed


def _ends(target: Trail, event: dict[str, Any]) -> bool:
    if event.get("event") == "end" and event.get("activity") == target.activity:
        return True  # the activity is over, whatever state its cycle reached
    return (target.kind == "cycle" and event.get("event") == "state" and event.get("cycle_id") == target.id
            and event.get("state") in TERMINAL_STATES)


@dataclass
class Activity:
    id: str
    command: str
    trail: Trail


class WatchHub:
    def __init__(self, *, queue_events: int = 256, replay_events: int = 200, max_watchers: int = 16,
                 worker_poll_s: float = 2.0, instance: str = ""):
        self.queue_events = queue_events
        self.replay_events = replay_events
        self.max_watchers = max_watchers
        self.worker_poll_s = worker_poll_s
        self.instance = instance
        self.activities: dict[str, Activity] = {}
        self.trails: dict[str, Trail] = {}  # live activities and cycles, by id
        self.recent: OrderedDict[str, Trail] = OrderedDict()  # ended ones, newest last
        self.watchers: set[Watcher] = set()
        self.published = 0
        self._poller: asyncio.Task | None = None
        self._workers: dict[str, dict[str, Any]] | None = None
        self._boot_id: str | None = None

    # -- the publishing side (commands.dispatch) ------------------------------------------------------

    def tap(self, emit: Emit, command: str, *, about: str = "", by: str = "") -> tuple[Emit, Activity]:
        """Begin an activity; the returned emit publishes each event, then sends it to the requester."""
        activity = self.begin(command, about=about, by=by)

        async def tapped(name: str, **data: Any) -> None:
            self.publish(activity, name, data)
            await emit(name, **data)

        return tapped, activity

    def begin(self, command: str, *, about: str = "", by: str = "") -> Activity:
        aid = uuid.uuid4().hex
        activity = Activity(aid, command, Trail(aid, "activity", command, aid, self.replay_events))
        self.activities[aid] = activity
        self.trails[aid] = activity.trail
        self._fan_out(activity.trail, {"event": "begin", "activity": aid, "command": command, "about": about,
                                       "by": by})
        return activity

    def publish(self, activity: Activity, name: str, data: dict[str, Any]) -> None:
        """One event of an activity, to its trails and every watcher that wants it. Never raises, never waits."""
        try:
            event = {**_clipped(data), "event": name, "activity": activity.id, "command": activity.command}
            self._fan_out(activity.trail, event)
        except Exception:  # watching must never break the work watched
            log.exception("watch: event %s of %s not published", name, activity.command)

    def end(self, activity: Activity, outcome: dict[str, Any]) -> None:
        try:
            event = {"event": "end", "activity": activity.id, "command": activity.command, **outcome,
                     "seconds": round(time.monotonic() - activity.trail.started, 2)}
            self._fan_out(activity.trail, event)
        except Exception:
            log.exception("watch: end of %s not published", activity.command)
        finally:
            self.activities.pop(activity.id, None)
            for trail in [t for t in self.trails.values() if t.activity == activity.id]:
                self._retire(trail)

    def system(self, name: str, **data: Any) -> None:
        """An event about the system rather than one activity (workers, the broker)."""
        event = {**data, "event": name}
        for w in list(self.watchers):
            w.offer(event)

    def _fan_out(self, activity_trail: Trail, event: dict[str, Any]) -> None:
        self.published += 1
        activity_trail.add(event)
        cycle_id = event.get("cycle_id")
        if isinstance(cycle_id, str) and cycle_id:
            trail = self.trails.get(cycle_id)
            if trail is None and cycle_id not in self.recent:
                trail = self.trails[cycle_id] = Trail(cycle_id, "cycle", activity_trail.command, activity_trail.id,
                                                      self.replay_events)
            if trail is not None:
                trail.add(event)
                if event.get("event") == "state" and event.get("state") in TERMINAL_STATES:
                    trail.ended = event
                    self._retire(trail)
        if event.get("event") == "end":
            activity_trail.ended = event
        for w in list(self.watchers):
            if w.wants(event):
                w.offer(event)

    def _retire(self, trail: Trail) -> None:
        self.trails.pop(trail.id, None)
        self.recent[trail.id] = trail
        self.recent.move_to_end(trail.id)
        while len(self.recent) > RECENT_TRAILS:
            self.recent.popitem(last=False)

    # -- the watching side ----------------------------------------------------------------------------

    def find(self, ident: str) -> Trail:
        """An activity or cycle in flight or recently ended, by its id or a unique prefix of it."""
        key = ident.strip().lower()
        exact = self.trails.get(key) or self.recent.get(key)
        if exact is not None:
            return exact
        if len(key) >= ID_PREFIX_MIN:
            found = {t.id: t for t in (*self.trails.values(), *self.recent.values()) if t.id.startswith(key)}
            if len(found) == 1:
                return next(iter(found.values()))
            if len(found) > 1:
                raise ServiceError(ErrorCode.BAD_ARGS, f"{ident!r} names {len(found)} activities or cycles; "
                                                       "give more of its id")
        raise ServiceError(ErrorCode.NOT_FOUND, f"no activity or cycle {ident!r} in flight or recently ended on "
                                                f"this kernel; `trace CYCLE_ID` shows a finished cycle's record")

    def subscribe(self, ident: str = "") -> Watcher:
        """A watcher of everything, or of one activity or cycle (with its trail so far to replay)."""
        if len(self.watchers) >= self.max_watchers:
            raise ServiceError(ErrorCode.BUSY, f"the kernel already has {len(self.watchers)} watchers "
                                               "(settings.watch_max_watchers); stop one and try again")
        target = self.find(ident) if ident else None
        w = Watcher(self.queue_events, target)
        if target is not None:  # in the same step as the registration: nothing falls between replay and live
            w.replay = list(target.events)
            w.replay_dropped = target.dropped
            w.finished = target.ended is not None
        if not w.finished:
            self.watchers.add(w)
        return w

    def unsubscribe(self, w: Watcher) -> None:
        self.watchers.discard(w)
        if not self.watchers and self._poller is not None:
            self._poller.cancel()
            self._poller = None

    def in_flight(self) -> list[dict[str, Any]]:
        out = []
        for a in self.activities.values():
            item = a.trail.describe()
            cycles = [t.describe() for t in self.trails.values() if t.kind == "cycle" and t.activity == a.id]
            if cycles:
                item["cycles"] = cycles
            out.append(item)
        return out

    def describe(self) -> dict[str, Any]:
        return {"watchers": len(self.watchers), "activities": len(self.activities), "published": self.published,
                "missed": sum(w.missed_total for w in self.watchers)}

    # -- worker restarts ------------------------------------------------------------------------------

    def follow_workers(self, client: ServiceCaller) -> None:
        """Start the worker-table poller if it is not running (it stops when the last watcher leaves)."""
        if self._poller is None or self._poller.done():
            # a fresh context: the poller serves every watcher, not the request that happened to start it (the
            # worker runtime charges a request's calls to it through a context variable)
            self._poller = asyncio.get_running_loop().create_task(self._poll(client), name="watch-workers",
                                                                  context=contextvars.Context())

    async def _poll(self, client: ServiceCaller) -> None:
        while self.watchers:
            try:
                table = await client.request(Workers(), timeout=WORKERS_TIMEOUT)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the broker is restarting: the boot id will say so
                log.debug("watch: worker table unavailable: %s", e)
            else:
                self.workers_seen(table, getattr(client, "broker_boot_id", None))
            await asyncio.sleep(self.worker_poll_s)

    def workers_seen(self, table: WorkerTable, boot_id: str | None) -> None:
        """Compare a ``broker.workers`` table with the last one and publish what changed."""
        now = _worker_index(table)
        if boot_id and self._boot_id and boot_id != self._boot_id:
            self.system("broker", change="restarted", note="the broker restarted; workers register again")
        self._boot_id = boot_id or self._boot_id
        before, self._workers = self._workers, now
        if before is None:
            return
        for key, w in before.items():
            if key not in now:
                self.system("worker", change="gone", **w)
        for key, w in now.items():
            if key not in before:
                self.system("worker", change="joined", **w)
            elif before[key].get("alive") and not w.get("alive"):
                self.system("worker", change="silent", **w)
            elif not before[key].get("alive") and w.get("alive"):
                self.system("worker", change="alive again", **w)


def _worker_index(table: WorkerTable) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for service, workers in table.services.items():
        for w in workers:
            key = w.identity or f"{service}:{w.pid}"
            out[key] = {"service": service, "pid": w.pid, "alive": w.alive, "uptime_s": w.uptime_s}
    return out


# -- the `watch` command ------------------------------------------------------------------------------


def hub_of(env: KernelEnv) -> WatchHub:
    """The kernel's one hub, made on first use and kept on its KernelEnv."""
    hub = env.watch_hub
    if hub is None:
        s = env.settings
        hub = WatchHub(queue_events=s.watch_queue_events, replay_events=s.watch_replay_events,
                       max_watchers=s.watch_max_watchers, worker_poll_s=s.watch_worker_poll_s,
                       instance=env.instance)
        env.watch_hub = hub
    return hub


async def watch(kernel: Kernel, emit: Emit, ident: str = "") -> WatchReply:
    """Stream what the kernel does (events only) until cancelled; or one activity or cycle until it ends."""
    env = kernel.env
    hub = hub_of(env)
    w = hub.subscribe(ident)
    keepalive = env.settings.watch_keepalive_s
    try:
        hub.follow_workers(env.client)
        await emit("watching", **_hello(hub, w))
        if w.replay_dropped:
            await emit("missed", count=w.replay_dropped, earlier=True)
        for event in w.replay:
            await _send(emit, event, replay=True)
        while not (w.finished and not w.queue):
            got = await w.take(keepalive)
            if got is None:
                await emit("keepalive")  # a silent watch is alive: the console's silence timeout restarts
                continue
            batch, missed = got
            if missed:
                await emit("missed", count=missed)
            for event in batch:
                await _send(emit, event)
        return _result(w.target, w) if w.target is not None else WatchReply()  # only a watch of one target ends
    finally:
        hub.unsubscribe(w)


async def _send(emit: Emit, event: dict[str, Any], **extra: Any) -> None:
    data = {k: v for k, v in event.items() if k != "event"}
    await emit(str(event.get("event", "log")), **data, **extra)


def _hello(hub: WatchHub, w: Watcher) -> dict[str, Any]:
    out: dict[str, Any] = {"kernel": hub.instance, "pid": os.getpid(), "watchers": len(hub.watchers)}
    if w.target is None:
        out["in_flight"] = hub.in_flight()
    else:
        out["target"] = w.target.describe()
        out["replayed"] = len(w.replay)
    return out


def _result(target: Trail, w: Watcher) -> WatchReply:
    end = target.ended or {}
    return WatchReply(watched=target.id, kind=target.kind, command=target.command, state=target.state or None,
                      missed=w.missed_total + w.replay_dropped,
                      **{key: end[key] for key in ("note", "ok", "code", "message", "status") if key in end})


__all__ = ["Activity", "Trail", "WatchHub", "Watcher", "hub_of", "requester_tag", "watch"]
