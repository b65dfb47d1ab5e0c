"""SYNTHESIZING and VALIDATING for question cycles: the grounded prompt, the streamed answer, its verification.

SYNTHESIZING  every retrieved chunk is labelled E1, E2, ... in REASONING's order (best first); the Token Governor
              (governor.py) lays out instructions, the evidence that fits settings.answer_budget_tokens (each piece
              ``[E1] file:start-end (name)`` and its line-numbered code), the question and the fixed answer form
              ("Sources: [E1] / Answer: ...": labels first, which small models follow); per-section token counts
              go to the audit log as PROMPT_BUDGET. The persona (ROBIN by default) writes the answer through llm
              ``generate``, its tokens forwarded to the console as ``token`` events.
VALIDATING    :func:`validate` checks the answer against the evidence (grounding.py: cited labels exist, the code
              identifiers it names occur in the evidence it cites or the question, no repetition loop).
              A failed check gets ONE retry: the same prompt prefix with fewer pieces (the first RETRY_K and any it
              cited correctly) and a firmer instruction naming the failure. Then:
              SUCCESS           the answer passed: grounded. ``citations`` are the chunks it cited (best first),
                                ``also_retrieved`` the other chunks REASONING found; the answer ends with its
                                sources (``[E1] file:start-end (name)``).
              SUCCESS_DEGRADED  both attempts failed, or memory had no chunk: an extractive answer -- the best
                                chunks with file:lines, their signature and outline line, at most one generated
                                sentence (one that passed the identifier check) -- with the reason in ``reason``.
Genesis's meta-prompt (kind ``meta_prompt``) is not an answer: it is only checked for loops (:func:`finalize`).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from proto.bodies.llm import Generate, GenerateReply, Message
from services.kernel import degenerate, grounding
from services.kernel.react import Evidence, ReactResult, path_root
from services.kernel.run import CycleRun

# Each generated token costs ~0.1 CPU-second here (Qwen 0.5B): as much as ten prompt tokens.
ANSWER_TOKENS_CAP = 80  # Sources and Function lines, one or two sentences (measured: 56-63 tokens when it stops)
RETRY_TOKENS_CAP = 60  # the retry asks for one sentence
ANSWER_PIECES = 4  # evidence pieces an answer prompt holds at most: the model uses the first few, prefill is time
# Prose only (never code): a 135M model at temperature 0 falls into loops that a mild penalty breaks.
ANSWER_REPETITION_PENALTY = 1.1
# A small model goes on to invent the next prompt, or starts the form over for another piece ("\n\nSources: [E2]
# \nFunction: ..." after its answer: Qwen 0.5B, 50 of its 100 tokens on csv); the form's own Sources line is first.
STOP = ["\nQuestion:", "\nEvidence:", "\n\nSources:"]
RETRY_K = 2  # pieces of evidence a retry keeps (plus any the first answer cited correctly)
EXTRACT_K = ANSWER_PIECES  # an extractive answer shows the evidence the model was shown
SUCCESS = "SUCCESS"
DEGRADED = "SUCCESS_DEGRADED"

INSTRUCTIONS = {
    "answer": ("You answer a developer's question about a codebase using only the evidence below. Each piece of "
               "evidence is labelled [E1], [E2], ... with its file, lines and the name of its function or class, "
               "then its code."),
    "meta_prompt": ("Using the context below about BAT OS's own code, write a prompt for a second assistant. "
                    "The prompt must ask it to explain to the Architect what BAT OS is and how it works: "
                    "its processes, its object model, how a cognitive cycle reasons and how it improves "
                    "itself, naming the files that matter. Reply with the prompt only."),
}
# The Sources line comes FIRST: Qwen2.5-Coder-0.5B, asked for "Answer: ... [E1]\nSources: [E1]", wrote its
# prose and stopped (or ran out of tokens) before any label, 3 answers of 3 rejected as "cites no evidence label";
# asked for the labels first, it wrote them 3 of 3 (bench/RESULTS.md, 2026-12-06).
# The Function line comes next: told in prose to "name the function", the same model named its class or nothing
# (the gold named in its prose 0 of 5 on csv); given a line of the form for it, it copies the qualified name that
# the evidence header shows (bench/RESULTS.md, issue 16 section).
ASK = ("First write the labels of the evidence you use, then the name of the function that does it, as written "
       "after its label, then the answer in one or two sentences. Reply in this form:\n"
       "Sources: [E1]\nFunction: <name>\nAnswer: <the answer>")
FIRM = ("Your previous answer was rejected: {reason}. Use ONLY names that appear in the evidence above and do not "
        "invent any. First write the labels of the evidence you use, then the name of the function that does it, "
        "as written after its label, then one sentence. Reply in this form:\n"
        "Sources: [E1]\nFunction: <name>\nAnswer: <the answer>")


@dataclass
class Draft:
    text: str
    summaries: list[Evidence]
    chunks: list[Evidence]  # in the prompt
    budget: dict[str, Any]
    llm: dict[str, Any] = field(default_factory=dict)
    retrieved: list[Evidence] = field(default_factory=list)  # every chunk REASONING found, labelled E1..En
    question: str = ""
    extra: str = ""
    persona: str = "ROBIN"
    max_tokens: int = ANSWER_TOKENS_CAP


@dataclass
class Final:
    status: str
    answer: str
    citations: list[dict[str, Any]]
    notes: list[str]
    evidence: list[dict[str, Any]]
    model_text: str
    also_retrieved: list[dict[str, Any]] = field(default_factory=list)
    validation: list[dict[str, Any]] = field(default_factory=list)
    reason: str = ""
    rewritten: bool = False  # the answer is not the text the console saw streamed

    def reply(self) -> dict[str, Any]:
        out = {"status": self.status, "answer": self.answer, "citations": self.citations,
               "also_retrieved": self.also_retrieved, "notes": self.notes, "evidence": self.evidence,
               "validation": self.validation, "rewritten": self.rewritten, "model_text": self.model_text}
        if self.reason:
            out["reason"] = self.reason
        return out

    def record(self) -> dict[str, Any]:
        """What the cycle object keeps (the image holds the answer; the audit log holds the prompt)."""
        return {"status": self.status, "answer": self.answer, "citations": self.citations, "notes": self.notes,
                "also_retrieved": self.also_retrieved, "reason": self.reason}


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


def qualified_name(e: Evidence) -> str:
    """``Class.method`` as the chunk's metadata places it (enclosing scopes, then its own name)."""
    parents = [str(p) for p in e.metadata.get("parent_nodes") or [] if p]
    name = str(e.metadata.get("node_name") or "")
    return ".".join([*parents, name] if name else parents)


