"""Kernel: Table 1 dispatch, the console conveniences mapped onto it, the relays, startup recovery."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import msgspec
import pytest

from batos.errors import ServiceError
from proto import contract
from proto.bodies import kernel as K
from proto.bodies import memory
from services.kernel import commands, handlers
from services.kernel import cycle as records
from services.kernel.autotelic import Autotelic
from services.kernel.kernel import Kernel, recover, start_kernel, stop_kernel
from services.kernel.psm import State
from tests.unit.test_kernel_cycle import *  # noqa: F403  (the kernel test kit: fixtures)
from tests.unit.test_kernel_cycle import Events, forge_run_reply, memory_stats, new_run, worker_table


@pytest.fixture
def kernel(env):
    return Kernel(env, Autotelic(env))


def t1(command: str = "initiate_cognitive_cycle", target: str = "0", **brief: Any) -> dict[str, Any]:
    mb = {"type": "query", "selector": "ask", "args": [], "kwargs": {}, **brief}
    return {"command": command, "target_oid": target, "mission_brief": mb}


# -- the mapping: every convenience is a Table 1 object, and a Table 1 object is read back into it -----------


def parse(body: dict[str, Any]) -> K.Table1Command:
    return msgspec.convert(body, K.Table1Command)


@pytest.mark.parametrize(("req", "expect"), [
    (K.Ask(question="why?"), ("initiate_cognitive_cycle", "0", "query", "ask", ["why?"], {})),
    (K.Ask(question="why?", persona="babs"), ("initiate_cognitive_cycle", "0", "query", "ask", ["why?"],
                                              {"persona": "BABS"})),
    (K.Send(oid="1f", selector="greet", args=[1], kwargs={"a": 2}),
     ("initiate_cognitive_cycle", "1f", "message", "greet", [1], {"a": 2})),
    (K.Define(oid="1f", selector="greet", source="def greet(self): pass"),
     ("initiate_cognitive_cycle", "1f", "define_method", "greet", ["def greet(self): pass"], {})),
    (K.DisplayYourself(), ("initiate_cognitive_cycle", "0", "display_yourself", "display_yourself", [], {})),
    (K.Ingest(path="/src"), ("ingest", "0", "ingest", "ingest", ["/src"], {})),
    (K.Search(text="lookup", k=3), ("search", "0", "search", "search", ["lookup"], {"k": 3})),
    (K.Inspect(oid="2"), ("inspect", "2", "inspect", "inspect", [], {})),
    (K.Trace(cycle_id="abc1"), ("trace", "0", "trace", "trace", ["abc1"], {})),
    (K.Forge(persona="BRICK"), ("forge", "0", "forge", "forge", ["BRICK"], {})),
    (K.Audit(), ("audit", "0", "audit", "audit", [], {})),
    (K.Verify(repair=True), ("verify", "0", "verify", "verify", [], {"repair": True})),
    (K.Watch(), ("watch", "0", "watch", "watch", [], {})),
])
def test_console_conveniences_are_table1_objects(req, expect):
    cmd = K.table1_of(req)
    mb = cmd.mission_brief
    assert (cmd.command, cmd.target_oid, mb.type, mb.selector, mb.args, mb.kwargs) == expect
    # the object survives the wire's Table 1 decoding, and reads back as the same convenience
    assert K.request_of(parse(msgspec.to_builtins(cmd))) == req
    assert K.reply_type(cmd) is contract.spec_of(req).reply


@pytest.mark.parametrize(("kind", "args", "field"), [
    (K.Ask, {}, "question"), (K.Ask, {"question": 3}, "$.question"), (K.Ask, {"question": "  "}, "$.question"),
    (K.Send, {"oid": "1"}, "selector"), (K.Send, {"oid": "1", "selector": "not an identifier"}, "$.selector"),
    (K.Ingest, {"path": None}, "$.path"), (K.Search, {"text": "x", "k": 0}, "$.k"),
    (K.Search, {"text": "x", "kk": 1}, "kk"), (K.Trace, {"cycle_id": "zz"}, "$.cycle_id"),
    (K.Watch, {"id": "not hex!"}, "$.id"), (K.Ask, {"question": "x", "persona": "JOKER"}, "unknown persona"),
])
def test_malformed_arguments_are_refused_by_their_type_naming_the_field(kind, args, field):
    with pytest.raises(msgspec.ValidationError, match=re.escape(field)):
        msgspec.convert(args, kind)


@pytest.mark.parametrize(("body", "match"), [
    (t1(type="levitate"), "unknown mission_brief.type 'levitate'"),
    (t1(command="explode"), "unknown Table 1 command 'explode'"),
    (t1(target="xyz", args=["why?"]), "bad OID"),
    (t1(args=[""]), re.escape("`$.question`")),
    (t1(args=["q"], kwargs={"persona": "JOKER"}), "unknown persona"),
    (t1(args=["q"], kwargs={"k": 3}), "unknown field `k`"),
    (t1("search", args=["a", "b"]), "at most 1 positional"),
])
async def test_malformed_table1_commands_are_refused_with_the_reason(kernel, body, match):
    events = Events()
    with pytest.raises(ServiceError, match=match) as info:
        await commands.dispatch(kernel, events, parse(body))
    assert info.value.code == "bad_args"
    assert events.items == []  # refused before any cycle began


@pytest.mark.parametrize(("body", "match"), [
    ({"command": "initiate_cognitive_cycle"}, "missing required field"),
    ({**t1(), "extra": 1}, "unknown field `extra`"),
    ({**t1(), "schema_version": 99}, "schema_version 99"),
])
async def test_a_malformed_table1_object_is_refused_at_the_workers_boundary(kernel, body, match):
    from tests.typed_handler import call_handler

    with pytest.raises(ServiceError, match=match) as info:
        await call_handler("kernel", "command", handlers.handle_command, None, body)
    assert info.value.code == "bad_args"


async def test_an_unknown_target_oid_fails_the_cycle_in_decomposing(kernel):
    events = Events()
    with pytest.raises(ServiceError) as info:
        await commands.dispatch(kernel, events, parse(t1(target="0xBEEF99", args=["why?"])))
    assert info.value.code == "not_found" and "beef99" in info.value.message
    assert events.states() == ["IDLE", "DECOMPOSING", "FAILED"]


# -- relays --------------------------------------------------------------------------------------


async def test_ingest_forwards_the_ingest_services_events_to_the_console(kernel, client):
    async def ingest(body: dict[str, Any], on_event: Any) -> dict[str, Any]:
        await on_event({"event": "progress", "stage": "CHUNKING", "files_done": 1, "files_total": 2})
        return {"root": body["path"], "files": 2, "chunks": 7, "summaries": 2, "lines": 40, "skipped": 0,
                "skipped_by_reason": {}, "unchanged": 0, "removed": 0, "unsupported": 0, "errors": [],
                "refused": [], "seconds": 0.5}

    client.handlers[("ingest", "ingest")] = ingest
    events = Events()
    out = await commands.dispatch(kernel, events, K.Ingest(path="/src", max_chunk_tokens=200))
    assert out.chunks == 7 and out.root == "/src"
    assert client.calls[-1] == ("ingest", "ingest", {"path": "/src", "max_chunk_tokens": 200, "use_unparse": False})
    assert events.items == [("progress", {"stage": "CHUNKING", "files_done": 1, "files_total": 2})]


async def test_search_inspect_stats_relay_to_memory(kernel, client):
    client.handlers[("memory", "search")] = lambda body, ev: {"hits": [
        {"oid": "5", "level": "chunk", "score": body["k"] / 10, "text": "t", "metadata": {}, "token_count": 1}]}
    client.handlers[("memory", "inspect")] = lambda body, ev: {"oid": body["oid"], "prototype": "traits", "name": "t",
                                                               "slots": {}, "parents": [], "methods": []}
    client.handlers[("memory", "stats")] = lambda body, ev: memory_stats({"memory_chunk": 3})
    out = await commands.dispatch(kernel, Events(), K.Search(text="x", k=4, filters=memory.Filters(node_type="f")))
    assert [(h.oid, h.score) for h in out.hits] == [("5", 0.4)]
    assert client.calls[-1] == ("memory", "search", {"text": "x", "vector": None, "k": 4, "level": "both",
                                                     "filters": {"file_path": None, "node_type": "f",
                                                                 "node_name": None},
                                                     "within": None, "mode": "hybrid", "after": None})
    assert (await commands.dispatch(kernel, Events(), K.Inspect(oid="0x00A"))).oid == "a"
    stats = await commands.dispatch(kernel, Events(), K.Stats())
    assert stats.counts == {"memory_chunk": 3} and stats.cycles == K.CycleCounts(total=0, unfinished=0)


async def test_a_relayed_reply_outside_the_contract_is_an_internal_error(kernel, client):
    client.handlers[("memory", "inspect")] = lambda body, ev: {"prototype": "traits"}  # no oid
    with pytest.raises(ServiceError, match=r"memory\.inspect answered outside its contract") as info:
        await commands.dispatch(kernel, Events(), K.Inspect(oid="1"))
    assert info.value.code == "internal"


async def test_status_shows_the_worker_table_and_the_kernel(kernel, client):
    client.handlers[("broker", "workers")] = lambda body, ev: worker_table(("kernel", "k1", 7, True))
    out = await commands.dispatch(kernel, Events(), parse(t1("status", type="status", selector="status")))
    assert isinstance(out, K.KernelState) and out.broker is not None
    assert out.broker.services["kernel"][0].identity == "k1" and out.broker_error is None
    assert isinstance(out.kernel, K.KernelInfo)
    assert out.kernel.instance == "kernel-test" and out.kernel.active_cycles == []


async def test_forge_relays_with_a_checked_persona(kernel, client):
    # (the relay of the steward's events is tested in test_kernel_forge_relay.py)
    instruction = {"id": "b1", "persona": "BRICK", "script": "x", "config": {"r": 8}}
    client.handlers[("forge", "run")] = lambda body, ev: forge_run_reply(instruction, train=3)
    client.handlers[("steward", "upgrade")] = lambda body, ev: {"ok": False, "reason": "no"}
    out = await commands.dispatch(kernel, Events(), msgspec.convert({"persona": "brick"}, K.Forge))
    assert out.persona == "BRICK" and out.instruction_id == "b1" and out.ok is False
    assert out.reason == "no" and out.counts.train == 3 and out.script.origin == "template"
    with pytest.raises(msgspec.ValidationError, match="unknown persona"):
        msgspec.convert({"persona": "NOBODY"}, K.Forge)


# -- audit and trace: the real audit log, a fake memory ---------------------------------------------


class FractalMemory:
    """Enough of memory's audit_offset / create_fractals / query_fractals for the ingestion."""

    def __init__(self) -> None:
        self.offsets: dict[str, int] = {}
        self.fractals: dict[str, dict[str, Any]] = {}

    def install(self, client: Any) -> None:
        client.handlers[("memory", "audit_offset")] = lambda b, ev: {"value": self.offsets.get(b["path"], 0)}
        client.handlers[("memory", "create_fractals")] = self.create
        client.handlers[("memory", "query_fractals")] = lambda b, ev: {"fractals": [
            {"oid": hex(i), **f} for i, f in enumerate(self.fractals.values(), 1)
            if f["meta"]["cycle_id"] == b.get("cycle_id")]}

    def create(self, body: dict[str, Any], on_event: Any) -> dict[str, Any]:
        new = [e for e in body["events"] if e["event_id"] not in self.fractals]
        for e in new:
            self.fractals[e["event_id"]] = e
        self.offsets[body["offset"]["path"]] = body["offset"]["value"]
        return {"created": len(new), "skipped": len(body["events"]) - len(new)}


