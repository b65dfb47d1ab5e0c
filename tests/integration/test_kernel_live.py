"""The kernel with real processes: broker, runzeo, memory, ingest, forge (the llm service, SmolLM2-135M) and the
kernel itself, brought up once for the module (model loads are the expensive part on two cores).

The kernel runs with small budgets so a cycle takes seconds, not minutes: one ReAct step
(BATOS_REACT_MAX_STEPS=1), a 500-token answer prompt, 24 answer tokens and 80 for BRICK's methods, a 3 s sandbox.
A 135M model answers badly, so what is asserted is what the kernel guarantees whatever the model says: the
PSM's states in order, citations that are the chunks in memory, SUCCESS or the stated SUCCESS_DEGRADED with its
evidence, methods persisted only when they ran, contained hostile code, a killed kernel's cycle FAILED, clear
errors for bad input.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from batos.client import Client
from batos.errors import ServiceError
from tests.conftest import System

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(420)]

KERNEL_ENV = {
    "BATOS_REACT_MAX_STEPS": "1",
    "BATOS_ANSWER_BUDGET_TOKENS": "500",
    "BATOS_ANSWER_MAX_TOKENS": "24",
    "BATOS_BRICK_MAX_TOKENS": "80",
    "BATOS_SANDBOX_TIMEOUT": "3",
    "BATOS_CYCLE_TIMEOUT": "300",
    "BATOS_AUTOTELIC_PERIOD": "3600",  # no background LLM summaries competing with the cycles under test
    "BATOS_KERNEL_INSTANCE": "kernel-live-test",
}
SERVICES = {"kernel": 1, "memory": 1, "llm": 1, "forge": 1, "ingest": 1}
DNU_SELECTORS = ("line_count", "word_count")
CYCLE_STATES = ["IDLE", "DECOMPOSING", "REASONING", "SYNTHESIZING", "VALIDATING", "COMPLETE"]

FILES = {
    "geometry.py": '''"""Shapes and their areas."""
import math


def area_of_circle(radius):
    """The area of a circle of the given radius."""
    return math.pi * radius ** 2


class Rectangle:
    """An axis-aligned rectangle."""

    def __init__(self, width, height):
        self.width = width
        self.height = height

    def area(self):
        return self.width * self.height
''',
    "inventory.py": '''"""Stock keeping for a small shop."""


def restock(stock, item, count):
    """Add count units of item to the stock mapping."""
    stock[item] = stock.get(item, 0) + count
    return stock
''',
}


@dataclass
class Live:
    system: System
    tree: Path
    ingest_reply: dict[str, Any]
    ingest_events: list[dict[str, Any]]
    chunks: dict[str, str] = field(default_factory=dict)  # file name -> a chunk oid of that file
    timings: dict[str, Any] = field(default_factory=dict)

    def client(self) -> Client:
        return Client(self.system.settings, identity=f"kernel-live-{uuid.uuid4().hex[:8]}")

    def restart_kernel(self) -> None:
        self.system.start_service("kernel", **KERNEL_ENV)

    def kernel_proc(self):
        return next(p for p in reversed(self.system.procs) if p.name == "kernel" and p.alive())


class Stream:
    """Collects a call's events, with a hook to wake a test when a given one arrives."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.waiters: list[tuple[Any, asyncio.Event]] = []

    async def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        for match, flag in self.waiters:
            if match(event):
                flag.set()

    def when(self, match: Any) -> asyncio.Event:
        flag = asyncio.Event()
        self.waiters.append((match, flag))
        return flag

    def states(self, cycle_id: str | None = None) -> list[str]:
        return [e["state"] for e in self.events
                if e.get("event") == "state" and (cycle_id is None or e.get("cycle_id") == cycle_id)]

    def of(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == name]


async def call(client: Client, command: str, body: dict[str, Any], timeout: float = 240) -> tuple[dict, Stream]:
    stream = Stream()
    reply = await client.call("kernel", command, body, on_event=stream, timeout=timeout)
    return reply, stream


