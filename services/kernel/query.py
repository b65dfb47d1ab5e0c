"""The question cycle (`ask`, mission type ``query``): IDLE -> DECOMPOSING -> REASONING -> SYNTHESIZING ->
VALIDATING -> COMPLETE, each state's work in one place.

DECOMPOSING checks the target object (an unknown OID is a clear error; a UvmObject target adds a brief of its
slots to the answer prompt, so `ask` can be about one object); REASONING is react.reason (one transaction);
SYNTHESIZING and VALIDATING are answer.write and answer.validate (which may retry the answer once, then reply
extractively).
"""

from __future__ import annotations

from typing import Any

from batos.errors import ServiceError
from batos.uvm import UvmObject, oid_hex, prototype_of
from proto import ErrorCode
from proto.bodies import kernel as K
from services.kernel import answer
from services.kernel import cycle as records
from services.kernel.psm import State
from services.kernel.react import reason
from services.kernel.run import CycleRun, execute, typed

SLOT_PREVIEW_CHARS = 80


def target_brief(root: Any, conn: Any, target_oid: str) -> str:
    """A few lines about the target object for the prompt ('' for the root); KeyError for an unknown OID."""
    obj = records.resolve_target(root, conn, target_oid)
    if not isinstance(obj, UvmObject):
        return ""
    slots = ", ".join(f"{k}={_preview(v)}" for k, v in sorted(obj.own_slots().items())[:12])
    methods = ", ".join(obj.method_names()) or "none"
    return (f"Target object {oid_hex(obj)} ({prototype_of(obj, root['prototypes']) or obj.uvm_name}): "
            f"slots {slots or 'none'}; methods {methods}")


def _preview(value: Any) -> str:
    text = repr(value) if not isinstance(value, UvmObject) else f"<object {oid_hex(value)}>"
    return text if len(text) <= SLOT_PREVIEW_CHARS else text[:SLOT_PREVIEW_CHARS] + "..."


async def decompose(run: CycleRun, question: str) -> str:
    await run.to(State.DECOMPOSING, f"question of {len(question)} characters")
    try:
        return await run.env.image.read(target_brief, run.target_oid)
    except KeyError as e:
        raise ServiceError(ErrorCode.NOT_FOUND, str(e).strip("\"'")) from None


async def run_query(run: CycleRun, question: str, *, persona: str = "ROBIN", kind: str = "answer") -> dict[str, Any]:
    """The whole question cycle on an already-begun CycleRun; returns the reply body."""
    brief = await decompose(run, question)
    await run.to(State.REASONING)
    evidence = await reason(run, question, max_steps=run.env.settings.react_max_steps)
    await run.to(State.SYNTHESIZING, f"{len(evidence.summaries)} summaries, {len(evidence.chunks)} chunks; "
                                     f"{evidence.stop}")
    draft = await answer.write(run, question, evidence, persona=persona, kind=kind, extra=brief)
    await run.to(State.VALIDATING)
    final = await answer.validate(run, draft, evidence, kind=kind)
    await run.complete(final.status, final.record(), output=final.answer)
    # model_text: the model's own words, sources apart (genesis cycle 1 uses it as the next cycle's prompt)
    return {**final.reply(), "steps": evidence.steps, "thoughts": evidence.thoughts, "stop": evidence.stop,
            "fallback": evidence.fallback, "persona": persona, "query_morph": evidence.morph_oid,
            "prompt_budget": draft.budget}


async def answered(run: CycleRun, question: str, *, persona: str = "ROBIN", kind: str = "answer") -> K.AnswerReply:
    """The question cycle run as a whole cycle (run.execute: begun, within its time budget, FAILED on any error),
    answered in its contract type: `ask`, and each of genesis's two cycles."""
    return typed(K.AnswerReply, await execute(run, lambda r: run_query(r, question, persona=persona, kind=kind)))