@pytest.fixture
async def real_audit(env, settings):
    from batos.audit import AuditLog

    log = AuditLog(settings.audit_log)
    await log.open()
    env.audit = log
    yield log
    await log.close()


async def test_audit_ingests_new_lines_and_trace_shows_a_cycle(kernel, env, client, real_audit):
    memory = FractalMemory()
    memory.install(client)
    run = new_run(env, Events())
    await run.begin()
    await run.to(State.DECOMPOSING)
    events = Events()
    out = await commands.dispatch(kernel, events, K.Audit())
    assert out.ingest["created"] == 3  # CYCLE_START and the transitions into IDLE and DECOMPOSING
    assert [e["event_type"] for e in out.recent] == ["CYCLE_START", "STATE_TRANSITION", "STATE_TRANSITION"]
    assert events.of("progress")
    again = await commands.dispatch(kernel, Events(), K.Audit())
    assert again.ingest["created"] == 0
    trace = await commands.dispatch(kernel, Events(), K.Trace(cycle_id=run.cycle_id))
    assert trace.cycle["psm_state"] == "DECOMPOSING"
    assert [e["event_type"] for e in trace.events] == ["CYCLE_START", "STATE_TRANSITION", "STATE_TRANSITION"]
    with pytest.raises(ServiceError, match="no cognitive cycle"):
        await commands.dispatch(kernel, Events(), K.Trace(cycle_id="dead-beef"))


