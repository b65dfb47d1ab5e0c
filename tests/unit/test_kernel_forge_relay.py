"""Kernel: `audit_event` (other processes' Table 3 events), the `forge` relay following the steward's status log
(a fake log file written while the relay reads it), and ALFRED's history audit in the autotelic loop."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from batos.errors import ServiceError
from services.forge.incarnation import audit_event as incarnation_event
from services.forge.steward import log_path
from services.kernel import commands, forge_follow, handlers
from services.kernel.audit_event import record_event
from services.kernel.autotelic import Autotelic
from services.kernel.kernel import Kernel
from tests.unit.test_forge_history_audit import FakeMemory, cycles
from tests.unit.test_kernel_cycle import *  # noqa: F403  (the kernel test kit: fixtures)
from tests.unit.test_kernel_cycle import Events, new_run


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
    reply = await record_event(env, event)
    assert reply == {"logged": True, "event_id": event["event_id"], "event_type": "ADAPTER_INCARNATION",
                     "cycle_id": event["cycle_id"]}
    written = lines_of(settings.audit_log)  # on disk when the reply comes (flushed)
    assert len(written) == 1 and written[0]["event_id"] == event["event_id"]
    assert written[0]["mission_type"] == "fineTuneNewLoRA_" and written[0]["event_data"]["decision"] == "activated"


@pytest.mark.parametrize(("event", "match"), [
    ("not an object", "must be a Table 3 object"),
    ({}, "event_id: Field required"),
    ("bad uuid", "cycle_id: String should match pattern"),
    ("bad status", "status: Input should be"),
    ("extra field", "surprise: Extra inputs are not permitted"),
])
async def test_a_malformed_audit_event_is_refused_and_not_written(env, real_audit, settings, tmp_path, event, match):
    good = incarnation_event("BRICK", tmp_path, {"decision": "kept_previous", "reason": "r"}, None)
    event = {"bad uuid": {**good, "cycle_id": "nope"}, "bad status": {**good, "status": "MAYBE"},
             "extra field": {**good, "surprise": 1}}.get(event, event) if isinstance(event, str) else event
    with pytest.raises(ServiceError, match=match) as info:
        await record_event(env, event)
    assert info.value.code == "bad_args"
    await real_audit.flush()
    assert not settings.audit_log.exists() or settings.audit_log.read_text() == ""


async def test_the_audit_event_handler_needs_an_event(kernel):
    class Req:
        args: dict[str, Any] = {}
        ctx = type("Ctx", (), {"state": {"kernel": kernel}})()

    with pytest.raises(ServiceError, match="missing argument 'event'"):
        await handlers.HANDLERS["audit_event"](Req())


# -- the forge relay -------------------------------------------------------------------------------------

METRICS = {"base": {"eval_loss": 1.9, "format_valid": 0.25, "perplexity": 6.7},
           "previous": None, "adapter": {"eval_loss": 1.4, "format_valid": 0.5}, "eval_examples": 4}
RUN = [
    {"event": "started", "id": "r1", "persona": "BRICK", "origin": "template", "script_path": "/s.py"},
    {"event": "stopped", "program": "forge", "state": "STOPPED"},
    {"event": "stage", "stage": "train", "argv": ["python", "/s.py"]},
    {"event": "progress", "stage": "load", "step": 0, "total": -1, "model": "/m"},
    {"event": "output", "stage": "train", "text": "loading weights"},
    {"event": "progress", "stage": "train", "step": 1, "total": 4, "eta_s": 3.0},
    {"event": "progress", "stage": "train", "step": 2, "total": 4, "loss": 1.7, "eta_s": 2.0},
    {"event": "progress", "stage": "train", "step": 4, "total": 4, "eta_s": 0.0},
    {"event": "trained", "stage": "train", "adapter_dir": "/lora/brick_1", "steps": 4},
    {"event": "stage_done", "stage": "train", "returncode": 0},
    {"event": "stage", "stage": "evaluate", "argv": ["python", "-m", "services.forge.evaluation"]},
    {"event": "progress", "stage": "evaluate", "step": 2, "total": 2, "model": "adapter", "eval_loss": 1.4},
    {"event": "stage_done", "stage": "evaluate", "returncode": 0},
    {"event": "restarted", "program": "forge", "state": "RUNNING"},
    {"event": "finished", "ok": True, "returncode": 0, "adapter_dir": "/lora/brick_1", "metrics": METRICS,
     "restarted": True, "seconds": 12.5},
]
INCARNATED = {"event": "incarnated", "id": "r1", "persona": "BRICK", "adapter_dir": "/lora/brick_1",
              "decision": "activated", "reason": "eval loss 1.4000 < base 1.9000",
              "metrics": {"base": {"eval_loss": 1.9, "format_valid": 0.25}, "previous": None,
                          "adapter": {"eval_loss": 1.4, "format_valid": 0.5}}}


async def write_log(path: Path, lines: list[dict[str, Any]], delay: float = 0.01) -> None:
    """The steward's writer: one flushed line at a time, timestamps one second apart."""
    await asyncio.sleep(0.05)
    with open(path, "a") as f:
        for i, line in enumerate(lines):
            f.write(json.dumps({**line, "ts": f"2025-09-02T10:00:{i:02d}+00:00"}) + "\n")
            f.flush()
            await asyncio.sleep(delay)


