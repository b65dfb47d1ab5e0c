"""Kernel: PSM states in the image, cycle records, transitions, failure and restart recovery.

Also home of the kernel test kit (real in-process ZEO, fake llm/memory client, event and audit sinks) that
the other test_kernel_* files import.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import ZEO

from batos.audit import AuditEvent
from batos.config import load
from batos.errors import ServiceError
from batos.image import Image
from proto import ErrorCode, ProtocolError, contract
from services.kernel import cycle as records
from services.kernel import psm
from services.kernel.env import KernelEnv
from services.kernel.psm import State
from services.kernel.run import CycleRun, execute

# -- the kit ------------------------------------------------------------------------------------
# Other test_kernel_* files take it with `from tests.unit.test_kernel_cycle import *`: __all__ keeps this
# file's tests out of theirs (they would run twice).
__all__ = ["Audit", "Events", "FakeClient", "audit", "client", "cycle_slots", "env", "forge_run_reply", "image",
           "install", "memory_stats", "new_run", "settings", "worker_table", "zeo_addr"]


def forge_run_reply(instruction: dict[str, Any], **counts: int) -> dict[str, Any]:
    """forge ``run``'s reply (proto.bodies.llm.ForgeRunReply) around ``instruction``."""
    tally = {"cycles_seen": 0, "cycles_successful": 0, "examples": 0, "train": 0, "eval": 0, "duplicates": 0,
             "capped": 0, "unusable": 0, **counts}
    return {"instruction_id": instruction["id"], "instruction": instruction, "counts": tally,
            "dataset": {"sha256": "0" * 64, "train": tally["train"], "eval": tally["eval"]},
            "script": {"origin": "template"}}


def worker_table(*workers: tuple[str, str, int, bool]) -> dict[str, Any]:
    """broker ``workers``'s reply (proto.bodies.broker.WorkerTable): (service, identity, pid, alive) each."""
    services: dict[str, list[dict[str, Any]]] = {}
    for service, identity, pid, alive in workers:
        services.setdefault(service, []).append({
            "identity": identity, "pid": pid, "version": "0", "uptime_s": 1.0, "last_seen_s": 0.1, "alive": alive,
            "inflight": 0, "waiting_on_others": 0, "capacity": 1, "served": 0})
    return {"broker": {"version": "0", "uptime_s": 1.0, "pending": 0, "queued": {}, "stats": {}},
            "services": services}


def memory_stats(counts: dict[str, int]) -> dict[str, Any]:
    """memory ``stats``'s reply (proto.bodies.memory.StatsReply)."""
    return {"counts": counts, "vectors": {"rows": 0, "live": 0}, "storage_bytes": 0, "index": {}}


class Events:
    """Collects what the kernel emits to one console."""

    def __init__(self) -> None:
        self.items: list[tuple[str, dict[str, Any]]] = []

    async def __call__(self, name: str, **data: Any) -> None:
        self.items.append((name, data))

    def names(self) -> list[str]:
        return [n for n, _ in self.items]

    def states(self, cycle_id: str | None = None) -> list[str]:
        return [d["state"] for n, d in self.items if n == "state" and (cycle_id is None or d["cycle_id"] == cycle_id)]

    def of(self, name: str) -> list[dict[str, Any]]:
        return [d for n, d in self.items if n == name]


