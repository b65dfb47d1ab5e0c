"""The kernel's use of the Token Governor (``batos.tokens.assemble_prompt_with_budget``, blueprint §3.3).

The Governor chooses what fits: the fixed sections (instructions, question), then ContextualSummary texts (the
big picture, at most SUMMARY_SHARE of the room), then the most relevant MemoryChunk texts, each whole or absent.
This module gives it the pieces as they will be sent (labelled blocks: ``[S1] file: summary``, ``[E1]
file:start-end (name)`` + the code with its line numbers), lays the chosen parts out under headings, and counts
the final text once more: the
headings are reserved up front and the prompt is re-assembled with a larger reserve in the rare case joins
merged tokens, so the prompt is never over budget. Counts are cl100k, the unit of the whole Token Governor.

Layout, fixed so that the prompts of one cycle share their longest possible prefix (a GGUF runtime reuses the KV
cache of an identical prefix): instructions, evidence (best first), then the question and the per-call request
(``ask``: the answer form, or a retry's firmer instruction), then ``Answer:``. A retry with fewer pieces keeps
the first pieces and their labels, so everything up to the first piece it leaves out is reused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from batos import tokens
from services.kernel.react import Evidence

SUMMARY_SHARE = 0.4  # of the room left after the fixed sections: code evidence always keeps most of it
SEPARATOR = "\n\n"
SUMMARIES_HEADING = "Overview (summaries):\n"
CHUNKS_HEADING = "Evidence:\n"
FINAL_LINE = "Answer:"
MAX_TRIES = 4

count_tokens = tokens.count


@dataclass
class Assembled:
    prompt: str
    summaries: list[Evidence]
    chunks: list[Evidence]
    sections: dict[str, int]
    used_tokens: int
    budget_tokens: int
    dropped: list[str] = field(default_factory=list)
    cut: list[str] = field(default_factory=list)


def summary_block(e: Evidence) -> str:
    return f"[{e.label}] {e.file_path or e.oid}: {' '.join(e.text.split())}"


def numbered(text: str, start: int | None) -> str:
    """The excerpt with its file line numbers, so an answer (and a reader) can point at lines."""
    lines = text.rstrip().splitlines()
    if start is None:
        return "\n".join(lines)
    return "\n".join(f"{start + i}| {line}" for i, line in enumerate(lines))


def chunk_block(e: Evidence) -> str:
    name = f" ({e.metadata.get('node_name')})" if e.metadata.get("node_name") else ""
    return f"[{e.label}] {e.where}{name}\n```python\n{numbered(e.text, e.start_line)}\n```"


def _layout(system: str, question: str, summaries: str, chunks: str) -> str:
    parts = [p for p in (system,) if p]
    if summaries:
        parts.append(SUMMARIES_HEADING + summaries)
    if chunks:
        parts.append(CHUNKS_HEADING + chunks)
    if question:
        parts.append(question)
    parts.append(FINAL_LINE)
    return SEPARATOR.join(parts)


def assemble(instruction: str, question: str, summaries: list[Evidence], chunks: list[Evidence], budget: int,
             *, extra: str = "", ask: str = "", render: Callable[[Evidence], str] = chunk_block) -> Assembled:
    """``ask``: the request after the question (the answer's form); it belongs to the question's fixed section.
    ``render``: how a chunk is laid out (answer.py renders its own, shorter evidence blocks)."""
    system = SEPARATOR.join(p for p in (instruction, extra) if p)
    question_part = f"Question: {question}" + (f"{SEPARATOR}{ask}" if ask else "")
    by_oid = {e.oid: e for e in (*summaries, *chunks)}
    reserve = tokens.count(_layout("", "", "x", "x")) + 2 * tokens.count(SEPARATOR)  # headings, joins, last line
    for _ in range(MAX_TRIES):
        chosen = tokens.assemble_prompt_with_budget(
            budget, system=system, question=question_part,
            summaries=[tokens.Piece(e.oid, summary_block(e)) for e in summaries],
            chunks=[tokens.Piece(e.oid, render(e)) for e in chunks],
            reserve=min(reserve, budget), summary_share=SUMMARY_SHARE, separator="\n")
        prompt = _layout(chosen.system, chosen.question, chosen.summaries_text, chosen.chunks_text)
        used = tokens.count(prompt)
        if used <= budget:
            break
        reserve += used - budget + 1  # a join merged tokens the wrong way: keep more back and choose again
    else:  # pathological: nothing but the (cut) fixed sections
        prompt = tokens.truncate_to(prompt, budget)
        used = tokens.count(prompt)
    s_taken = [by_oid[oid] for oid in chosen.included_summary_oids]
    c_taken = [by_oid[oid] for oid in chosen.included_oids]
    sections = {**{k: v for k, v in chosen.accounting.items() if k != "budget"}, "total": used}
    sections["layout"] = used - chosen.accounting["total"]
    dropped = [by_oid[oid].label for oid in chosen.dropped_oids if oid in by_oid]
    return Assembled(prompt, s_taken, c_taken, sections, used, budget, dropped, list(chosen.truncated))
