"""The kernel's `forge`: the forge service prepares a run, the steward service runs it; its events reach the console.

``forge.run`` curates the persona's golden paths, has BRICK write the training script and replies with the
steward's instruction (script, config and dataset inline). The kernel hands it to ``steward.upgrade`` over the
broker and turns each event of that request into an event for the console:

    progress (train / load / evaluate)   ``progress`` {stage TRAINING | EVALUATING, done, total, rate, eta_s, ...}:
                                         the console draws a progress bar
    started, stopped, stage, restarted,  ``state`` {state, from, note}: the run's lifecycle, one event each
    finished, incarnated
    output, stored, trained, ...         ``log`` {text}

The request ends with the steward's reply after the restarted worker judged the adapter (``incarnated``) or
the steward's grace period ran out. The reply carries the before/after metrics (the reference the adapter had
to beat -- the previous adapter, else the base model -- and the adapter itself) and whether the adapter was
activated. A steward that dies during the run fails the request (the broker's ``worker_lost``: an upgrade is
never retried); the error says what the steward does when it is back.

This module imports nothing from other services: the steward is reached only through the broker, with the
typed bodies of proto/bodies/steward.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from batos.errors import ServiceError
from proto import ErrorCode
from proto.bodies.steward import Instruction, UpgradeReply
from services.kernel.env import Emit, ServiceCaller

PROGRESS_STAGES = {"train": "TRAINING", "load": "TRAINING", "evaluate": "EVALUATING"}
LIFECYCLE_STATES = {"started": "STARTED", "stopped": "WORKER_STOPPED", "restarted": "WORKER_RESTARTED",
                    "incarnated": "INCARNATED"}
PROGRESS_EXTRAS = ("loss", "learning_rate", "epoch", "model", "eval_loss", "format_valid", "examples")
LOG_TEXT_CHARS = 500


@dataclass
class Rate:
    """Steps per second of one progress stage, from the steward's line timestamps."""

    first: tuple[float, float] | None = None  # (time, step)

    def update(self, at: float | None, step: float) -> float | None:
        if at is None:
            return None
        if self.first is None or step < self.first[1]:
            self.first = (at, step)
            return None
        elapsed = at - self.first[0]
        return round((step - self.first[1]) / elapsed, 3) if elapsed > 0 and step > self.first[1] else None