def evidence_block(e: Evidence, root: str = "") -> str:
    """One piece of an answer prompt: ``[E1] csv/csv.py:107-127 DictReader.__next__`` and its code.

    No line-number prefixes (they were 30-50% of the code's tokens with Qwen's tokenizer, and the answer cites
    labels, not lines); the qualified name in the header is the name the answer is asked to use."""
    path = e.file_path.removeprefix(root) if root else e.file_path
    where = f"{path}:{e.start_line}-{e.end_line}" if e.start_line is not None else (path or e.oid)
    name = qualified_name(e)
    return f"[{e.label}] {where}" + (f" {name}" if name else "") + f"\n```python\n{e.text.rstrip()}\n```"


def relabel(chunks: list[Evidence]) -> list[Evidence]:
    """Copies labelled E1..En in the given (best-first) order: the labels the answer prompt and reply use."""
    return [dataclasses.replace(e, label=f"E{i}") for i, e in enumerate(chunks, 1)]


# -- SYNTHESIZING -------------------------------------------------------------------------------------------


async def _generate(run: CycleRun, prompt: str, persona: str, max_tokens: int, kind: str) -> GenerateReply:
    return await run.llm(Generate(persona=persona, messages=[Message("user", prompt)], max_tokens=max_tokens,
                                  repetition_penalty=ANSWER_REPETITION_PENALTY,
                                  stop=list(STOP) if kind == "answer" else []), stream=True)