async def refused(client: Client, command: str, body: dict[str, Any], service: str = "kernel",
                  timeout: float = 120) -> ServiceError:
    with pytest.raises(ServiceError) as info:
        await client.call(service, command, body, timeout=timeout)
    return info.value


async def _bring_up(system: System, tree: Path) -> Live:
    async with Client(system.settings, identity="kernel-live-setup") as client:
        await client.wait_for_broker(20)
        started = time.monotonic()
        await system.wait_registered(client, SERVICES, timeout=300)
        up = time.monotonic() - started
        stream = Stream()
        reply = await client.call("kernel", "ingest", {"path": str(tree)}, on_event=stream, timeout=300)
        live = Live(system, tree, reply, stream.events, timings={"startup_s": round(up, 1)})
        for name in FILES:
            hits = await client.call("memory", "search", {"text": FILES[name], "k": 1, "level": "chunks",
                                                          "filters": {"file_path": str(tree / name)}})
            live.chunks[name] = hits["hits"][0]["oid"]
        return live


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    system = System(tmp_path_factory.mktemp("kernel_live"))
    try:
        yield asyncio.run(_bring_up(system, system.start_cognitive(FILES, **KERNEL_ENV)))
    finally:
        system.stop_all()


def audit_lines(live: Live) -> list[dict[str, Any]]:
    path = live.system.var / "metacognition.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- a. ask -----------------------------------------------------------------------------------------------


async def test_ask_streams_the_states_and_cites_the_chunks_in_memory(live):
    assert live.ingest_reply["files"] == 2 and live.ingest_reply["errors"] == []
    assert live.ingest_events and {e["event"] for e in live.ingest_events} == {"progress"}
    async with live.client() as client:
        started = time.monotonic()
        reply, stream = await call(client, "ask", {"question": "What does area_of_circle compute?"})
        live.timings["ask_s"] = round(time.monotonic() - started, 1)

        cycle = reply["cycle_id"]
        assert stream.states(cycle) == CYCLE_STATES
        assert {e.get("cycle_id") for e in stream.events if e["event"] != "token"} == {cycle}
        assert stream.of("token")  # the answer was streamed
        assert reply["status"] in ("SUCCESS", "SUCCESS_DEGRADED")
        assert reply["citations"], reply

        for cite in reply["citations"]:
            path = Path(cite["file_path"])
            assert path.parent == live.tree and path.name in FILES
            lines = FILES[path.name].splitlines(keepends=True)
            start, end = cite["start_line"], cite["end_line"]
            assert cite["where"] == f"{path}:{start}-{end}" and 1 <= start <= end <= len(lines)
            # the cited object is that chunk in memory: same place, same text
            chunk = await client.call("kernel", "inspect", {"oid": cite["oid"]})
            assert chunk["prototype"] == "memory_chunk"
            assert f"'file_path': '{path}', 'start_line': {start}, 'end_line': {end}" in chunk["slots"]["metadata"]
            expected = "".join(lines[start - 1:end])
            assert chunk["slots"]["source_text"][:60] == repr(expected)[:60]

        # citations are what the answer used; everything else retrieved is listed apart, never both
        cited = {c["oid"] for c in reply["citations"]}
        assert not cited & {c["oid"] for c in reply["also_retrieved"]}
        if reply["status"] == "SUCCESS":  # grounded: every check passed on the answer given
            assert "Sources:" in reply["answer"]
            assert all(c["where"] in reply["answer"] for c in reply["citations"])
            last = max(c["attempt"] for c in reply["validation"])
            assert all(c["ok"] for c in reply["validation"] if c["attempt"] == last)
        else:  # the stated degraded reply: the reason, and the evidence (file:lines, signature) instead
            assert reply["reason"] and reply["notes"] and reply["evidence"]
            assert all(c["where"] in reply["answer"] for c in reply["citations"])


# -- b. send / define ----------------------------------------------------------------------------------------


