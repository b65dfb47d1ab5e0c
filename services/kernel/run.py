"""A cognitive cycle in flight: PSM transitions, events to its console, audit events, timed service calls.

:class:`CycleRun` is the only way kernel code changes a cycle's state, so every transition is, in this order,
committed to the image (a small transaction of its own), streamed to the console that started the cycle
(``state`` event) and written to the audit log (``STATE_TRANSITION``). :func:`execute` wraps a mission body:
the cycle's time budget (settings.cycle_timeout), and any failure, timeout or cancellation ends the cycle in
FAILED with its reason before the error reaches the requester.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast, overload

import msgspec

from batos.audit import AuditEvent
from batos.config import MEMORY_TIMEOUT
from batos.errors import ServiceError
from batos.uvm import Root
from proto import ErrorCode
from proto.bodies.llm import Action, ActionReply, Generate, GenerateReply, Message
from proto.contract import Call, Reply
from services.kernel import cycle as records
from services.kernel.env import Emit, KernelEnv
from services.kernel.psm import MACHINE, State

log = logging.getLogger("batos.kernel")

_PROMPT_AUDIT_CHARS = 20_000  # the audit log keeps whole prompts, but not unbounded ones


class CycleRun:
    def __init__(self, env: KernelEnv, emit: Emit, *, mission_type: str, mission: dict[str, Any],
                 target_oid: str = "0", persona: str = "ROBIN", parent_cycle: str | None = None):
        self.env = env
        self.emit_raw = emit
        self.mission_type = mission_type
        self.mission = mission
        self.target_oid = target_oid
        self.persona = persona
        self.parent_cycle = parent_cycle
        self.cycle_id = str(uuid.uuid4())
        self.state: str | None = None
        self.oid = ""
        self.started = time.monotonic()
        self.llm_s = 0.0
        self.llm_calls = 0

    # -- events ---------------------------------------------------------------------------------
    async def emit(self, name: str, **data: Any) -> None:
        """An event to the console that started this cycle; a console that went away is not an error."""
        try:
            await self.emit_raw(name, cycle_id=self.cycle_id, **data)
        except Exception as e:  # the cycle's work and its record matter more than one lost event
            log.warning("cycle %s: event %s not delivered: %s", self.cycle_id, name, e)

    async def note(self, text: str) -> None:
        await self.emit("log", text=text)

    async def record(self, event_type: str, build: Callable[[], AuditEvent]) -> None:
        """Build one Table 3 event (with :class:`batos.audit.AuditEvent`'s constructors: the one definition
        of each event's shape, which tests build theirs with too) and log it; audit trouble, an invalid
        event included, is logged, it never fails the cycle."""
        try:
            await self.env.audit.log(build())
        except Exception as e:
            log.warning("cycle %s: audit event %s not written: %s", self.cycle_id, event_type, e)

    async def audit(self, event_type: str, *, status: str = "IN_PROGRESS", persona: str | None = None,
                    **event_data: Any) -> None:
        """One event of a kind without a constructor of its own (METHOD_DEFINED, ANSWER_REJECTED...), in the
        current state, by ``persona`` or the state's."""
        await self.record(event_type, lambda: AuditEvent.make(
            event_type, cycle_id=self.cycle_id, psm_state=self.state or State.IDLE.value,
            persona=persona or self.persona_in(self.state), status=status, mission_type=self.mission_type or None,
            **event_data))

    async def _transition(self, previous: str | None, *, status: str = "IN_PROGRESS", **data: Any) -> None:
        state = self.state or State.IDLE.value
        await self.record("STATE_TRANSITION", lambda: AuditEvent.transition(
            self.cycle_id, previous, state, persona=self.persona_in(state), status=status,
            mission_type=self.mission_type or None, **data))

    async def _end(self, status: str, output: Any, **data: Any) -> None:
        state = self.state or State.IDLE.value
        await self.record("CYCLE_END", lambda: AuditEvent.cycle_end(
            self.cycle_id, persona=self.persona, status=status, output=output,
            mission_type=self.mission_type or None, psm_state=state, timing=self.timing(), **data))

    def persona_in(self, state: str | None) -> str:
        """Who acts in a state: the cycle's own persona writes its output (SYNTHESIZING), the state's default
        persona acts elsewhere (ALFRED stewards, BABS retrieves)."""
        if state == State.SYNTHESIZING:
            return self.persona
        return MACHINE[State(state)].persona if state else "ALFRED"

    # -- the state machine ------------------------------------------------------------------------
    async def begin(self) -> None:
        self.oid = await self.env.image.transact(
            _create, self.cycle_id, self.mission, self.mission_type, self.target_oid, self.persona,
            self.env.instance, self.parent_cycle)
        self.state = State.IDLE.value
        self.env.active[self.cycle_id] = self
        await self.emit("state", state=self.state, oid=self.oid, mission_type=self.mission_type,
                        parent_cycle=self.parent_cycle)
        await self.record("CYCLE_START", lambda: AuditEvent.cycle_start(
            self.cycle_id, persona=self.persona, mission_type=self.mission_type, input=self.mission,
            psm_state=State.IDLE.value, oid=self.oid, parent_cycle=self.parent_cycle))
        await self._transition(None, oid=self.oid)

    async def to(self, state: State, note: str = "", *, status: str = "IN_PROGRESS",
                 slots: dict[str, Any] | None = None) -> None:
        """Commit the transition (the current state object must accept it), then emit and audit it."""
        previous = await self.env.image.transact(records.transition, self.cycle_id, state.value, note, slots or {})
        self.state = state.value
        await self.emit("state", state=self.state, note=note, **{"from": previous})
        await self._transition(previous, status=status, note=note)

    async def complete(self, status: str, result: dict[str, Any], output: Any = None) -> None:
        """VALIDATING -> COMPLETE with the cycle's status (SUCCESS or SUCCESS_DEGRADED) and its output."""
        await self.to(State.COMPLETE, status, status=status, slots={"status": status, "result": result})
        self.env.active.pop(self.cycle_id, None)
        await self._end(status, output)

    async def completed(self, status: str, output: Any = None, note: str = "") -> None:
        """The COMPLETE transition was committed inside the caller's own transaction (with the work it
        concludes, e.g. a method stored on its object): emit and audit it as :meth:`complete` would."""
        previous, self.state = self.state, State.COMPLETE.value
        self.env.active.pop(self.cycle_id, None)
        await self.emit("state", state=self.state, note=note or status, **{"from": previous})
        await self._transition(previous, status=status, note=note)
        await self._end(status, output)

    async def fail(self, reason: str) -> None:
        """FAILED in a transaction of its own; safe to call whatever state the cycle is in."""
        self.env.active.pop(self.cycle_id, None)
        if self.state is None:
            return  # the cycle was never created
        try:
            previous = await self.env.image.transact(records.mark_failed, self.cycle_id, reason)
        except Exception as e:  # the image is unreachable: recovery at the next start will fail it
            log.error("cycle %s: could not record FAILED (%s): %s", self.cycle_id, reason, e)
            return
        if previous is None:
            return
        failed_in = self.state
        self.state = State.FAILED.value
        await self.emit("state", state=self.state, note=reason, failed_in=failed_in, **{"from": previous})
        await self._transition(previous, status="FAILURE", note=reason)
        await self._end("FAILURE", None, error=reason, failed_in=failed_in)

    # -- timed service calls ------------------------------------------------------------------------
    @overload
    async def llm(self, call: Generate, *, stream: bool = False, audit_prompt: str = "") -> GenerateReply: ...

    @overload
    async def llm(self, call: Action, *, stream: bool = False, audit_prompt: str = "") -> ActionReply: ...

    async def llm(self, call: Generate | Action, *, stream: bool = False,
                  audit_prompt: str = "") -> GenerateReply | ActionReply:
        """An ``llm`` call, its time counted as LLM time, audited as LLM_CALL; tokens forwarded if streamed."""
        command = "generate" if isinstance(call, Generate) else "action"

        async def forward(event: dict[str, Any]) -> None:
            if event.get("event") == "token":
                if stream:
                    await self.emit("token", text=event.get("text", ""))
            elif event.get("event") == "retrying":  # the llm worker restarted: the step runs again, tokens so far void
                await self.emit("step_restarted", state=self.state, command=command, reason=event.get("message", ""))

        started = time.monotonic()
        prompt = (audit_prompt or _render_messages(call.messages))[:_PROMPT_AUDIT_CHARS]
        try:
            # one call for both kinds: the union's reply type is narrowed below
            ask = cast("Call[GenerateReply | ActionReply]", call)
            reply = await self.env.client.request(ask, on_event=forward, timeout=self.env.settings.llm_request_timeout)
        except ServiceError as e:
            await self._llm_call(call.persona, prompt, None, "FAILURE", command=command,
                                 error=f"{e.code}: {e.message}")
            raise
        finally:
            self.llm_s += time.monotonic() - started
            self.llm_calls += 1
        figures = {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                   "total_s": reply.total_s, "adapter": reply.adapter}
        if isinstance(reply, GenerateReply):
            await self._llm_call(call.persona, prompt, reply.text, "SUCCESS", command=command, **figures)
        else:
            await self._llm_call(call.persona, prompt, reply.raw, "SUCCESS" if reply.valid else "FAILURE",
                                 command=command, attempts=reply.attempts, valid=reply.valid, **figures)
        return reply

    async def _llm_call(self, persona: str, prompt: str, response: str | None, status: str, **data: Any) -> None:
        state = self.state or State.IDLE.value
        await self.record("LLM_CALL", lambda: AuditEvent.llm_call(
            self.cycle_id, state, persona=persona, prompt=prompt, response=response, status=status,
            mission_type=self.mission_type or None, **data))

    async def memory(self, command: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.env.client.call("memory", command, body, timeout=MEMORY_TIMEOUT)

    def timing(self) -> dict[str, Any]:
        total = time.monotonic() - self.started
        return {"total_s": round(total, 4), "llm_s": round(self.llm_s, 4), "llm_calls": self.llm_calls,
                "other_s": round(max(0.0, total - self.llm_s), 4),
                "other_share": round(max(0.0, total - self.llm_s) / total, 4) if total > 0 else 0.0}


def _create(root: Root, conn: Any, cycle_id: str, mission: dict[str, Any], mission_type: str, target_oid: str,
            persona: str, instance: str, parent_cycle: str | None) -> str:
    return records.create_cycle(root, conn, cycle_id=cycle_id, mission=mission, mission_type=mission_type,
                                target_oid=target_oid, persona=persona, instance=instance, parent_cycle=parent_cycle)


def _render_messages(messages: list[Message]) -> str:
    return "\n".join(f"[{m.role}] {m.content}" for m in messages)


Body = Callable[[CycleRun], Awaitable[dict[str, Any]]]
R = TypeVar("R", bound=Reply)


def typed(kind: type[R], body: dict[str, Any]) -> R:
    """A cycle's reply body as its contract type; a body outside it is the kernel's own bug (internal)."""
    try:
        return msgspec.convert(body, kind)
    except msgspec.ValidationError as e:
        raise ServiceError(ErrorCode.INTERNAL, f"the kernel's {kind.__name__} is outside its contract: {e}") from None


async def execute(run: CycleRun, body: Body) -> dict[str, Any]:
    """Run ``body`` as the cycle's work within its time budget; every way out but success ends in FAILED."""
    budget = run.env.settings.cycle_timeout
    timeout = asyncio.timeout(budget)
    try:
        async with timeout:
            await run.begin()
            reply = await body(run)
    except TimeoutError:
        if not timeout.expired():
            await _failed(run, ErrorCode.INTERNAL, "an internal operation timed out")
        await _failed(run, ErrorCode.TIMEOUT, f"cycle exceeded its time budget of {budget:g} s "
                                              f"(settings.cycle_timeout) in state {run.state}")
    except ServiceError as e:
        await _failed(run, e.code, e.message, e.details)
    except asyncio.CancelledError:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(run.fail("cancelled by the requester or by shutdown"))
        raise
    except Exception as e:  # a bug: the cycle still ends FAILED, and the requester learns what happened
        log.exception("cycle %s failed", run.cycle_id)
        await _failed(run, ErrorCode.INTERNAL, f"{type(e).__name__}: {e}")
    return {"cycle_id": run.cycle_id, "timing": run.timing(), **reply}


async def _failed(run: CycleRun, code: str, message: str, details: dict[str, Any] | None = None) -> None:
    """Record the failure, then raise it to the requester with the cycle's id and the state it failed in."""
    failed_in = run.state
    await run.fail(f"{code}: {message}")
    raise ServiceError(code, f"cycle {run.cycle_id} FAILED in {failed_in}: {message}",
                       {**(details or {}), "cycle_id": run.cycle_id, "failed_in": failed_in})