async def _assemble(run: CycleRun, question: str, summaries: list[Evidence], chunks: list[Evidence], *,
                    persona: str, kind: str, extra: str, ask: str, retrieved: list[Evidence] | None = None) -> Any:
    from services.kernel.governor import assemble, chunk_block

    budget = run.env.settings.answer_budget_tokens
    root = path_root(retrieved or chunks)
    render = (lambda e: evidence_block(e, root)) if kind == "answer" else chunk_block
    assembled = assemble(INSTRUCTIONS[kind], question, summaries, chunks, budget, extra=extra, ask=ask,
                         render=render)
    await run.audit("PROMPT_BUDGET", status="SUCCESS", persona=persona, budget_tokens=budget,
                    used_tokens=assembled.used_tokens, sections=assembled.sections,
                    summary_ids=[e.oid for e in assembled.summaries],
                    retrieved_chunk_ids=[e.oid for e in assembled.chunks], dropped=assembled.dropped)
    await run.emit("log", text=f"prompt: {assembled.used_tokens}/{budget} tokens, "
                               f"{len(assembled.summaries)} summaries, {len(assembled.chunks)} chunks"
                               + (f", {len(assembled.dropped)} left out" if assembled.dropped else ""))
    return assembled


async def write(run: CycleRun, question: str, evidence: ReactResult, *, persona: str, kind: str = "answer",
                extra: str = "", max_tokens: int | None = None) -> Draft:
    """SYNTHESIZING: label the evidence, assemble within budget, audit the budget, stream the persona's answer."""
    if max_tokens is None:
        max_tokens = run.env.settings.answer_max_tokens
        if kind == "answer":
            max_tokens = min(max_tokens, ANSWER_TOKENS_CAP)
    retrieved = relabel(evidence.chunks) if kind == "answer" else list(evidence.chunks)
    summaries = list(evidence.summaries) if kind != "answer" else []  # an answer's room goes to code
    draft = Draft("", [], [], {}, retrieved=retrieved, question=question, extra=extra, persona=persona,
                  max_tokens=max_tokens)
    if kind == "answer" and not retrieved:
        return draft  # nothing to ground an answer in: VALIDATING says so without asking the model
    pieces = retrieved[:ANSWER_PIECES] if kind == "answer" else retrieved
    assembled = await _assemble(run, question, summaries, pieces, persona=persona, kind=kind, extra=extra,
                                ask=ASK if kind == "answer" else "", retrieved=retrieved)
    reply = await _generate(run, assembled.prompt, persona, max_tokens, kind)
    draft.text = reply.text
    draft.summaries, draft.chunks = assembled.summaries, assembled.chunks
    draft.budget = {"budget_tokens": assembled.budget_tokens, "used_tokens": assembled.used_tokens,
                    "sections": assembled.sections}
    draft.llm = {"model": reply.model, "adapter": reply.adapter, "completion_tokens": reply.completion_tokens,
                 "tokens_per_s": reply.tokens_per_s}
    return draft


# -- VALIDATING ---------------------------------------------------------------------------------------------


def label_texts(chunks: list[Evidence]) -> dict[str, list[str]]:
    """What each label in a prompt stands for, as the identifier check reads it."""
    out = {}
    for e in chunks:
        meta = e.metadata
        names = [str(meta.get("node_name") or ""), *map(str, meta.get("parent_nodes") or []),
                 str(meta.get("context_header") or ""), e.file_path.replace("/", " ").replace(".", " ")]
        out[e.label] = [e.text, *names]
    return out


_ANSWER_PREFIX = re.compile(r"^\s*(?:\**answer\**\s*:\**\s*)", re.I)
_LEADING_SOURCES = re.compile(r"^\s*\**sources?\**\s*:\**[^\n]*\n", re.I)  # the form asks for it first
_SOURCES = re.compile(r"^\s*\**sources?\**\s*:.*$", re.I | re.M | re.S)
_FUNCTION_LINE = re.compile(r"^\s*\**function\**\s*:\**[ \t]*([^\n]*)(?:\n|$)", re.I)  # the form's second line


