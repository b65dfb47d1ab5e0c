"""Kernel: `audit_event` (other processes' Table 3 events), the `forge` relay of the steward's `upgrade` events (a
fake steward on the fake broker client), and ALFRED's history audit in the autotelic loop."""

from __future__ import annotations

import ast
import asyncio
import json
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import msgspec
import pytest

from batos.errors import ServiceError
from proto import contract
from proto.bodies import kernel as K
from proto.bodies.llm import ForgeRun
from proto.bodies.steward import Instruction
from services.forge.incarnation import audit_event as incarnation_event
from services.kernel import commands, handlers
from services.kernel.audit_event import record_event
from services.kernel.autotelic import Autotelic
from services.kernel.kernel import Kernel
from tests.unit.test_kernel_cycle import *  # noqa: F403  (the kernel test kit: fixtures)
from tests.unit.test_kernel_cycle import Events, forge_run_reply, new_run


@pytest.fixture
def kernel(env):
    return Kernel(env, Autotelic(env))


@pytest.fixture
async def real_audit(env, settings):
    from batos.audit import AuditLog

    log = AuditLog(settings.audit_log)
    await log.open()
    env.audit = log
    yield log
    await log.close()


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- audit_event ---------------------------------------------------------------------------------------


async def test_audit_event_writes_the_forges_incarnation_event_to_the_log(env, real_audit, settings, tmp_path):
    marker = {"decision": "activated", "reason": "eval loss 1.2 < base 1.5", "blob_oid": "3f",
              "previous_adapter": None, "metrics": {"adapter": {"eval_loss": 1.2}}}
    event = incarnation_event("BRICK", tmp_path / "brick_1", marker, None)
    reply = msgspec.to_builtins(await record_event(env, _decoded(event)))
    assert reply == {"logged": True, "event_id": event["event_id"], "event_type": "ADAPTER_INCARNATION",
                     "cycle_id": event["cycle_id"]}
    written = lines_of(settings.audit_log)  # on disk when the reply comes (flushed)
    assert len(written) == 1 and written[0]["event_id"] == event["event_id"]
    assert written[0]["mission_type"] == "fineTuneNewLoRA_" and written[0]["event_data"]["decision"] == "activated"


def _decoded(event: Any) -> Any:
    """The event as the kernel's worker decodes ``audit_event``'s body (proto.bodies.kernel.AuditEvent)."""
    from proto import ProtocolError, contract

    try:
        return contract.decode_request(contract.spec("kernel", "audit_event"), {"event": event}).event
    except ProtocolError as e:
        raise ServiceError(e.code, e.message) from None


@pytest.mark.parametrize(("event", "match"), [
    ("not an object", r"Expected `object`, got `str` - at `\$\.event`"),
    ({}, "missing required field `event_id`"),
    ("bad uuid", r"matching regex .* - at `\$\.cycle_id`"),
    ("bad status", r"'MAYBE' - at `\$\.status`"),
    ("extra field", "unknown field `surprise`"),
])
async def test_a_malformed_audit_event_is_refused_and_not_written(env, real_audit, settings, tmp_path, event, match):
    good = incarnation_event("BRICK", tmp_path, {"decision": "kept_previous", "reason": "r"}, None)
    event = {"bad uuid": {**good, "cycle_id": "nope"}, "bad status": {**good, "status": "MAYBE"},
             "extra field": {**good, "surprise": 1}}.get(event, event) if isinstance(event, str) else event
    with pytest.raises(ServiceError, match=match) as info:
        await record_event(env, _decoded(event))
    assert info.value.code == "bad_args"
    await real_audit.flush()
    assert not settings.audit_log.exists() or settings.audit_log.read_text() == ""


async def test_the_audit_event_handler_needs_an_event(kernel):
    from tests.typed_handler import call_handler

    with pytest.raises(ServiceError, match="missing required field `event`"):
        await call_handler("kernel", "audit_event", handlers.HANDLERS["audit_event"], None, {})


# -- the forge relay -------------------------------------------------------------------------------------

METRICS = {"base": {"eval_loss": 1.9, "format_valid": 0.25, "perplexity": 6.7},
           "previous": None, "adapter": {"eval_loss": 1.4, "format_valid": 0.5}, "eval_examples": 4}
