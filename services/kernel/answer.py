"""SYNTHESIZING and VALIDATING for question cycles: the budgeted prompt, the streamed answer, its check.

SYNTHESIZING  the Token Governor (``batos.tokens``) assembles the prompt within settings.answer_budget_tokens:
              summaries first (the big picture), then the most relevant chunks; the per-section token counts go
              to the audit log as PROMPT_BUDGET. The persona (ROBIN by default) writes the answer through llm
              ``generate``; its tokens are forwarded to the console as ``token`` events.
VALIDATING    :func:`finalize` decides the cycle's status:
              SUCCESS           a usable answer grounded in retrieved chunks. The reply's ``citations`` list every
                                chunk in the prompt (``file:start-end``), and the answer ends with that list, so
                                every chunk used is cited whether or not a small model wrote the labels itself.
              SUCCESS_DEGRADED  the model's answer was empty or a repetition loop (see degenerate.py): the reply
                                is a note saying so, any usable opening of the answer, and the evidence list
                                (summaries and chunks with file:lines) -- the retrieval still answers the
                                Architect. Also when memory gave no chunk at all (the answer is then ungrounded).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from services.kernel import degenerate
from services.kernel.react import Evidence, ReactResult
from services.kernel.run import CycleRun

ANSWER_MAX_TOKENS = 320  # ~25 s of a 135M model on 2 cores; enough for a paragraph and a list
# Prose only (never code): a 135M model at temperature 0 falls into loops that a mild penalty breaks.
ANSWER_REPETITION_PENALTY = 1.1
SUCCESS = "SUCCESS"
DEGRADED = "SUCCESS_DEGRADED"

INSTRUCTIONS = {
    "answer": ("Answer the question using the context below. Cite the code you rely on by its label, "
               "for example [C1]. If the context does not contain the answer, say so."),
    "meta_prompt": ("Using the context below about BAT OS's own code, write a prompt for a second assistant. "
                    "The prompt must ask it to explain to the Architect what BAT OS is and how it works: "
                    "its processes, its object model, how a cognitive cycle reasons and how it improves "
                    "itself, naming the files that matter. Reply with the prompt only."),
}


@dataclass
class Draft:
    text: str
    summaries: list[Evidence]
    chunks: list[Evidence]
    budget: dict[str, Any]
    llm: dict[str, Any] = field(default_factory=dict)


@dataclass
class Final:
    status: str
    answer: str
    citations: list[dict[str, Any]]
    notes: list[str]
    evidence: list[dict[str, Any]]
    model_text: str

    def reply(self) -> dict[str, Any]:
        return {"status": self.status, "answer": self.answer, "citations": self.citations, "notes": self.notes,
                "evidence": self.evidence}

    def record(self) -> dict[str, Any]:
        """What the cycle object keeps (the image holds the answer; the audit log holds the prompt)."""
        return {"status": self.status, "answer": self.answer, "citations": self.citations, "notes": self.notes}


def citation(e: Evidence) -> dict[str, Any]:
    return {"label": e.label, "oid": e.oid, "file_path": e.file_path, "start_line": e.start_line,
            "end_line": e.end_line, "node_name": e.metadata.get("node_name", ""), "where": e.where}


def sources_footer(citations: list[dict[str, Any]]) -> str:
    return "Sources:\n" + "\n".join(f"[{c['label']}] {c['where']}" + (f" ({c['node_name']})" if c["node_name"] else "")
                                    for c in citations)


def evidence_list(summaries: list[Evidence], chunks: list[Evidence]) -> str:
    lines = [f"[{e.label}] {e.file_path or e.oid}: {' '.join(e.text.split())[:160]}" for e in summaries]
    lines += [f"[{e.label}] {e.where}" + (f" {e.metadata.get('node_name')}" if e.metadata.get("node_name") else "")
              for e in chunks]
    return "\n".join(lines) if lines else "(nothing was retrieved)"


async def write(run: CycleRun, question: str, evidence: ReactResult, *, persona: str, kind: str = "answer",
                extra: str = "", max_tokens: int | None = None) -> Draft:
    """SYNTHESIZING: assemble within budget, audit the budget, stream the persona's answer."""
    from services.kernel.governor import assemble

    budget = run.env.settings.answer_budget_tokens
    if max_tokens is None:
        max_tokens = int(run.env.setting("answer_max_tokens", ANSWER_MAX_TOKENS))
    assembled = assemble(INSTRUCTIONS[kind], question, evidence.summaries, evidence.chunks, budget, extra=extra)
    await run.audit("PROMPT_BUDGET", status="SUCCESS", persona=persona, budget_tokens=budget,
                    used_tokens=assembled.used_tokens, sections=assembled.sections,
                    summary_ids=[e.oid for e in assembled.summaries],
                    retrieved_chunk_ids=[e.oid for e in assembled.chunks], dropped=assembled.dropped)
    await run.emit("log", text=f"prompt: {assembled.used_tokens}/{budget} tokens, "
                               f"{len(assembled.summaries)} summaries, {len(assembled.chunks)} chunks"
                               + (f", {len(assembled.dropped)} left out" if assembled.dropped else ""))
    reply = await run.llm("generate", {"messages": [{"role": "user", "content": assembled.prompt}],
                                       "max_tokens": max_tokens, "temperature": 0.0,
                                       "repetition_penalty": ANSWER_REPETITION_PENALTY},
                          persona=persona, stream=True)
    return Draft(str(reply.get("text") or ""), assembled.summaries, assembled.chunks,
                 {"budget_tokens": budget, "used_tokens": assembled.used_tokens, "sections": assembled.sections},
                 {k: reply.get(k) for k in ("model", "adapter", "completion_tokens", "tokens_per_s")})


def finalize(draft: Draft, result: ReactResult) -> Final:
    """VALIDATING: SUCCESS, or SUCCESS_DEGRADED with the stated degraded reply."""
    citations = [citation(e) for e in draft.chunks]
    evidence = [e.brief() for e in (*draft.summaries, *draft.chunks)]
    notes: list[str] = []
    if result.fallback:
        notes.append(f"reasoning fell back: {result.fallback}")
    verdict = degenerate.check(draft.text)
    if verdict.degenerate:
        notes.append(f"{verdict.reason}; replying with the retrieved evidence instead")
        parts = [f"Note: {verdict.reason}, so here is the evidence retrieved for the question."]
        if verdict.prefix:
            parts.append(f"The answer began: {verdict.prefix} [...]")
        parts.append(evidence_list(draft.summaries, draft.chunks))
        return Final(DEGRADED, "\n\n".join(parts), citations, notes, evidence, draft.text)
    answer = draft.text.strip()
    status = SUCCESS
    if not citations:
        status = DEGRADED
        notes.append("memory returned no code chunks (has anything been ingested?): the answer is not grounded")
    else:
        answer = f"{answer}\n\n{sources_footer(citations)}"
    return Final(status, answer, citations, notes, evidence, draft.text)