def clean(text: str) -> str:
    """The model's prose: its Sources line(s) (first, as asked, or after the answer) and its 'Answer:' prefix
    removed (the reply lists the sources); its ``Function:`` line leads the answer as `` `name`: ``."""
    body = _LEADING_SOURCES.sub("", text.strip() + "\n", count=1).strip()
    m = _FUNCTION_LINE.match(body)
    name = ""
    if m:  # the name, without the path and lines a small model sometimes copies from the header with it
        words = m.group(1).replace("`", " ").replace("*", " ").split()
        name, body = (words[-1] if words else ""), body[m.end():]
        name = "" if "/" in name or name.endswith(".py") or ":" in name else name
    body = finished(_SOURCES.sub("", _ANSWER_PREFIX.sub("", body.strip())).strip())
    return f"`{name}`: {body}" if name and body else f"`{name}`" if name else body


def finished(text: str) -> str:
    """The text up to its last full sentence when it stops mid-sentence (the token cap cut it: "... which is")."""
    if not text or text[-1] in ".!?`)\"'":
        return text
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s)", text)]
    return text[: ends[-1]] if ends else text


def first_sentence(text: str) -> str:
    body = grounding._LABEL.sub("", clean(text))
    m = re.match(r"(.+?[.!?])(?:\s|$)", " ".join(body.split()))
    return (m.group(1) if m else " ".join(body.split()))[:300].strip()


async def validate(run: CycleRun, draft: Draft, result: ReactResult, *, kind: str = "answer") -> Final:
    """VALIDATING: check, retry once with narrower evidence and a firmer instruction, else answer extractively."""
    if kind != "answer":
        return finalize(draft, result)
    notes = [f"reasoning fell back: {result.fallback}"] if result.fallback else []
    if not draft.retrieved:
        notes.append("memory returned no code chunks (has anything been ingested?): nothing to ground an answer in")
        return Final(DEGRADED, "Nothing in memory matches the question; has the code been ingested?", [], notes,
                     [e.brief() for e in result.summaries], draft.text, reason="no code chunks retrieved",
                     rewritten=True)
    attempts: list[tuple[str, list[Evidence], grounding.Verdict]] = []
    verdict = grounding.check(draft.text, label_texts(draft.chunks), draft.question)
    attempts.append((draft.text, draft.chunks, verdict))
    if not verdict.ok:
        chunks = narrower(draft.chunks, verdict.cited)
        await run.emit("log", text=f"answer rejected ({verdict.reason}); one retry with {len(chunks)} piece(s) "
                                   f"of evidence")
        await run.audit("ANSWER_REJECTED", status="FAILURE", persona=draft.persona, reason=verdict.reason,
                        checks=verdict.record(), attempt=1)
        assembled = await _assemble(run, draft.question, [], chunks, persona=draft.persona, kind=kind,
                                    extra=draft.extra, ask=FIRM.format(reason=verdict.reason),
                                    retrieved=draft.retrieved)
        reply = await _generate(run, assembled.prompt, draft.persona, min(draft.max_tokens, RETRY_TOKENS_CAP), kind)
        text = reply.text
        verdict = grounding.check(text, label_texts(assembled.chunks), draft.question)
        attempts.append((text, assembled.chunks, verdict))
    checks = [{"attempt": i, **c} for i, (_, _, v) in enumerate(attempts, 1) for c in v.record()]
    text, shown, verdict = attempts[-1]
    if verdict.ok:
        by_label = {e.label: e for e in shown}
        used = sorted((by_label[c] for c in verdict.cited), key=lambda e: int(e.label[1:]))
        citations = [citation(e) for e in used]
        also = [citation(e) for e in draft.retrieved if e.label not in verdict.cited]
        answer = f"{clean(text)}\n\n{sources_footer(citations)}"
        return Final(SUCCESS, answer, citations, notes, _briefs(result, draft), text, also, checks,
                     rewritten=len(attempts) > 1)
    reason = "; ".join(f"attempt {i}: {v.reason}" for i, (_, _, v) in enumerate(attempts, 1))
    await run.audit("ANSWER_REJECTED", status="FAILURE", persona=draft.persona, reason=verdict.reason,
                    checks=verdict.record(), attempt=len(attempts))
    notes.append(f"the model's answer was not grounded ({reason}): replying with the evidence itself")
    return extractive(draft, result, attempts, reason, notes, checks)