RUN = [
    {"event": "started", "id": "r1", "persona": "BRICK", "origin": "template", "program": "forge"},
    {"event": "stopped", "program": "forge", "state": "STOPPED"},
    {"event": "stage", "stage": "train", "argv": ["python", "/s.py"]},
    {"event": "progress", "stage": "load", "step": 0, "total": -1, "model": "/m"},
    {"event": "output", "stage": "train", "text": "loading weights"},
    {"event": "progress", "stage": "train", "step": 1, "total": 4, "eta_s": 3.0},
    {"event": "progress", "stage": "train", "step": 2, "total": 4, "loss": 1.7, "eta_s": 2.0},
    {"event": "progress", "stage": "train", "step": 4, "total": 4, "eta_s": 0.0},
    {"event": "trained", "stage": "train", "steps": 4},
    {"event": "stage_done", "stage": "train", "returncode": 0},
    {"event": "stage", "stage": "evaluate", "argv": ["python", "-m", "services.forge.evaluation"]},
    {"event": "progress", "stage": "evaluate", "step": 2, "total": 2, "model": "adapter", "eval_loss": 1.4},
    {"event": "stage_done", "stage": "evaluate", "returncode": 0},
    {"event": "stored", "expert": "brick_r1", "oid": "3f", "size": 4096},
    {"event": "restarted", "program": "forge", "state": "RUNNING"},
    {"event": "finished", "ok": True, "returncode": 0, "expert": "brick_r1", "metrics": METRICS,
     "restarted": True, "seconds": 12.5},
]
INCARNATED = {"event": "incarnated", "expert": "brick_r1", "persona": "BRICK",
              "decision": "activated", "reason": "eval loss 1.4000 < base 1.9000", "metrics": METRICS}
INSTRUCTION = {"id": "r1", "persona": "BRICK", "script": "print()", "config": {"persona": "BRICK"},
               "files": {"train.jsonl": "{}\n"}, "program": "forge"}


def as_sent(instruction: dict[str, Any]) -> dict[str, Any]:
    """The instruction as steward.upgrade's body carries it: proto.bodies.steward.Instruction, defaults filled in
    (``created_at`` is the moment it was decoded: left out of the comparison)."""
    return {**contract.encode(msgspec.convert(instruction, Instruction)), "created_at": ANY}


def fake_steward(client, events: list[dict[str, Any]], reply: dict[str, Any] | Exception, calls: list[dict[str, Any]]):
    """forge.run replies with the instruction; steward.upgrade streams ``events`` (timestamps one second apart)."""
    async def run(body: dict[str, Any], on_event: Any) -> dict[str, Any]:
        calls.append(("forge", body))
        if on_event is not None:  # the autotelic loop does not follow the preparation
            await on_event({"event": "progress", "stage": "curation", "done": 1, "total": 3})
        return forge_run_reply(INSTRUCTION, train=3)

    async def upgrade(body: dict[str, Any], on_event: Any) -> dict[str, Any]:
        calls.append(("steward", body))
        for i, event in enumerate(events):
            await on_event({**event, "ts": f"2025-09-02T10:00:{i:02d}+00:00"})
        if isinstance(reply, Exception):
            raise reply
        return reply

    client.handlers[("forge", "run")] = run
    client.handlers[("steward", "upgrade")] = upgrade


OK_REPLY = {"ok": True, "returncode": 0, "expert": "brick_r1", "expert_oid": "3f", "metrics": METRICS,
            "restarted": True, "seconds": 12.5, "decision": "activated", "decision_reason": "eval loss 1.4000 < base"}


