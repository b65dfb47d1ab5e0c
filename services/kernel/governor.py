"""The kernel's use of the Token Governor (``batos.tokens.assemble_prompt_with_budget``, blueprint §3.3).

The Governor chooses what fits: the fixed sections (instructions, question), then ContextualSummary texts (the
big picture, at most SUMMARY_SHARE of the room), then the most relevant MemoryChunk texts, each whole or absent.
This module gives it the pieces as they will be sent (labelled blocks: ``[S1] file: summary``, ``[C1]
file:start-end`` + code), lays the chosen parts out under headings, and counts the final text once more: the
headings are reserved up front and the prompt is re-assembled with a larger reserve in the rare case joins
merged tokens, so the prompt is never over budget. Counts are cl100k, the unit of the whole Token Governor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from batos import tokens
from services.kernel.react import Evidence

SUMMARY_SHARE = 0.4  # of the room left after the fixed sections: code evidence always keeps most of it
SEPARATOR = "\n\n"
SUMMARIES_HEADING = "Overview (summaries):\n"
CHUNKS_HEADING = "Code:\n"
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


def chunk_block(e: Evidence) -> str:
    name = f" ({e.metadata.get('node_name')})" if e.metadata.get("node_name") else ""
    return f"[{e.label}] {e.where}{name}\n```python\n{e.text.rstrip()}\n```"


def _layout(system: str, question: str, summaries: str, chunks: str) -> str:
    parts = [p for p in (system, question) if p]
    if summaries:
        parts.append(SUMMARIES_HEADING + summaries)
    if chunks:
        parts.append(CHUNKS_HEADING + chunks)
    parts.append(FINAL_LINE)
    return SEPARATOR.join(parts)


def assemble(instruction: str, question: str, summaries: list[Evidence], chunks: list[Evidence], budget: int,
             *, extra: str = "") -> Assembled:
    system = SEPARATOR.join(p for p in (instruction, extra) if p)
    by_oid = {e.oid: e for e in (*summaries, *chunks)}
    reserve = tokens.count(_layout("", "", "x", "x")) + 2 * tokens.count(SEPARATOR)  # headings, joins, last line
    for _ in range(MAX_TRIES):
        chosen = tokens.assemble_prompt_with_budget(
            budget, system=system, question=f"Question: {question}",
            summaries=[tokens.Piece(e.oid, summary_block(e)) for e in summaries],
            chunks=[tokens.Piece(e.oid, chunk_block(e)) for e in chunks],
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