async def test_send_of_a_missing_selector_is_persisted_only_if_bricks_method_ran(live):
    """Either branch is legitimate with a 135M BRICK; up to two selectors are tried so that the persisted one is
    usually seen too (each outcome is checked as it comes)."""
    target = live.chunks["inventory.py"]  # an object this module created: nothing else depends on it
    outcomes = []
    async with live.client() as client:
        for selector in DNU_SELECTORS:
            started = time.monotonic()
            try:
                first, stream = await call(client, "send", {"oid": target, "selector": selector, "args": []})
            except ServiceError as e:
                live.timings[f"dnu_{selector}_s"] = round(time.monotonic() - started, 1)
                outcomes.append((selector, e.code))
                await _check_refused_method(client, target, selector, e)
                continue
            live.timings[f"dnu_{selector}_s"] = round(time.monotonic() - started, 1)
            outcomes.append((selector, "persisted"))
            await _check_persisted_method(client, target, selector, first, stream)
            break
    live.timings["dnu_outcomes"] = outcomes


async def _check_refused_method(client: Client, target: str, selector: str, e: ServiceError) -> None:
    """BRICK's method was refused or failed: a clear FAILURE, nothing persisted."""
    assert e.code in ("rejected", "sandbox"), (e.code, e.message)
    assert "FAILED in" in e.message and e.details.get("cycle_id")
    obj = await client.call("kernel", "inspect", {"oid": target})
    assert selector not in obj["methods"]
    trace = await client.call("kernel", "trace", {"cycle_id": e.details["cycle_id"]}, timeout=120)
    assert trace["cycle"]["psm_state"] == "FAILED" and trace["cycle"]["mission_type"] == "unhandled_message"
    outcome = [ev for ev in trace["events"] if ev["event_type"] == "DNU_OUTCOME"]
    assert outcome and outcome[-1]["status"] == "FAILURE"


async def _check_persisted_method(client: Client, target: str, selector: str, first: dict, stream: Stream) -> None:
    """BRICK's method returned: stored on the object, and a second send runs it without the model."""
    assert first["generated"] is True and f"def {selector}(self" in first["method_source"]
    assert stream.states(first["cycle_id"]) == CYCLE_STATES
    obj = await client.call("kernel", "inspect", {"oid": target})
    assert selector in obj["methods"]

    second, stream2 = await call(client, "send", {"oid": target, "selector": selector, "args": []})
    assert second["generated"] is False and second["result"] == first["result"]
    assert stream2.states(second["cycle_id"]) == ["IDLE", "DECOMPOSING", "VALIDATING", "COMPLETE"]
    assert not stream2.of("token")
    trace = await client.call("kernel", "trace", {"cycle_id": second["cycle_id"]}, timeout=120)
    kinds = [ev["event_type"] for ev in trace["events"]]
    assert "CYCLE_END" in kinds and "LLM_CALL" not in kinds  # the stored method ran without the model