def fake_forge(client, settings, lines: list[dict[str, Any]], calls: list[dict[str, Any]]):
    async def run(body: dict[str, Any], on_event: Any) -> dict[str, Any]:
        calls.append(body)
        await on_event({"event": "progress", "stage": "curation", "done": 1, "total": 3})
        channel = Path(settings.upgrade_channel)
        channel.mkdir(parents=True, exist_ok=True)
        asyncio.get_running_loop().create_task(write_log(log_path(channel, "r1"), lines))
        return {"instruction_id": "r1", "log_path": str(log_path(channel, "r1")), "counts": {"train": 3}}

    client.handlers[("forge", "run")] = run


async def test_forge_follows_the_status_log_to_the_incarnation(kernel, client, settings):
    calls: list[dict[str, Any]] = []
    fake_forge(client, settings, [*RUN, INCARNATED], calls)
    events = Events()
    cmd = commands.parse({"command": "forge", "target_oid": "0",
                          "mission_brief": {"type": "forge", "selector": "forge", "args": ["brick"],
                                            "kwargs": {"max_steps": 4, "ignored": True}}})
    out = await commands.dispatch(kernel, events, cmd)
    assert calls == [{"persona": "BRICK", "max_steps": 4}]

    # the forge's own events first, then the status log as events
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
    assert "train step exited with 0" in logs

    assert out["instruction_id"] == "r1" and out["counts"] == {"train": 3}
    assert out["ok"] is True and out["activated"] is True and out["decision"] == "activated"
    assert out["metrics"]["before"] == {"model": "base", "eval_loss": 1.9, "format_valid": 0.25}
    assert out["metrics"]["after"] == {"model": "adapter", "eval_loss": 1.4, "format_valid": 0.5}
    assert out["adapter_dir"] == "/lora/brick_1" and out["log_lines"] == len(RUN) + 1


async def test_a_failed_run_ends_at_finished_with_its_reason(kernel, client, settings):
    failed = [*RUN[:3], {"event": "output", "stage": "train", "text": "RuntimeError: out of memory"},
              {"event": "stage_done", "stage": "train", "returncode": 1},
              {"event": "restarted", "program": "forge", "state": "RUNNING"},
              {"event": "finished", "ok": False, "returncode": 1, "reason": "train failed (exit 1): out of memory",
               "metrics": None, "restarted": True},
              INCARNATED]  # after a failed finish nothing more is read
    fake_forge(client, settings, failed, [])
    events = Events()
    out = await commands.dispatch(kernel, events, commands.from_console("forge", {"persona": "BRICK"}))
    assert events.of("state")[-1]["state"] == "FAILED"
    assert "out of memory" in events.of("state")[-1]["note"]
    assert out["ok"] is False and out["activated"] is False and out["decision"] is None
    assert out["reason"] == "train failed (exit 1): out of memory" and out["metrics"] is None