async def test_forge_relays_the_stewards_events_to_the_incarnation(kernel, client):
    calls: list[Any] = []
    fake_steward(client, [*RUN, INCARNATED], OK_REPLY, calls)
    events = Events()
    cmd = msgspec.convert({"command": "forge", "target_oid": "0",
                           "mission_brief": {"type": "forge", "selector": "forge", "args": ["brick"],
                                             "kwargs": {"max_steps": 4}}}, K.Table1Command)
    out = msgspec.to_builtins(await commands.dispatch(kernel, events, cmd))
    # forge prepared it; the kernel handed the instruction, untouched, to the steward
    assert [c[0] for c in calls] == ["forge", "steward"] and calls[1][1] == as_sent(INSTRUCTION)
    assert msgspec.convert(calls[0][1], ForgeRun) == ForgeRun(persona="BRICK", max_steps=4)  # forge's own type

    # the forge's own events first, then the steward's as console events
    assert events.items[0] == ("progress", {"stage": "curation", "done": 1, "total": 3})
    states = [(d["from"], d["state"]) for d in events.of("state")]
    assert states == [("REQUESTED", "STARTED"), ("STARTED", "WORKER_STOPPED"), ("WORKER_STOPPED", "TRAINING"),
                      ("TRAINING", "EVALUATING"), ("EVALUATING", "WORKER_RESTARTED"),
                      ("WORKER_RESTARTED", "FINISHED"), ("FINISHED", "INCARNATED")]
    bars = [d for d in events.of("progress") if d.get("instruction_id")]
    assert [(d["stage"], d["done"], d["total"]) for d in bars] == [
        ("TRAINING", 0, None), ("TRAINING", 1, 4), ("TRAINING", 2, 4), ("TRAINING", 4, 4), ("EVALUATING", 2, 2)]
    assert bars[2]["loss"] == 1.7 and bars[3]["eta_s"] == 0.0
    assert "rate" not in bars[1] and bars[3]["rate"] == 1.5  # train steps 1 -> 4 in 2 s (the load is not counted)
    logs = [d["text"] for d in events.of("log")]
    assert "loading weights" in logs and any(t.startswith("trained: ") for t in logs)
    assert "train step exited with 0" in logs and any(t.startswith("stored: ") for t in logs)

    assert out["instruction_id"] == "r1" and out["counts"]["train"] == 3 and "instruction" not in out
    assert out["ok"] is True and out["activated"] is True and out["decision"] == "activated"
    assert out["metrics"]["before"] == {"model": "base", "eval_loss": 1.9, "format_valid": 0.25}
    assert out["metrics"]["after"] == {"model": "adapter", "eval_loss": 1.4, "format_valid": 0.5}
    assert out["expert"] == "brick_r1" and out["expert_oid"] == "3f" and out["events"] == len(RUN) + 1


async def test_a_failed_run_ends_at_finished_with_its_reason(kernel, client):
    failed = [*RUN[:3], {"event": "output", "stage": "train", "text": "RuntimeError: out of memory"},
              {"event": "stage_done", "stage": "train", "returncode": 1},
              {"event": "restarted", "program": "forge", "state": "RUNNING"},
              {"event": "finished", "ok": False, "returncode": 1, "reason": "train failed (exit 1): out of memory",
               "metrics": None, "restarted": True}]
    fake_steward(client, failed, {**failed[-1], "event": None}, [])
    events = Events()
    out = msgspec.to_builtins(await commands.dispatch(kernel, events, K.Forge(persona="BRICK")))
    assert events.of("state")[-1]["state"] == "FAILED"
    assert "out of memory" in events.of("state")[-1]["note"]
    assert out["ok"] is False and out["activated"] is False and out["decision"] is None
    assert out["reason"] == "train failed (exit 1): out of memory" and out["metrics"] is None


async def test_a_worker_that_never_reports_incarnation_says_so(kernel, client):
    reply = {**OK_REPLY, "decision": None, "decision_reason": "the restarted worker did not judge brick_r1 within 1 s"}
    fake_steward(client, RUN, reply, [])
    out = msgspec.to_builtins(await commands.dispatch(kernel, Events(), K.Forge(persona="BRICK")))
    assert out["ok"] is True and out["activated"] is False and out["decision"] is None
    assert out["metrics"]["after"]["eval_loss"] == 1.4  # from the finished event's metrics
    assert "did not judge brick_r1" in out["decision_reason"]


@pytest.mark.parametrize(("error", "says"), [
    (ServiceError("worker_lost", "the steward worker handling this request died"), "the steward died during forge "
                                                                                     "run r1 (last state TRAINING)"),
    (ServiceError("unavailable", "no steward worker registered within 45 s"), None),
    (ServiceError("busy", "the steward is running forge r0"), "forge run r1: the steward is running forge r0"),
])
async def test_a_failed_upgrade_is_explained(kernel, client, error, says):
    events_before_death = RUN[:3] if error.code == "worker_lost" else []
    fake_steward(client, events_before_death, error, [])
    with pytest.raises(ServiceError) as info:
        await commands.dispatch(kernel, Events(), K.Forge(persona="BRICK"))
    assert info.value.code == error.code and info.value.details["instruction_id"] == "r1"
    if error.code == "unavailable":
        assert "is the steward program running?" in info.value.message
    else:
        assert says in info.value.message
    if error.code == "worker_lost":
        assert "records the run as failed" in info.value.message