async def test_a_defined_method_runs_and_hostile_ones_are_contained(live):
    target = live.chunks["geometry.py"]
    async with live.client() as client:
        status = await client.call("kernel", "status", {})
        if not status["kernel"]["sandbox_available"]:
            pytest.skip("no process sandbox on this host (needs namespaces): sends are refused, see SANDBOX.md")

        defined, stream = await call(client, "define", {"oid": target, "selector": "twice",
                                                        "source": "def twice(self, x):\n    return [x, x]\n"})
        assert defined["status"] == "SUCCESS" and defined["params"] == ["x"]
        assert stream.states(defined["cycle_id"]) == ["IDLE", "DECOMPOSING", "VALIDATING", "COMPLETE"]
        sent, _ = await call(client, "send", {"oid": target, "selector": "twice", "args": [21]})
        assert sent["result"] == [21, 21] and sent["generated"] is False

        # Blocked by the code policy at `define` (never stored, never run):
        for selector, source, why in [
            ("peek", "def peek(self):\n    return open('/etc/passwd').read()\n", "open"),
            ("phone_home", "def phone_home(self):\n    import socket\n    s = socket.socket()\n"
                           "    s.connect(('127.0.0.1', 22))\n    return 1\n", "socket"),
        ]:
            err = await refused(client, "define", {"oid": target, "selector": selector, "source": source})
            assert err.code == "rejected" and "code policy" in err.message and why in err.message, err.message

        # Past the policy, stopped by the sandbox at `send` (stored by define, contained when run):
        for selector, source, kind in [
            ("hog", "def hog(self):\n    blocks = []\n    for i in range(1024):\n"
                    "        blocks.append([i] * 262144)\n    return len(blocks)\n", "memory"),  # ~2 GB of lists
            ("spin", "def spin(self):\n    n = 0\n    while True:\n        n += 1\n", "timeout"),
        ]:
            await call(client, "define", {"oid": target, "selector": selector, "source": source})
            started = time.monotonic()
            err = await refused(client, "send", {"oid": target, "selector": selector})
            live.timings[f"sandbox_{selector}_s"] = round(time.monotonic() - started, 1)
            assert err.code == "sandbox", (err.code, err.message)
            assert f"failed in the sandbox ({kind}" in err.message or (kind == "timeout" and "(cpu)" in err.message), \
                err.message
        obj = await client.call("kernel", "inspect", {"oid": target})
        assert {"twice", "hog", "spin"} <= set(obj["methods"]) and "peek" not in obj["methods"]


# -- c. display_yourself -------------------------------------------------------------------------------------


async def test_display_yourself_runs_two_linked_cycles(live):
    async with live.client() as client:
        started = time.monotonic()
        reply, stream = await call(client, "display_yourself", {}, timeout=400)
        live.timings["display_yourself_s"] = round(time.monotonic() - started, 1)
        plan, shown = reply["cycle_ids"]
        assert reply["parent_cycle"] == plan and reply["cycle_id"] == shown
        assert stream.states(plan) == CYCLE_STATES and stream.states(shown) == CYCLE_STATES
        assert reply["meta_prompt"] and reply["status"] in ("SUCCESS", "SUCCESS_DEGRADED")
        first = stream.events.index(next(e for e in stream.events if e.get("cycle_id") == shown))
        assert all(e.get("cycle_id") != plan for e in stream.events[first:] if e["event"] == "state")  # 1 then 2

        second = await client.call("kernel", "trace", {"cycle_id": shown}, timeout=120)
        assert second["cycle"]["parent_cycle"] == plan and second["cycle"]["mission_type"] == "genesis_display"
        first_trace = await client.call("kernel", "trace", {"cycle_id": plan}, timeout=120)
        assert first_trace["cycle"]["child_cycles"] == [shown]
        assert first_trace["cycle"]["mission_type"] == "genesis_plan"
        live.timings["display_llm_calls"] = [  # (the traces flushed the audit log) where the time went
            (e["active_persona"], e["event_data"].get("command"), round(e["event_data"].get("total_s") or 0, 1),
             e["event_data"].get("completion_tokens")) for e in audit_lines(live)
            if e["event_type"] == "LLM_CALL" and e["cycle_id"] in (plan, shown)]


# -- e. bad input ---------------------------------------------------------------------------------------------