async def test_a_worker_that_never_reports_incarnation_ends_after_the_grace(tmp_path):
    await write_log(log_path(tmp_path, "r1"), RUN, delay=0)
    out = await asyncio.wait_for(forge_follow.follow_run(tmp_path, "r1", Events(), timeout=30, incarnation_grace=0.2,
                                                         pickup_timeout=5, interval=0.01), 10)
    assert out["ok"] is True and out["activated"] is False and out["decision"] is None
    assert out["metrics"]["after"] == {"model": "adapter", "eval_loss": 1.4, "format_valid": 0.5}  # metrics.json
    assert "did not report the incarnation" in out["decision_reason"]


async def test_a_steward_that_never_takes_the_instruction_is_reported(tmp_path):
    events = Events()
    with pytest.raises(ServiceError, match="has not taken forge instruction r9") as info:
        await forge_follow.follow_run(tmp_path, "r9", events, timeout=30, incarnation_grace=1, pickup_timeout=0.2,
                                      interval=0.02)
    assert info.value.code == "unavailable" and info.value.details == {"instruction_id": "r9"}


async def test_the_pickup_wait_warns_once(tmp_path):
    events = Events()
    with pytest.raises(ServiceError):
        await forge_follow.wait_for_pickup(tmp_path, "r9", events, timeout=0.3, interval=0.02, warn_after=0.05)
    assert [d["text"] for d in events.of("log")] == ["waiting for the steward to take instruction r9"]


async def test_a_forge_reply_without_an_instruction_is_an_internal_error(kernel, client):
    client.handlers[("forge", "run")] = lambda body, ev: {"persona": body["persona"]}
    with pytest.raises(ServiceError, match="without an instruction_id") as info:
        await commands.dispatch(kernel, Events(), commands.from_console("forge", {"persona": "ROBIN"}))
    assert info.value.code == "internal"


async def test_a_run_past_its_time_is_a_timeout_naming_the_instruction(tmp_path):
    log_path(tmp_path, "r2").write_text(json.dumps({"event": "started"}) + "\n")
    with pytest.raises(ServiceError, match=r"did not finish within 0\.1 s") as info:
        await forge_follow.follow_run(tmp_path, "r2", Events(), timeout=0.1, incarnation_grace=1, pickup_timeout=1,
                                      interval=0.02)
    assert info.value.code == "timeout"


# -- the autotelic loop's history audit ---------------------------------------------------------------------


def history_memory(client, n_success: int) -> FakeMemory:
    memory = FakeMemory(cycles(n_success))

    async def query(body: dict[str, Any], on_event: Any) -> dict[str, Any]:
        return await memory("memory", "query_fractals", body)

    client.handlers[("memory", "query_fractals")] = query
    return memory


async def test_the_history_audit_dispatches_a_forge_when_a_persona_is_due(env, client, settings):
    env.settings = settings.model_copy(update={"forge_threshold": 3})
    history_memory(client, 4)
    client.handlers[("forge", "run")] = lambda body, ev: {"instruction_id": "brick-1", "persona": body["persona"]}
    loop = Autotelic(env)
    report = await loop.audit_history()
    assert report["due"] == ["BRICK"] and report["counts"]["BRICK"] == 3
    assert report["dispatched"] == {"BRICK": {"instruction_id": "brick-1", "persona": "BRICK"}}
    assert [b for s, c, b in client.calls if (s, c) == ("forge", "run")] == [
        {"persona": "BRICK", "reason": "3 new successful cycles"}]
    assert loop.describe()["history_audit"]["runs"] == 1


async def test_the_dispatch_waits_while_a_cycle_runs(env, client, settings):
    env.settings = settings.model_copy(update={"forge_threshold": 2})
    history_memory(client, 2)
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
        if calls["n"] <= 4:  # the first history audit's queries fail
            raise ServiceError("unavailable", "memory restarting")
        return {"fractals": []}

    client.handlers[("memory", "query_fractals")] = flaky
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
