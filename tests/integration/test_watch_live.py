"""Many consoles, one live system: real consoles (``batos-console`` processes) against the real kernel, with
broker, ZEO, memory, ingest and forge (the llm service, SmolLM2-135M) as real processes.

One console watches while others ask and ingest: the watcher sees every cycle's states, thoughts and answer as
they happen (before the asker has its reply), `watch CYCLE_ID` from a third console attaches to a cycle in
flight (what it did so far, then live, nothing lost or doubled at the seam), several consoles asking at once
each get only their own cycle, a worker's restart is seen, and watchers that stall or die never hold up the
work. The kernel runs with small budgets (one ReAct step, 24 answer tokens) so a cycle takes seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio

import proto
from batos.client import Client
from tests.conftest import System

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(420)]

PY = sys.executable
KERNEL_ENV = {
    "BATOS_REACT_MAX_STEPS": "1",
    "BATOS_ANSWER_BUDGET_TOKENS": "500",
    "BATOS_ANSWER_MAX_TOKENS": "24",
    "BATOS_CYCLE_TIMEOUT": "300",
    "BATOS_AUTOTELIC_PERIOD": "3600",  # no background LLM summaries competing with the cycles under test
    "BATOS_WATCH_WORKER_POLL_S": "0.5",
    "BATOS_KERNEL_INSTANCE": "kernel-watch-test",
}
SERVICES = {"kernel": 1, "memory": 1, "ingest": 1, "llm": 1, "forge": 1}
FILES = {
    "geometry.py": '"""Shapes."""\nimport math\n\n\ndef area_of_circle(radius):\n'
                   '    """The area of a circle."""\n    return math.pi * radius ** 2\n',
    "inventory.py": '"""Stock keeping."""\n\n\ndef restock(stock, item, count):\n'
                    '    """Add count units of item."""\n    stock[item] = stock.get(item, 0) + count\n'
                    '    return stock\n',
}
TERMINAL = ("COMPLETE", "FAILED")
_ARRIVAL = itertools.count()  # one order of arrival across every console this module reads
_SPAWNED: list[asyncio.subprocess.Process] = []  # the consoles this module started


@pytest.fixture(autouse=True)
def _no_console_outlives_its_test() -> Iterator[None]:
    """A watch runs until it is interrupted: a test that fails before that must not leave its console behind."""
    yield
    while _SPAWNED:
        proc = _SPAWNED.pop()
        if proc.returncode is None:  # not seen to end (its test's event loop is closed: signal the pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)


@dataclass
class Live:
    system: System
    root: Path


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    root = tmp_path_factory.mktemp("watch_live")
    system = System(root)
    try:
        tree = system.start_cognitive(FILES, **KERNEL_ENV)

        async def ready() -> None:
            async with Client(system.settings, identity="watch-live-setup") as client:
                await client.wait_for_broker(20)
                await system.wait_registered(client, SERVICES, timeout=300)
                await client.call("kernel", "ingest", {"path": str(tree)}, timeout=300)

        asyncio.run(ready())
        yield Live(system, root)
    finally:
        system.stop_all()


# -- consoles as processes -----------------------------------------------------------------------------------


@dataclass
class Console:
    """A ``batos-console --json`` process; its stdout objects collected as they arrive, in arrival order."""

    proc: asyncio.subprocess.Process
    objs: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    reader: asyncio.Task | None = None

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            self.objs.append((next(_ARRIVAL), json.loads(line)))
            self.changed.set()

    async def until(self, match: Callable[[dict[str, Any]], bool], timeout: float = 180) -> tuple[int, dict]:
        async with asyncio.timeout(timeout):
            while True:
                for seq, obj in self.objs:
                    if match(obj):
                        return seq, obj
                if self.reader is not None and self.reader.done():
                    raise AssertionError(f"the console ended first: {self.objs[-3:]}")
                self.changed.clear()
                await self.changed.wait()

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        return [o["body"] for _, o in self.objs
                if o["kind"] == "event" and (name is None or o["body"]["event"] == name)]

    async def finish(self, timeout: float = 180) -> int:
        await asyncio.wait_for(self.proc.wait(), timeout)
        if self.reader is not None:
            await self.reader
        return self.proc.returncode or 0

    async def interrupt(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        return await self.finish(30)


async def console(live: Live, *args: str, stdin: bool = False) -> Console:
    proc = await asyncio.create_subprocess_exec(
        PY, "-m", "services.console", "--endpoint", live.system.endpoint, "--json", *args,
        env=live.system.env(), stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    _SPAWNED.append(proc)
    c = Console(proc)
    c.reader = asyncio.create_task(c._read())
    return c


async def watcher(live: Live, *ident: str) -> Console:
    c = await console(live, "-c", " ".join(("watch", *ident)))
    await c.until(lambda o: o["kind"] == "event" and o["body"]["event"] == "watching")
    return c


def event(name: str, **match: Any) -> Callable[[dict[str, Any]], bool]:
    return lambda o: (o["kind"] == "event" and o["body"]["event"] == name
                      and all(o["body"].get(k) == v for k, v in match.items()))


def reply(o: dict[str, Any]) -> bool:
    return o["kind"] in ("reply", "error")


def states(events: list[dict[str, Any]], cycle_id: str) -> list[str]:
    return [e["state"] for e in events if e["event"] == "state" and e.get("cycle_id") == cycle_id]


# -- the tests ---------------------------------------------------------------------------------------------


async def test_watch_cycle_id_attaches_mid_cycle_from_another_console(live):
    late = await console(live, stdin=True)  # started and waiting for its line before the cycle begins
    asker = await console(live, "-c", "ask what does restock do with the count?")
    _, first = await asker.until(event("state", state="IDLE"))
    cycle_id = first["body"]["cycle_id"]
    assert late.proc.stdin is not None
    late.proc.stdin.write(f"watch {cycle_id[:8]}\n".encode())  # the short id every console shows
    late.proc.stdin.close()
    assert await late.finish() == 0 and await asker.finish() == 0

    _, hello = await late.until(event("watching"))
    assert hello["body"]["target"]["id"] == cycle_id
    seen = late.events()
    replayed = [e for e in seen if e.get("replay")]
    followed = [e for e in seen if e["event"] not in ("watching", "keepalive") and not e.get("replay")]
    assert replayed and replayed[0]["state"] == "IDLE"  # what it did before the attach, from its start
    assert followed, "nothing arrived live: the cycle ended before the attach?"
    # nothing lost, nothing twice at the seam between replay and live
    assert states(seen, cycle_id) == states(asker.events(), cycle_id)
    _, final = await late.until(reply)
    assert final["kind"] == "reply" and final["body"]["watched"] == cycle_id
    assert final["body"]["state"] == states(asker.events(), cycle_id)[-1] in TERMINAL


async def test_several_consoles_ask_at_once_and_another_watches_them_live(live):
    """Each asking console gets only its own cycle (issue 15 item 8: this used a stand-in kernel), and the
    watching console sees every cycle's states, thoughts and answer as they happen."""
    w = await watcher(live)
    questions = [f"how is {name} computed, case {i}?" for i, name in enumerate(("area_of_circle", "restock",
                                                                               "area_of_circle"))]
    askers = await asyncio.gather(*(console(live, "-c", f"ask {q}") for q in questions))
    assert [await a.finish() for a in askers] == [0, 0, 0]
    cycles = []
    for a in askers:
        assert len({o["id"] for _, o in a.objs}) == 1  # one request's messages, nothing else
        _, answered = await a.until(reply)
        cycle_id = answered["body"]["cycle_id"]
        assert {e.get("cycle_id") for e in a.events() if e["event"] != "token"} == {cycle_id}
        cycles.append(cycle_id)
    assert len(set(cycles)) == 3

    for q, asker, cycle_id in zip(questions, askers, cycles, strict=True):
        # the watcher knows which question each cycle answered: the one its console asked
        _, begin = await w.until(event("begin", about=q))
        activity = begin["body"]["activity"]
        assert len(begin["body"]["by"]) == 8
        end = (await w.until(event("end", activity=activity)))[1]["body"]
        assert {e["activity"] for e in w.events() if e.get("cycle_id") == cycle_id} == {activity}
        # every state and token the asker saw, the watcher saw, in the same order
        asked = asker.events()
        assert states(w.events(), cycle_id) == states(asked, cycle_id) == \
            ["IDLE", "DECOMPOSING", "REASONING", "SYNTHESIZING", "VALIDATING", "COMPLETE"]
        assert [e["text"] for e in w.events("token") if e["cycle_id"] == cycle_id] == \
            [e["text"] for e in asked if e["event"] == "token"]
        _, answered = await asker.until(reply)
        assert end["ok"] is True and end["status"] == answered["body"]["status"]
        # live, not after: the watcher had the cycle's REASONING before its asker had COMPLETE
        seen_reasoning, _ = await w.until(event("state", cycle_id=cycle_id, state="REASONING"))
        asker_complete, _ = await asker.until(event("state", cycle_id=cycle_id, state="COMPLETE"))
        assert seen_reasoning < asker_complete
    assert await w.interrupt() == 130