async def test_bad_input_gets_clear_errors(live):
    async with live.client() as client:
        err = await refused(client, "inspect", {"oid": "beef99"})
        assert err.code == "not_found" and "beef99" in err.message
        err = await refused(client, "send", {"oid": "beef99", "selector": "anything"})
        assert err.code == "not_found" and "beef99" in err.message
        err = await refused(client, "inspect", {"oid": "not-hex"})
        assert err.code == "bad_args" and "bad OID" in err.message

        err = await refused(client, "command", {"command": "initiate_cognitive_cycle"})  # refused at the boundary
        assert err.code == "bad_args" and "kernel.command: Object missing required field `target_oid`" in err.message
        err = await refused(client, "command", {"command": "explode", "target_oid": "0", "mission_brief": {
            "type": "x", "selector": "x", "args": [], "kwargs": {}}})
        assert err.code == "bad_args" and "unknown Table 1 command 'explode'" in err.message
        err = await refused(client, "command", {"command": "initiate_cognitive_cycle", "target_oid": "0",
                                                "mission_brief": {"type": "levitate", "selector": "x", "args": [],
                                                                  "kwargs": {}}})
        assert err.code == "bad_args" and "unknown mission_brief.type 'levitate'" in err.message
        err = await refused(client, "levitate", {})
        assert err.code == "unknown_command"
        err = await refused(client, "ask", {"question": ""})
        assert err.code == "bad_args" and "`$.question`" in err.message  # the field, named by its type

        # audit_event: the forge's way into the audit log (the kernel is its single writer)
        err = await refused(client, "audit_event", {"event": {"event_type": "ADAPTER_INCARNATION"}})
        assert err.code == "bad_args" and "missing required field `event_id`" in err.message
        event = {"event_id": str(uuid.uuid4()), "cycle_id": str(uuid.uuid4()),
                 "timestamp": "2025-09-02T10:00:00+00:00", "psm_state": "COMPLETE", "active_persona": "ALFRED",
                 "event_type": "ADAPTER_INCARNATION", "mission_type": "fineTuneNewLoRA_", "status": "SUCCESS",
                 "event_data": {"persona": "BRICK", "decision": "kept_previous"}}
        reply = await client.call("kernel", "audit_event", {"event": event})
        assert reply["logged"] is True
        written = [e for e in audit_lines(live) if e["event_id"] == event["event_id"]]  # on disk at the reply
        assert written and written[0]["event_data"]["decision"] == "kept_previous"  # Table 3's extra keys kept


# -- d. kill -9 mid-cycle (last: it restarts the kernel) -----------------------------------------------------


async def test_a_kernel_killed_mid_ask_fails_the_cycle_and_the_console_is_told(live):
    async with live.client() as client:
        stream = Stream()
        # REASONING is the program's own searches (no model call with one step): kill during generation
        reasoning = stream.when(lambda e: e.get("event") == "state" and e.get("state") == "SYNTHESIZING")
        ask = asyncio.create_task(client.call("kernel", "ask", {"question": "How is a Rectangle's area computed?"},
                                              on_event=stream, timeout=240))
        await asyncio.wait_for(reasoning.wait(), 120)
        cycle = stream.of("state")[0]["cycle_id"]
        live.kernel_proc().kill()
        killed = time.monotonic()
        with pytest.raises(ServiceError) as info:
            await asyncio.wait_for(ask, 30)  # no hang: the broker sees the worker die
        live.timings["worker_lost_after_kill_s"] = round(time.monotonic() - killed, 1)
        assert info.value.code == "worker_lost", (info.value.code, info.value.message)

        live.restart_kernel()
        await live.system.wait_registered(client, {"kernel": 1}, timeout=120)
        for _ in range(100):  # the new worker registers before its startup (recovery) finished
            try:
                trace = await client.call("kernel", "trace", {"cycle_id": cycle}, timeout=120)
                break
            except ServiceError as e:
                if e.code != "unavailable":
                    raise
                await asyncio.sleep(0.3)
        assert trace["cycle"]["psm_state"] == "FAILED" and trace["cycle"]["status"] == "FAILURE"
        assert trace["cycle"]["error"] == "kernel restarted"
        assert trace["cycle"]["history"][-2]["state"] == "SYNTHESIZING"
        ends = [e for e in trace["events"] if e["event_type"] == "CYCLE_END"]
        assert ends and ends[-1]["status"] == "FAILURE"
        status = await client.call("kernel", "status", {})
        assert cycle in status["kernel"]["recovered_at_start"]
    print("kernel live timings:", json.dumps(live.timings))