async def test_recovery_fails_interrupted_cycles_and_audits_it(env, real_audit, settings):
    run = new_run(env, Events())
    await run.begin()
    await run.to(State.DECOMPOSING)
    failed = await recover(env)
    assert [f["cycle_id"] for f in failed] == [run.cycle_id] and env.info["recovered"] == [run.cycle_id]
    await real_audit.flush()
    lines = [json.loads(x) for x in settings.audit_log.read_text().splitlines()]
    ends = [e for e in lines if e["event_type"] == "CYCLE_END"]
    assert ends and ends[-1]["status"] == "FAILURE" and ends[-1]["event_data"]["error"] == records.RESTART_REASON
    assert ends[-1]["mission_type"] == "query"


async def test_several_consoles_each_see_only_their_own_cycle(kernel, client):
    client.handlers[("memory", "search")] = lambda body, ev: {"hits": []}

    async def one(i: int) -> tuple[Events, str]:
        events = Events()
        with pytest.raises(ServiceError):  # no llm: each fails after its own transitions
            await commands.dispatch(kernel, events, parse(t1(args=[f"question {i}"])))
        return events, events.items[0][1]["cycle_id"]

    results = await asyncio.gather(*(one(i) for i in range(4)))
    ids = {cid for _, cid in results}
    assert len(ids) == 4
    for events, cid in results:
        assert {d["cycle_id"] for _, d in events.items} == {cid}
        assert events.states()[-1] == "FAILED"


