"""The kernel's `forge`: ask the forge service for a run, then follow the steward's status log to the end.

``forge.run`` curates the persona's golden paths, has BRICK write the training script and publishes an
instruction in the upgrade channel; it replies at once with ``instruction_id`` because the steward is about to
stop that very process. The kernel then follows ``<upgrade_channel>/<instruction_id>.log.jsonl``
(services.forge.steward.follow_log) and turns each line into an event for the console:

    progress (train / load / evaluate)   ``progress`` {stage TRAINING | EVALUATING, done, total, rate, eta_s, ...}:
                                         the console draws a progress bar
    started, stopped, stage, restarted,  ``state`` {state, from, note}: the run's lifecycle, one line each
    finished, incarnated
    output, trained, evaluated, ...      ``log`` {text}

It ends at a failed ``finished``, or at ``incarnated`` after a successful one (the restarted worker judged the
adapter and says whether it activated it), or when the incarnation grace period runs out. The reply carries the
before/after metrics (the reference the adapter had to beat -- the previous adapter, else the base model -- and
the adapter itself) and whether the adapter was activated.

A steward that never takes the instruction (not running) is reported after a pickup timeout with the instruction
left pending, rather than holding the console for hours.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from batos.errors import ServiceError
from proto import ErrorCode
from services.forge import steward
from services.kernel.env import Emit

PROGRESS_STAGES = {"train": "TRAINING", "load": "TRAINING", "evaluate": "EVALUATING"}
LIFECYCLE_STATES = {"started": "STARTED", "stopped": "WORKER_STOPPED", "restarted": "WORKER_RESTARTED",
                    "incarnated": "INCARNATED"}
PROGRESS_EXTRAS = ("loss", "learning_rate", "epoch", "model", "eval_loss", "format_valid", "examples")
PICKUP_WARN_S = 10.0  # a first "waiting for the steward" note after this long
LOG_TEXT_CHARS = 500
Follow = Callable[..., AsyncIterator[dict[str, Any]]]


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
    finished: dict[str, Any] | None = None
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
            self.finished = line
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

    def outcome(self) -> dict[str, Any]:
        """The run's result: ok, reason, metrics before/after, and whether the adapter was activated."""
        fin = self.finished or {}
        inc = self.incarnated or {}
        metrics = inc.get("metrics") or _brief(fin.get("metrics"))
        out: dict[str, Any] = {
            "ok": bool(fin.get("ok")),
            "reason": fin.get("reason"),
            "returncode": fin.get("returncode"),
            "adapter_dir": fin.get("adapter_dir") or inc.get("adapter_dir"),
            "seconds": fin.get("seconds"),
            "restarted": fin.get("restarted"),
            "metrics": before_after(metrics),
            "activated": inc.get("decision") == "activated",
            "decision": inc.get("decision"),
            "decision_reason": inc.get("reason"),
            "log_lines": self.lines,
        }
        if self.finished is None:
            out["reason"] = "the status log ended before the run finished"
        elif fin.get("ok") and self.incarnated is None:
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
        return f"training and evaluation done in {line.get('seconds')} s; adapter in {line.get('adapter_dir')}"
    return f"run failed: {line.get('reason') or 'no reason given'}"


def _lifecycle_note(kind: str, line: dict[str, Any]) -> str:
    if kind == "started":
        return f"steward took the instruction (script by {line.get('origin')}: {line.get('script_path')})"
    return f"{line.get('program')} is {line.get('state')}"


def _seconds(ts: Any) -> float | None:
    try:
        return datetime.fromisoformat(str(ts)).timestamp()
    except ValueError:
        return None


async def wait_for_pickup(channel: Path, instruction_id: str, emit: Emit, *, timeout: float,
                          interval: float = 0.5, warn_after: float = PICKUP_WARN_S) -> None:
    """Until the steward takes the instruction (its status log exists); unavailable after ``timeout``."""
    log = steward.log_path(channel, instruction_id)
    started = time.monotonic()
    warned = False
    while not log.exists():
        waited = time.monotonic() - started
        if waited > timeout:
            raise ServiceError(ErrorCode.UNAVAILABLE,
                               f"the steward has not taken forge instruction {instruction_id} in {timeout:g} s "
                               f"(is the steward program running?); it stays pending in {channel}",
                               {"instruction_id": instruction_id})
        if not warned and waited > warn_after:
            warned = True
            await emit("log", instruction_id=instruction_id, level="warning",
                       text=f"waiting for the steward to take instruction {instruction_id}")
        await asyncio.sleep(interval)


async def follow_run(channel: Path, instruction_id: str, emit: Emit, *, timeout: float | None,
                     incarnation_grace: float, pickup_timeout: float, interval: float = 0.5,
                     follow: Follow = steward.follow_log) -> dict[str, Any]:
    """Relay one run's status log as events; return :meth:`ForgeFollow.outcome`."""
    await wait_for_pickup(channel, instruction_id, emit, timeout=pickup_timeout, interval=interval)
    state = ForgeFollow(instruction_id)
    try:
        async for line in follow(channel, instruction_id, interval=interval, timeout=timeout,
                                 incarnation_grace=incarnation_grace):
            event = state.event(line)
            if event is not None:
                await emit(event[0], **event[1])
    except TimeoutError:
        raise ServiceError(ErrorCode.TIMEOUT, f"forge run {instruction_id} did not finish within {timeout:g} s; "
                                              "it may still be running (see the steward's log)",
                           {"instruction_id": instruction_id}) from None
    return state.outcome()