async def test_an_ingest_started_elsewhere_and_a_worker_restart_are_watched(live):
    tree = live.root / "more"
    tree.mkdir()
    for i in range(6):
        (tree / f"mod{i}.py").write_text(f'"""Module {i}."""\n\n\ndef f{i}(x):\n    return x + {i}\n')
    w = await watcher(live)
    ingester = await console(live, "-c", f"ingest {tree}")
    assert await ingester.finish() == 0
    _, done = await ingester.until(reply)
    end = (await w.until(event("end", command="ingest")))[1]["body"]
    begin = next(e for e in w.events("begin") if e["activity"] == end["activity"])
    assert begin["about"] == str(tree)
    progress = [e for e in w.events("progress") if e["activity"] == end["activity"]]
    assert progress and progress == [{**e, "activity": end["activity"], "command": "ingest"}
                                     for e in ingester.events("progress")]
    assert end["ok"] is True and end["files"] == done["body"]["files"] == 6

    # the ingest worker is killed and another takes its place: the watcher is told both
    old = next(p for p in live.system.procs if p.name == "ingest" and p.alive())
    old.kill()
    await w.until(event("worker", change="gone", service="ingest", pid=old.pid), timeout=60)
    new = live.system.start_service("ingest", BATOS_INGEST_ROOTS=str(live.root))
    await w.until(event("worker", change="joined", service="ingest", pid=new.pid), timeout=120)
    assert await w.interrupt() == 130


