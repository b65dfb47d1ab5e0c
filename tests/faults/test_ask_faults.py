"""Issue 14 items 4-5 against the real system under supervisord: restarts during an `ask` are waited out,
and a dead service does not block the others.

One installation (``batos.ctl up``, the repository's supervisord.conf, a temp var dir) with a small tree
ingested. Then, each while an `ask` is generating its answer (on its first streamed token):

- the forge worker (the `llm` service) is killed with ``kill -9``: the kernel's LLM call is re-queued by
  the broker and runs again on the restarted worker; the console is told the step restarted, and the ask
  completes;
- the forge worker is restarted gracefully (supervisord's stop + start): the ask completes;
- the broker is killed with ``kill -9``: workers re-register with the new broker and hand over what they
  still run, so the ask completes.

Then memory_weaver is stopped while searches wait for it: `status` still answers at once (it used to wait
behind the kernel's busy slots), and the searches complete when memory is back. Finally memory's `verify`
finds every invariant holding. No user-visible `cancelled` anywhere: nobody cancelled.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from batos.errors import ServiceError
from tests.integration.system_fixture import Installation, installation_fixture

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

ASK_TIMEOUT = 300.0  # silence: the broker's `waiting` events and the tokens keep a call alive
QUESTION = "What does area_of_circle compute?"
FILES = {
    "geometry.py": '"""Shapes and their areas."""\nimport math\n\n\ndef area_of_circle(radius):\n'
                   '    """The area of a circle of the given radius."""\n    return math.pi * radius ** 2\n',
    "inventory.py": '"""Stock keeping for a small shop."""\n\n\ndef restock(stock, item, count):\n'
                    '    """Add count units of item to the stock mapping."""\n'
                    '    stock[item] = stock.get(item, 0) + count\n    return stock\n',
}
TIMINGS: dict[str, float] = {}  # printed at the end: what each restart cost the user (README table)


@pytest.fixture(scope="module")
def installation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installation]:
    yield from installation_fixture(tmp_path_factory, "ask_faults")


@pytest.fixture(scope="module")
def tree(installation: Installation) -> Path:
    base = installation.root / "src"
    base.mkdir()
    for name, text in FILES.items():
        (base / name).write_text(text)

    async def ingest() -> dict[str, Any]:
        async with installation.client() as client:
            return await client.call("kernel", "ingest", {"path": str(base)}, timeout=300)

    reply = asyncio.run(ingest())
    assert reply["files"] == len(FILES) and not reply["errors"], reply
    return base


def kill9(inst: Installation, program: str) -> int:
    old = inst.pid(program)
    os.kill(old, signal.SIGKILL)
    return inst.wait_restarted(program, old)


def restart(inst: Installation, program: str) -> int:
    """What `supervisorctl restart` does."""
    old = inst.pid(program)
    rpc = inst.rpc()
    rpc.supervisor.stopProcess(program, True)
    rpc.supervisor.startProcess(program, True)
    return inst.wait_restarted(program, old)


async def ask_through_fault(inst: Installation, fault: Callable[[], int],
                            service: str = "") -> tuple[dict[str, Any] | ServiceError, list[dict]]:
    """An `ask`, with ``fault`` fired (in a thread) on the first token of the answer: its reply (or error) and
    events, once the restarted program's ``service`` (if given) is registered again."""
    events: list[dict[str, Any]] = []
    fired: asyncio.Task | None = None

    def on_event(ev: dict[str, Any]) -> None:
        nonlocal fired
        events.append(ev)
        if fired is None and ev.get("event") == "token":
            fired = asyncio.create_task(asyncio.to_thread(fault))

    started = time.monotonic()
    async with inst.client() as client:
        try:
            outcome: dict[str, Any] | ServiceError = await client.call(
                "kernel", "ask", {"question": QUESTION}, on_event=on_event, timeout=ASK_TIMEOUT)
        except ServiceError as e:
            outcome = e
        assert fired is not None, f"the answer streamed no token: {events[-5:]}"
        pid = await fired
        if service:
            await inst.wait_worker(client, service, pid)
    if isinstance(outcome, dict):
        outcome["_seconds"] = round(time.monotonic() - started, 1)
    return outcome, events


def assert_answered(reply: dict[str, Any] | ServiceError, events: list[dict]) -> None:
    assert isinstance(reply, dict), f"{reply}: {events[-8:]}"
    assert reply["status"] in ("SUCCESS", "SUCCESS_DEGRADED"), reply
    assert reply["citations"] or reply.get("evidence"), reply
    states = [e["state"] for e in events if e.get("event") == "state"]
    assert states[-1] == "COMPLETE" and "FAILED" not in states, states


