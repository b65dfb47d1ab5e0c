"""`display_yourself`: the Two-Cycle Genesis Protocol (blueprint §3.3).

Cycle 1 (mission ``genesis_plan``, BRICK) reasons over the system's own ingested code and writes a meta-prompt:
the plan for cycle 2. Cycle 2 (mission ``genesis_display``, ROBIN) carries that prompt out, with its own ReAct
retrieval, and answers the Architect. Cycle 2's ``parent_cycle`` slot holds cycle 1's id (and cycle 1's
``child_cycles`` holds cycle 2's); both ids are in the reply, and each cycle's events carry its own id.

Stated fallback: when cycle 1's meta-prompt is unusable (empty or a repetition loop; cycle 1 then ends
SUCCESS_DEGRADED), cycle 2 is given a template meta-prompt built from the summaries cycle 1 retrieved, so the
second cycle still runs on what the first one found.
"""

from __future__ import annotations

from typing import Any

from proto.bodies import kernel as K
from services.kernel import degenerate
from services.kernel.env import Emit, KernelEnv
from services.kernel.query import answered
from services.kernel.run import CycleRun

PLAN_QUESTION = ("How is BAT OS built? Find the files that define its processes, its object model (UvmObject), "
                 "its cognitive cycle and its self-improvement, and plan how to explain them.")
META_PROMPT_MAX_CHARS = 1500


def template_meta_prompt(evidence: list[dict[str, Any]]) -> str:
    """Cycle 2's prompt from the files cycle 1's evidence came from."""
    files = []
    for e in evidence:
        where = str(e.get("where", "")).split(":")[0]
        if where and where not in files:
            files.append(where)
    listing = ", ".join(files[:8]) or "the ingested source files"
    return ("Explain to the Architect what BAT OS is and how it works: its processes, its persistent object "
            f"model, how a cognitive cycle reasons over memory, and how it improves itself. Use {listing}.")


def meta_prompt_of(plan: K.AnswerReply) -> tuple[str, str | None]:
    """(the prompt for cycle 2, the fallback note or None)."""
    text = " ".join(plan.model_text.split())
    verdict = degenerate.check(text)
    if plan.status != K.Status.SUCCESS or verdict.degenerate or len(text.split()) < 5:
        reason = verdict.reason or "cycle 1 did not produce a usable meta-prompt"
        return template_meta_prompt(plan.evidence), f"{reason}; cycle 2 uses a template meta-prompt"
    return text[:META_PROMPT_MAX_CHARS], None


async def display_yourself(env: KernelEnv, emit: Emit, mission: dict[str, Any],
                           target_oid: str = "0") -> K.DisplayReply:
    plan_run = CycleRun(env, emit, mission_type="genesis_plan", mission=mission, target_oid=target_oid,
                        persona="BRICK")
    plan = await answered(plan_run, PLAN_QUESTION, persona="BRICK", kind="meta_prompt")
    meta_prompt, note = meta_prompt_of(plan)
    if note:
        await emit("log", cycle_id=plan_run.cycle_id, text=f"FALLBACK: {note}")
    await emit("log", cycle_id=plan_run.cycle_id, text=f"meta-prompt for cycle 2: {meta_prompt}")
    display_run = CycleRun(env, emit, mission_type="genesis_display", mission={**mission, "meta_prompt": meta_prompt},
                           target_oid=target_oid, persona="ROBIN", parent_cycle=plan_run.cycle_id)
    shown = await answered(display_run, meta_prompt, persona="ROBIN")
    return K.DisplayReply(
        cycle_id=display_run.cycle_id, cycle_ids=[plan_run.cycle_id, display_run.cycle_id],
        plan_cycle_id=plan_run.cycle_id, parent_cycle=plan_run.cycle_id, meta_prompt=meta_prompt,
        plan_status=plan.status, status=shown.status, answer=shown.answer, citations=shown.citations,
        notes=[*(n for n in [note] if n), *shown.notes], timing={"plan": plan.timing, "display": shown.timing})