async def watchers_now(client: Client) -> int:
    """How many watch the kernel, this one included (its hello says), then it goes away."""
    call = await client.start_call("kernel", "watch", {})
    try:
        async for env in call.events():
            if env.kind == proto.Kind.EVENT and env.body.get("event") == "watching":
                return int(env.body["watchers"])
        raise AssertionError("the watch ended before its hello")
    finally:
        await client.cancel(call.id)
        client.pending.pop(call.id, None)


async def test_watchers_that_stall_or_die_never_hold_up_the_work(live):
    ctx = zmq.asyncio.Context.instance()
    stalled = ctx.socket(zmq.DEALER)  # a console that asks to watch and then never reads again
    stalled.setsockopt(zmq.LINGER, 0)
    stalled.setsockopt(zmq.RCVHWM, 1)
    stalled.setsockopt(zmq.RCVBUF, 4096)
    stalled.connect(live.system.endpoint)
    try:
        await stalled.send(proto.encode(proto.request("kernel", "watch", {})))
        doomed = await watcher(live)  # a console that dies while watching
        async with Client(live.system.settings, identity="watch-live-probe") as client:
            before = await watchers_now(client)
            assert before >= 3  # the stalled one, the doomed one, this probe
            doomed.proc.kill()
            await doomed.finish()
            asker = await console(live, "-c", "ask what does area_of_circle return?")
            assert await asker.finish() == 0  # the work went on
            _, answered = await asker.until(reply)
            assert answered["kind"] == "reply" and answered["body"]["status"] in ("SUCCESS", "SUCCESS_DEGRADED")
            # the dead console's watch was ended by the first event that could not reach it
            async with asyncio.timeout(60):
                while await watchers_now(client) != before - 1:
                    await asyncio.sleep(0.2)
    finally:
        with contextlib.suppress(zmq.ZMQError):
            stalled.close(0)