@dataclass
class ForgeFollow:
    """What the log said, turned into events as it is read; :meth:`outcome` is the reply's summary."""

    instruction_id: str
    state: str = "REQUESTED"
    incarnated: dict[str, Any] | None = None
    lines: int = 0
    rates: dict[str, Rate] = field(default_factory=dict)

    def event(self, line: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
        """One status line -> (event name, data) for the console, or None for nothing to show."""
        self.lines += 1
        kind = str(line.get("event", ""))
        base = {"instruction_id": self.instruction_id}
        if kind == "progress":
            return "progress", {**base, **self._progress(line)}
        if kind == "stage":
            stage = str(line.get("stage", ""))
            return self._state(PROGRESS_STAGES.get(stage, stage.upper() or "STAGE"), f"{stage} step started", base)
        if kind == "finished":
            ok = bool(line.get("ok"))
            note = _finish_note(line)
            return self._state("FINISHED" if ok else "FAILED", note, base)
        if kind == "incarnated":
            self.incarnated = line
            return self._state("INCARNATED", f"{line.get('decision')}: {line.get('reason', '')}", base)
        if kind in LIFECYCLE_STATES:
            return self._state(LIFECYCLE_STATES[kind], _lifecycle_note(kind, line), base)
        if kind == "stage_done":
            return "log", {**base, "text": f"{line.get('stage')} step exited with {line.get('returncode')}"}
        if kind == "restart_failed":
            return "log", {**base, "level": "warning", "text": f"could not restart {line.get('program')}: "
                                                                f"{line.get('reason', '')}"}
        if kind == "output":
            text = str(line.get("text", ""))
            return ("log", {**base, "text": text[:LOG_TEXT_CHARS]}) if text.strip() else None
        rest = {k: v for k, v in line.items() if k not in ("event", "ts")}
        return "log", {**base, "text": f"{kind}: {json.dumps(rest, default=str)[:LOG_TEXT_CHARS]}"}

    def _state(self, state: str, note: str, base: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        previous, self.state = self.state, state
        return "state", {**base, "state": state, "from": previous, "note": note}

    def _progress(self, line: dict[str, Any]) -> dict[str, Any]:
        stage = str(line.get("stage", ""))
        name = PROGRESS_STAGES.get(stage, stage.upper() or "FORGE")
        done = line.get("step", line.get("done"))
        total = line.get("total")
        out: dict[str, Any] = {"stage": name, "done": done,
                               "total": total if isinstance(total, int | float) and total > 0 else None}
        if isinstance(done, int | float):  # per script stage: loading the model is not a training step
            rate = self.rates.setdefault(stage, Rate()).update(_seconds(line.get("ts")), done)
            if rate is not None:
                out["rate"] = rate
        if isinstance(line.get("eta_s"), int | float):
            out["eta_s"] = line["eta_s"]
        out.update({k: line[k] for k in PROGRESS_EXTRAS if line.get(k) is not None})
        return out

    def outcome(self, reply: UpgradeReply) -> dict[str, Any]:
        """The run's result: ok, reason, metrics before/after, and whether the adapter was activated.

        The steward's reply is the result; the ``incarnated`` event, when it came, says how the restarted
        worker judged the adapter (with the metrics it judged on)."""
        inc = self.incarnated or {}
        out: dict[str, Any] = {
            "ok": reply.ok,
            "reason": reply.reason,
            "returncode": reply.returncode,
            "expert": reply.expert,
            "expert_oid": reply.expert_oid,
            "seconds": reply.seconds,
            "restarted": reply.restarted,
            "metrics": before_after(_brief(inc.get("metrics") or reply.metrics)),
            "activated": reply.decision == "activated",
            "decision": reply.decision,
            "decision_reason": reply.decision_reason,
            "events": self.lines,
        }
        if reply.ok and reply.decision is None and not reply.decision_reason:
            out["decision_reason"] = ("the restarted worker did not report the incarnation within the grace "
                                      "period; see the forge worker's log and `audit`")
        return out


def before_after(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    """{before: the reference to beat (previous adapter, else base), after: the adapter, base}."""
    if not metrics:
        return None
    previous = metrics.get("previous")
    before_name = "previous" if previous and previous.get("eval_loss") is not None else "base"
    return {"before": {"model": before_name, **(metrics.get(before_name) or {})},
            "after": {"model": "adapter", **(metrics.get("adapter") or {})},
            "base": metrics.get("base")}


def _brief(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    """metrics.json (the evaluation module's full record) -> the eval_loss / format_valid of each model."""
    if not metrics:
        return None

    def pick(m: Any) -> dict[str, Any] | None:
        return {k: m.get(k) for k in ("eval_loss", "format_valid")} if isinstance(m, dict) else None

    return {"base": pick(metrics.get("base")), "previous": pick(metrics.get("previous")),
            "adapter": pick(metrics.get("adapter"))}


def _finish_note(line: dict[str, Any]) -> str:
    if line.get("ok"):
        return f"training and evaluation done in {line.get('seconds')} s; adapter stored as {line.get('expert')}"
    return f"run failed: {line.get('reason') or 'no reason given'}"


def _lifecycle_note(kind: str, line: dict[str, Any]) -> str:
    if kind == "started":
        return f"steward took the instruction (script by {line.get('origin')})"
    return f"{line.get('program')} is {line.get('state')}"


def _seconds(ts: Any) -> float | None:
    try:
        return datetime.fromisoformat(str(ts)).timestamp()
    except ValueError:
        return None


async def upgrade(client: ServiceCaller, instruction: Instruction, emit: Emit, *,
                  timeout: float | None) -> dict[str, Any]:
    """``steward.upgrade`` with its events relayed as console events; return :meth:`ForgeFollow.outcome`.

    ``instruction`` is forge ``run``'s typed reply's, handed on as it is."""
    state = ForgeFollow(instruction.id)

    async def relay(event: dict[str, Any]) -> None:
        converted = state.event(dict(event))
        if converted is not None:
            await emit(converted[0], **converted[1])

    try:
        reply = await client.request(instruction, on_event=relay, timeout=timeout)
    except ServiceError as e:
        raise explain(e, instruction.id, state, instruction.program) from None
    return state.outcome(reply)


def explain(e: ServiceError, ident: str, state: ForgeFollow, program: str) -> ServiceError:
    """A failed upgrade request in the Architect's words: what happened and what the system does about it."""
    details = {**(e.details or {}), "instruction_id": ident, "state": state.state}
    if e.code == ErrorCode.WORKER_LOST:
        return ServiceError(e.code, f"the steward died during forge run {ident} (last state {state.state}); it is "
                                    f"restarted by supervisord, kills the orphaned training, starts {program} again "
                                    "and records the run as failed (never retried). Ask `forge` again to retry.",
                            details)
    if e.code == ErrorCode.UNAVAILABLE and state.lines == 0:
        return ServiceError(e.code, f"no steward took forge run {ident} ({e.message}); is the steward program "
                                    "running?", details)
    if e.code == ErrorCode.TIMEOUT:
        return ServiceError(e.code, f"forge run {ident} did not finish in time; it may still be running (see the "
                                    "steward's log and its `status`)", details)
    return ServiceError(e.code, f"forge run {ident}: {e.message}", details)