async def test_a_forge_reply_without_an_instruction_is_an_internal_error(kernel, client):
    client.handlers[("forge", "run")] = lambda body, ev: {"persona": body["persona"]}
    with pytest.raises(ServiceError, match=r"forge\.run answered outside its contract.*`instruction_id`") as info:
        await commands.dispatch(kernel, Events(), K.Forge(persona="ROBIN"))
    assert info.value.code == "internal"


def test_the_kernel_imports_nothing_from_other_services():
    """Services share nothing but the broker and ZEO: no module of services/kernel imports another service."""
    kernel_dir = Path(__file__).resolve().parents[2] / "services" / "kernel"
    found = []
    for path in sorted(kernel_dir.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            found += [(path.name, n) for n in names
                      if n.startswith("services.") and not n.startswith("services.kernel")]
    assert len(list(kernel_dir.glob("*.py"))) > 10
    assert found == []


# -- the autotelic loop's history audit ---------------------------------------------------------------------


def forge_history(client, report: dict[str, Any]) -> list[Any]:
    calls: list[Any] = []

    async def history(body: dict[str, Any], on_event: Any) -> dict[str, Any]:
        return dict(report)

    client.handlers[("forge", "history")] = history
    return calls


async def test_the_history_audit_dispatches_a_forge_when_a_persona_is_due(env, client):
    forge_history(client, {"due": ["BRICK"], "counts": {"BRICK": 3}, "busy": []})
    calls: list[Any] = []
    fake_steward(client, [*RUN, INCARNATED], OK_REPLY, calls)
    loop = Autotelic(env)
    report = await loop.audit_history()
    assert report["due"] == ["BRICK"] and report["dispatched"] == {"BRICK": "started"}
    await loop.forge_task  # followed in the background: the loop goes on meanwhile
    (_, asked), handed = calls
    assert asked["persona"] == "BRICK" and asked["reason"] == "3 new successful cycles"
    assert handed == ("steward", as_sent(INSTRUCTION))
    assert loop.last_forge["ok"] is True and loop.last_forge["decision"] == "activated"
    described = loop.describe()
    assert described["history_audit"]["runs"] == 1 and described["forge"]["last"]["persona"] == "BRICK"
    assert described["forge"]["running"] is False


async def test_a_steward_dying_mid_forge_is_reported_not_raised(env, client):
    forge_history(client, {"due": ["BRICK"], "counts": {"BRICK": 3}, "busy": []})
    fake_steward(client, RUN[:2], ServiceError("worker_lost", "died"), [])
    loop = Autotelic(env)
    await loop.audit_history()
    await loop.forge_task
    assert "the steward died during forge run r1" in loop.last_forge["error"]


async def test_the_dispatch_waits_while_a_cycle_runs(env, client):
    forge_history(client, {"due": ["BRICK"], "counts": {"BRICK": 2}, "busy": []})
    run = new_run(env, Events())
    await run.begin()  # a cycle in flight in this kernel
    report = await Autotelic(env).audit_history()
    assert report["due"] == ["BRICK"] and report["dispatched"] == {} and "deferred" in report
    assert client.count("forge", "run") == 0


async def test_a_failing_history_audit_never_ends_the_loop(env, client, settings, real_audit):
    from tests.unit.test_kernel_commands import FractalMemory

    env.settings = settings.model_copy(update={"autotelic_period": 0.05, "forge_threshold": 2})
    FractalMemory().install(client)  # ingestion works
    calls = {"n": 0}

    def flaky(body: dict[str, Any], on_event: Any) -> dict[str, Any]:
        calls["n"] += 1
        if calls["n"] <= 1:  # the first history audit fails (the forge worker restarting)
            raise ServiceError("unavailable", "forge restarting")
        return {"due": [], "counts": {}, "busy": []}

    client.handlers[("forge", "history")] = flaky
    loop = Autotelic(env)
    loop.start()
    try:
        for _ in range(200):
            await asyncio.sleep(0.05)
            if loop.history_runs >= 1:
                break
    finally:
        await loop.stop()
    assert loop.runs >= 2 and loop.history_runs >= 1  # the failed audit did not stop ingestion or later audits
    assert loop.history_error is None and loop.describe()["history_audit"]["last"]["due"] == []