async def test_the_interactive_console_watches_until_ctrl_c(live, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    env = live.system.env(HOME=str(tmp_path), PROMPT_TOOLKIT_NO_CPR="1", TERM="xterm-256color")
    env.pop("NO_COLOR", None)
    child = pexpect.spawn(PY, ["-m", "services.console", "--endpoint", live.system.endpoint,
                               "--history", str(tmp_path / "history")],
                          env=env, dimensions=(40, 200), encoding="utf-8", timeout=60)
    child.logfile_read = open(tmp_path / "console.pty.log", "w")
    try:
        await asyncio.to_thread(child.expect, "batos>")
        child.send("watch\r")
        await asyncio.to_thread(child.expect, "watching kernel-watch-test")
        ingester = await console(live, "-c", f"ingest {live.root / 'src'}")  # another console's work
        assert await ingester.finish() == 0
        await asyncio.to_thread(child.expect, r"ingest [0-9a-f]{8} │ .*started.* by console [0-9a-f]{8}")
        await asyncio.to_thread(child.expect, r"ingest [0-9a-f]{8} │ .*done")
        child.send("\x03")  # Ctrl-C ends the watch, not the console
        await asyncio.to_thread(child.expect, r"cancelling \[1\]")
        await asyncio.to_thread(child.expect, "watch stopped")
        child.send("quit\r")
        await asyncio.to_thread(child.expect, pexpect.EOF)
    finally:
        if child.isalive():
            child.terminate(force=True)
        child.logfile_read.close()
    assert child.exitstatus == 0


async def test_a_watch_goes_on_across_a_kernel_restart(live):
    """Last: it replaces the kernel. A watch is idempotent, so the broker gives it to the new kernel."""
    w = await watcher(live)
    first = w.events("watching")[0]
    old = next(p for p in live.system.procs if p.name == "kernel" and p.alive())
    assert first["pid"] == old.pid
    old.kill()
    new = live.system.start_service("kernel", **KERNEL_ENV)
    _, again = await w.until(event("watching", pid=new.pid), timeout=120)
    assert again["body"]["kernel"] == first["kernel"]
    ingester = await console(live, "-c", f"ingest {live.root / 'src'}")  # and it still sees what others do
    assert await ingester.finish() == 0
    await w.until(event("end", command="ingest"))
    assert await w.interrupt() == 130


async def test_a_watch_goes_on_across_a_broker_restart(live):
    """Last of all: it replaces the broker. The kernel hands the watch it still runs to the new broker as it
    re-registers (or the client sends it again: it is retry-safe; or the console does, after a long outage)."""
    w = await watcher(live)
    broker = next(p for p in live.system.procs if p.name == "broker" and p.alive())
    broker.kill()
    live.system.start_broker(endpoint=live.system.endpoint)
    async with Client(live.system.settings, identity="watch-live-after-broker") as client:
        await live.system.wait_registered(client, {"kernel": 1, "ingest": 1, "memory": 1}, timeout=120)
    ingester = await console(live, "-c", f"ingest {live.root / 'src'}")
    assert await ingester.finish() == 0
    await w.until(event("end", command="ingest"), timeout=120)
    assert not [o for _, o in w.objs if o["kind"] == "error"]
    assert await w.interrupt() == 130