async def test_start_kernel_installs_recovers_warms_up_and_stops(settings, image, client, audit):
    env_run = None
    kernel = await start_kernel(settings, client, image=image, audit=audit)
    try:
        env_run = new_run(kernel.env, Events())
        await env_run.begin()
        assert "sandbox" in kernel.env.info and kernel.env.info["recovered"] == []
        assert kernel.autotelic.describe()["running"] is True
    finally:
        await stop_kernel(kernel)
    assert kernel.autotelic.task is None
    # the next kernel of the same instance name finds the unfinished cycle and fails it
    again = await start_kernel(settings, client, image=await image.open(), audit=audit)
    try:
        assert again.env.info["recovered"] == [env_run.cycle_id]
    finally:
        await stop_kernel(again)


async def test_the_autotelic_loop_ingests_periodically_and_survives_failures(env, client, settings, real_audit):
    env.settings = settings.model_copy(update={"autotelic_period": 0.05})
    memory = FractalMemory()
    memory.install(client)
    offsets = client.handlers[("memory", "audit_offset")]
    calls = {"n": 0}

    def flaky(body: dict[str, Any], on_event: Any) -> dict[str, Any]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ServiceError("unavailable", "memory restarting")
        return offsets(body, on_event)

    client.handlers[("memory", "audit_offset")] = flaky
    run = new_run(env, Events())
    await run.begin()
    loop = Autotelic(env)
    loop.start()
    try:
        for _ in range(100):
            await asyncio.sleep(0.05)
            if loop.runs >= 2:
                break
    finally:
        await loop.stop()
    assert loop.runs >= 2 and calls["n"] >= 3  # the first run failed, later ones went on
    assert len(memory.fractals) == 2 and loop.describe()["last_error"] is None  # CYCLE_START, IDLE