async def test_baseline_ask(installation: Installation, tree: Path) -> None:
    async with installation.client() as client:
        for label in ("ask, no fault (first)", "ask, no fault"):
            started = time.monotonic()
            reply = await client.call("kernel", "ask", {"question": QUESTION}, timeout=ASK_TIMEOUT)
            TIMINGS[label] = round(time.monotonic() - started, 1)
            assert reply["status"] in ("SUCCESS", "SUCCESS_DEGRADED"), reply


async def test_ask_survives_kill_9_of_the_forge_worker(installation: Installation, tree: Path) -> None:
    reply, events = await ask_through_fault(installation, lambda: kill9(installation, "forge"), "llm")
    assert_answered(reply, events)
    TIMINGS["ask, forge kill -9 mid-answer"] = reply["_seconds"]
    restarted = [e for e in events if e.get("event") == "step_restarted"]
    assert restarted and "died" in restarted[0]["reason"], events[-8:]
    assert restarted[0]["command"] == "generate"


async def test_ask_survives_a_graceful_restart_of_the_forge_worker(installation: Installation, tree: Path) -> None:
    reply, events = await ask_through_fault(installation, lambda: restart(installation, "forge"), "llm")
    assert_answered(reply, events)
    TIMINGS["ask, forge graceful restart mid-answer"] = reply["_seconds"]


async def test_ask_survives_kill_9_of_the_broker(installation: Installation, tree: Path) -> None:
    reply, events = await ask_through_fault(installation, lambda: kill9(installation, "broker"), "")
    assert_answered(reply, events)
    TIMINGS["ask, broker kill -9 mid-answer"] = reply["_seconds"]


async def test_a_kernel_restart_mid_ask_is_never_reported_as_cancelled(installation: Installation,
                                                                       tree: Path) -> None:
    """`ask` is not safe to repeat (its cycle is recorded): a graceful restart of the kernel gives it the drain
    grace, then the console hears `worker_lost` saying the kernel restarted, never `cancelled`."""
    outcome, events = await ask_through_fault(installation, lambda: restart(installation, "kernel"), "kernel")
    if isinstance(outcome, ServiceError):
        assert outcome.code == "worker_lost" and "restarted" in outcome.message, outcome
    else:  # it finished within the drain grace
        assert_answered(outcome, events)


async def test_a_dead_memory_blocks_neither_status_nor_the_searches(installation: Installation,
                                                                     tree: Path) -> None:
    """Issue 14 item 5: memory stopped, ten searches waiting on it through the kernel (more than its eight
    slots): `status` answers at once, and every search completes once memory is back."""
    rpc = installation.rpc()
    await asyncio.to_thread(rpc.supervisor.stopProcess, "memory_weaver", True)
    async with installation.client() as client:
        waits: list[dict] = []
        searches = [asyncio.create_task(client.call("kernel", "search", {"text": "area of a circle"},
                                                    on_event=waits.append, timeout=120)) for _ in range(10)]
        await asyncio.sleep(2.0)  # they reach the kernel, which asks the broker for memory
        assert not any(s.done() for s in searches)
        started = time.monotonic()
        status = await client.call("kernel", "status", {}, timeout=10)
        TIMINGS["kernel status with memory down and 10 searches waiting"] = round(time.monotonic() - started, 2)
        assert "memory" not in status["broker"]["services"]
        assert status["broker"]["services"]["kernel"][0]["waiting_on_others"] >= 8
        restarted = time.monotonic()
        await asyncio.to_thread(rpc.supervisor.startProcess, "memory_weaver", True)
        replies = await asyncio.gather(*searches)
        TIMINGS["searches answered after memory_weaver start"] = round(time.monotonic() - restarted, 1)
    assert all(r["hits"] for r in replies)
    assert any(w.get("event") == "waiting" and w.get("source") == "broker" for w in waits)


async def test_memory_is_intact_after_the_faults(installation: Installation, tree: Path) -> None:
    async with installation.client() as client:
        report = await client.call("kernel", "verify", {}, timeout=600)
    print("\n" + "\n".join(f"{k}: {v} s" for k, v in TIMINGS.items()))
    assert report["ok"], (report["problem_counts"], report["problems"][:6])
    assert report["checked"]["files"] == len(FILES)