def narrower(chunks: list[Evidence], cited: list[str]) -> list[Evidence]:
    """The first RETRY_K pieces (the prompt's prefix stays the same) and any other piece cited correctly."""
    return [e for i, e in enumerate(chunks) if i < RETRY_K or e.label in cited]


def _briefs(result: ReactResult, draft: Draft) -> list[dict[str, Any]]:
    return [e.brief() for e in (*result.summaries, *draft.retrieved)]


def signature(e: Evidence) -> str:
    """The chunk's first def/class line, else the innermost one of its header (a later piece), else its name."""
    def headers(text: str) -> list[str]:
        return [s.strip().rstrip(":").strip() for s in text.splitlines()
                if s.strip().startswith(("def ", "async def ", "class "))]

    own, outer = headers(e.text), headers(str(e.metadata.get("context_header") or ""))
    return own[0] if own else outer[-1] if outer else str(e.metadata.get("node_name") or "")


def outline_line(e: Evidence, summaries: list[Evidence]) -> str:
    """The line of its file's (or class's) outline summary that mentions the chunk's definition."""
    name = str(e.metadata.get("node_name") or "")
    if not name:
        return ""
    for s in summaries:
        if s.oid != e.summary_oid and s.file_path != e.file_path:
            continue
        for line in s.text.splitlines():
            if re.search(rf"\b{re.escape(name)}\b", line):
                return " ".join(line.split())[:200]
    return ""


def extractive(draft: Draft, result: ReactResult, attempts: list[tuple[str, list[Evidence], grounding.Verdict]],
               reason: str, notes: list[str], checks: list[dict[str, Any]]) -> Final:
    best = draft.retrieved[:EXTRACT_K]
    lines = ["The model's answer could not be verified against the evidence, so here are the places in the code "
             "that best match the question:"]
    for e in best:
        sig, outline = signature(e), outline_line(e, result.summaries)
        lines.append(f"[{e.label}] {e.where}" + (f"  {sig}" if sig else "") + (f"\n      {outline}" if outline else ""))
    sentence = usable_sentence(attempts, draft.question)
    if sentence:
        lines.append(f"Model's summary: {sentence}")
    citations = [citation(e) for e in best]
    also = [citation(e) for e in draft.retrieved[EXTRACT_K:]]
    return Final(DEGRADED, "\n".join(lines), citations, notes, _briefs(result, draft), attempts[-1][0], also, checks,
                 reason=reason, rewritten=True)


def usable_sentence(attempts: list[tuple[str, list[Evidence], grounding.Verdict]], question: str) -> str:
    """At most one generated sentence: the first one that is no loop and names nothing outside its evidence."""
    for text, shown, _ in reversed(attempts):
        sentence = first_sentence(text)
        if len(sentence.split()) < 4 or not grounding.identifiers(sentence):
            continue  # a sentence worth showing names the code it is about
        texts = label_texts(shown)
        verdict = grounding.check(sentence + " [" + ", ".join(texts) + "]", texts, question)
        if verdict.ok:
            return sentence
    return ""


def finalize(draft: Draft, result: ReactResult) -> Final:
    """Genesis's meta-prompt: SUCCESS, or SUCCESS_DEGRADED with the evidence when the text is a loop."""
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
        return Final(DEGRADED, "\n\n".join(parts), citations, notes, evidence, draft.text, reason=verdict.reason,
                     rewritten=True)
    answer = draft.text.strip()
    status = SUCCESS
    if not citations:
        status = DEGRADED
        notes.append("memory returned no code chunks (has anything been ingested?): the answer is not grounded")
    else:
        answer = f"{answer}\n\n{sources_footer(citations)}"
    return Final(status, answer, citations, notes, evidence, draft.text)