class Audit:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.invalid: list[str] = []

    async def log(self, event: Any) -> None:
        # validated exactly as the real AuditLog does; the kernel swallows audit errors, so they are kept
        # here and the `env` fixture fails the test on any
        try:
            record = event if isinstance(event, AuditEvent) else AuditEvent.model_validate(event)
        except Exception as e:
            self.invalid.append(f"{event!r}: {e}")
            raise
        self.events.append(record.model_dump(mode="json"))

    def types(self) -> list[str]:
        return [e["event_type"] for e in self.events]

    def of(self, event_type: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event_type"] == event_type]


Handler = Callable[..., Any]


class FakeClient:
    """Scripted services: ``handlers[(service, command)](body, on_event) -> dict`` (sync or async).

    Records every call; a handler that raises ServiceError acts like an error reply.
    """

    def __init__(self, handlers: dict[tuple[str, str], Handler] | None = None):
        self.handlers = dict(handlers or {})
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    async def call(self, service: str, command: str, body: dict[str, Any] | None = None, *,
                   on_event: Any = None, timeout: float | None = 60.0, idempotent: bool = False) -> dict[str, Any]:
        body = body or {}
        self.calls.append((service, command, body))
        handler = self.handlers.get((service, command))
        if handler is None:
            raise ServiceError(ErrorCode.UNKNOWN_SERVICE, f"no fake for {service}.{command}")
        out = handler(body, on_event)
        if asyncio.iscoroutine(out):
            out = await out
        return out

    async def request(self, body: Any, *, on_event: Any = None, timeout: float | None = 60.0) -> Any:
        """Client.request: the typed body through the scripted ``call``, the reply decoded into its type."""
        s = contract.spec_of(body)
        raw = await self.call(s.service, s.command, contract.encode(body), on_event=on_event, timeout=timeout)
        try:
            return contract.decode_reply(s, raw)
        except ProtocolError as e:  # as Client.request: a reply outside the contract is the service's error
            raise ServiceError(e.code, e.message) from None

    def count(self, service: str, command: str) -> int:
        return sum(1 for s, c, _ in self.calls if (s, c) == (service, command))


@pytest.fixture
def zeo_addr(tmp_path):
    addr, stop = ZEO.server(path=str(tmp_path / "k.fs"), blob_dir=str(tmp_path / "blobs"))
    yield addr
    stop()


@pytest.fixture
def settings(tmp_path):
    return load(var_dir=tmp_path / "var", cache_dir=tmp_path / "cache", react_max_steps=3, cycle_timeout=30.0)


async def install(image: Image) -> None:
    def setup(root: Any, conn: Any) -> None:
        psm.install_states(root)
        records.install_registry(root)

    await image.transact(setup)


@pytest.fixture
async def image(settings, zeo_addr):
    img = Image(settings, addr=zeo_addr)
    await img.open()
    await install(img)
    yield img
    await img.close()


@pytest.fixture
def audit():
    return Audit()


@pytest.fixture
def client():
    return FakeClient()


@pytest.fixture
def env(settings, image, audit, client):
    yield KernelEnv(settings=settings, image=image, audit=audit, client=client, instance="kernel-test")
    assert not audit.invalid, audit.invalid


def new_run(env: KernelEnv, events: Events, **kw: Any) -> CycleRun:
    kw.setdefault("mission_type", "query")
    kw.setdefault("mission", {"command": "initiate_cognitive_cycle", "target_oid": "0"})
    return CycleRun(env, events, **kw)


async def cycle_slots(image: Image, cycle_id: str, *names: str) -> dict[str, Any]:
    def read(root: Any, conn: Any) -> dict[str, Any]:
        c = records.get_cycle(root, cycle_id)
        return {n: c.get_slot(n) for n in names}

    return await image.read(read)


# -- the state machine in the image -------------------------------------------------------------


async def test_states_are_prototype_objects_in_the_image(image):
    def read(root: Any, conn: Any) -> dict[str, Any]:
        proto_obj = root["prototypes"][psm.PROTOTYPE_NAME]
        return {name: (s.get_slot("next_states"), s.parents[0] is proto_obj, s.get_slot("terminal"))
                for name, s in root[psm.STATES_KEY].items()}

    states = await image.read(read)
    assert set(states) == {s.value for s in State}
    assert states["REASONING"] == (["SYNTHESIZING", "FAILED"], True, False)
    assert states["COMPLETE"] == ([], True, True)
    # a second install changes nothing (idempotent awakening)
    assert await image.transact(lambda root, conn: psm.install_states(root)) is False


async def test_install_repairs_a_state_that_drifted_from_the_table(image):
    def drift(root: Any, conn: Any) -> None:
        root[psm.STATES_KEY]["IDLE"].set_slot("next_states", ["COMPLETE"])

    await image.transact(drift)
    assert await image.transact(lambda root, conn: psm.install_states(root)) is True
    nxt = await image.read(lambda root, conn: root[psm.STATES_KEY]["IDLE"].get_slot("next_states"))
    assert nxt == ["DECOMPOSING", "FAILED"]


async def test_the_state_object_decides_which_transitions_are_legal(env):
    run = new_run(env, Events())
    await run.begin()
    with pytest.raises(psm.IllegalTransition, match="IDLE -> SYNTHESIZING"):
        await run.to(State.SYNTHESIZING)
    await run.to(State.DECOMPOSING)
    slots = await cycle_slots(env.image, run.cycle_id, "psm_state", "history")
    assert slots["psm_state"] == "DECOMPOSING"
    assert [h["state"] for h in slots["history"]] == ["IDLE", "DECOMPOSING"]


# -- a cycle's life ----------------------------------------------------------------------------


async def test_transitions_are_committed_emitted_and_audited(env, audit):
    events = Events()
    run = new_run(env, events)

    async def body(r: CycleRun) -> dict[str, Any]:
        for s in (State.DECOMPOSING, State.REASONING, State.SYNTHESIZING, State.VALIDATING):
            await r.to(s)
        await r.complete("SUCCESS", {"answer": "x"})
        return {"answer": "x"}

    reply = await execute(run, body)
    assert reply["cycle_id"] == run.cycle_id and reply["answer"] == "x"
    assert events.states() == ["IDLE", "DECOMPOSING", "REASONING", "SYNTHESIZING", "VALIDATING", "COMPLETE"]
    assert all(d["cycle_id"] == run.cycle_id for _, d in events.items)
    transitions = audit.of("STATE_TRANSITION")
    assert [e["event_data"]["to"] for e in transitions] == events.states()
    assert transitions[-1]["status"] == "SUCCESS"
    for e in transitions:  # Table 3 fields, every one
        assert set(e) >= {"event_id", "cycle_id", "timestamp", "psm_state", "active_persona", "event_type",
                          "event_data", "status"}
    slots = await cycle_slots(env.image, run.cycle_id, "status", "result", "finished_at")
    assert slots["status"] == "SUCCESS" and slots["result"] == {"answer": "x"} and slots["finished_at"]
    assert await env.image.read(records.unfinished) == []
    assert await env.image.transact(records.prune_active) == 1
    assert await env.image.read(lambda root, conn: list(root[records.ACTIVE_KEY])) == []
    assert reply["timing"]["total_s"] >= reply["timing"]["other_s"] >= 0


async def test_a_failure_marks_the_cycle_failed_with_its_reason(env, audit):
    events = Events()
    run = new_run(env, events)

    async def body(r: CycleRun) -> dict[str, Any]:
        await r.to(State.DECOMPOSING)
        raise ServiceError(ErrorCode.NOT_FOUND, "unknown oid 'beef'")

    with pytest.raises(ServiceError) as info:
        await execute(run, body)
    assert info.value.code == "not_found"
    assert "FAILED in DECOMPOSING" in info.value.message and info.value.details["cycle_id"] == run.cycle_id
    assert events.states() == ["IDLE", "DECOMPOSING", "FAILED"]
    slots = await cycle_slots(env.image, run.cycle_id, "status", "error", "psm_state")
    assert slots == {"status": "FAILURE", "error": "not_found: unknown oid 'beef'", "psm_state": "FAILED"}
    assert audit.of("STATE_TRANSITION")[-1]["status"] == "FAILURE"


async def test_a_bug_becomes_an_internal_error_and_a_failed_cycle(env):
    events = Events()

    async def body(r: CycleRun) -> dict[str, Any]:
        return {"x": 1 / 0}

    with pytest.raises(ServiceError) as info:
        await execute(new_run(env, events), body)
    assert info.value.code == "internal" and "ZeroDivisionError" in info.value.message
    assert events.states()[-1] == "FAILED"


async def test_a_cycle_over_its_time_budget_fails_with_timeout(env, settings):
    env.settings = settings.model_copy(update={"cycle_timeout": 0.2})
    events = Events()

    async def body(r: CycleRun) -> dict[str, Any]:
        await r.to(State.DECOMPOSING)
        await asyncio.sleep(5)
        return {}

    with pytest.raises(ServiceError) as info:
        await execute(new_run(env, events), body)
    assert info.value.code == "timeout" and "time budget of 0.2 s" in info.value.message
    assert events.states() == ["IDLE", "DECOMPOSING", "FAILED"]


async def test_a_cancelled_cycle_is_failed_not_left_running(env):
    events = Events()
    run = new_run(env, events)
    started = asyncio.Event()

    async def body(r: CycleRun) -> dict[str, Any]:
        await r.to(State.DECOMPOSING)
        started.set()
        await asyncio.sleep(5)
        return {}

    task = asyncio.create_task(execute(run, body))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    slots = await cycle_slots(env.image, run.cycle_id, "psm_state", "error")
    assert slots["psm_state"] == "FAILED" and "cancelled" in slots["error"]


async def test_restart_fails_this_instances_unfinished_cycles_only(env, image):
    mine, other = new_run(env, Events()), new_run(env, Events())
    await mine.begin()
    await mine.to(State.DECOMPOSING)
    await other.begin()
    await image.transact(lambda root, conn: root[records.ACTIVE_KEY].__setitem__(other.cycle_id, "kernel-elsewhere"))
    failed = await image.transact(records.fail_interrupted, "kernel-test")
    assert failed == [{"cycle_id": mine.cycle_id, "from": "DECOMPOSING", "mission_type": "query", "persona": "ROBIN"}]
    slots = await cycle_slots(image, mine.cycle_id, "psm_state", "error", "status")
    assert slots == {"psm_state": "FAILED", "error": records.RESTART_REASON, "status": "FAILURE"}
    assert (await cycle_slots(image, other.cycle_id, "psm_state"))["psm_state"] == "IDLE"
    assert await image.transact(records.fail_interrupted, "kernel-test") == []  # idempotent


async def test_linked_cycles_and_describe(env, image):
    parent = new_run(env, Events())
    await parent.begin()
    child = new_run(env, Events(), parent_cycle=parent.cycle_id)
    await child.begin()
    desc = await image.read(records.describe_cycle, parent.cycle_id)
    assert desc["child_cycles"] == [child.cycle_id] and desc["psm_state"] == "IDLE"
    assert (await image.read(records.describe_cycle, child.cycle_id))["parent_cycle"] == parent.cycle_id
    with pytest.raises(records.UnknownCycle):
        await image.read(records.describe_cycle, "nope")


async def test_concurrent_cycles_do_not_conflict(env):
    async def one(i: int) -> tuple[str, list[str]]:
        events = Events()

        async def body(r: CycleRun) -> dict[str, Any]:
            for s in (State.DECOMPOSING, State.REASONING, State.SYNTHESIZING, State.VALIDATING):
                await r.to(s)
            await r.complete("SUCCESS", {"i": i})
            return {"i": i}

        reply = await execute(new_run(env, events), body)
        return reply["cycle_id"], events.states(reply["cycle_id"])

    results = await asyncio.gather(*(one(i) for i in range(10)))
    assert len({cid for cid, _ in results}) == 10
    assert all(states[-1] == "COMPLETE" and len(states) == 6 for _, states in results)
