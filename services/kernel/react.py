"""REASONING: the QueryMorph's ReAct loop (Thought -> Action -> Observation) over hierarchical memory.

Blueprint §3.1-3.3. The loop runs inside ONE image session (a transaction spanning its awaits): the QueryMorph
is created there, each step updates its ``refined_query`` (PersistentMapping), ``retrieved_context``
(PersistentList of the retrieved MemoryChunk / ContextualSummary / ContextFractal objects themselves) and
``reasoning_log``, and the caller commits once at the end or aborts on any failure, so nothing partial remains.

Thought  BABS is asked (llm ``action``, constrained JSON) for {thought, action, query, summary_ids}.
Action   memory ``search``: level-1 summaries first; ``zoom`` searches ``within`` the child chunks of the
         summaries the thought chose (and may zoom again into other summaries on later steps).
Observe  the hits join the QueryMorph's context; the next thought sees them.

Policy, stated because a 135M model will often steer badly:
- step 1 always searches summaries (the blueprint's "Initial Retrieval (Level 1)") whatever the thought said;
- ``zoom`` with no usable summary ids zooms into the two best-scoring summaries;
- ``answer`` before any chunk was found zooms into the best summaries instead of stopping;
- unparseable output (``valid`` False) ends the loop with the FALLBACK: search chunks with the original question
  (and summaries, if none were found yet). It is logged in the reasoning log, emitted and audited;
- after react_max_steps, if no chunk was found, the same final zoom runs, so the answer has evidence.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from persistent.list import PersistentList
from persistent.mapping import PersistentMapping
from ZODB.POSException import ConflictError

from batos.uvm import oid_hex, resolve_oid
from services.kernel import cycle as records
from services.kernel.run import CycleRun

log = logging.getLogger("batos.kernel.react")

SUMMARY_K = 4  # level-1 hits: enough to orient, few enough for a small model to read
CHUNK_K = 6  # level-2 hits per search; the Token Governor trims to the answer budget later
ZOOM_DEFAULT = 2  # summaries zoomed into when the thought names none usable
THOUGHT_MAX_TOKENS = 160  # room for a bounded JSON object; xgrammar ends strings within the schema
PREVIEW_CHARS = 220  # per summary in the thought prompt
QUERY_MAX_CHARS = 400

ACTIONS = {
    "search_summaries": "search file and class summaries for an overview (set query)",
    "zoom": "read the code chunks inside the summaries named in summary_ids, e.g. [\"S1\"] (set query)",
    "search_chunks": "search all code chunks directly (set query)",
    "answer": "the code chunks found are enough to answer the question; stop searching",
}


@dataclass
class Evidence:
    label: str  # S1, C2, F3: how prompts and events name it
    oid: str
    level: str  # summary | chunk | fractal
    score: float
    text: str
    metadata: dict[str, Any]
    token_count: int
    summary_oid: str | None
    child_oids: list[str]
    step: int

    @property
    def file_path(self) -> str:
        return str(self.metadata.get("file_path", ""))

    @property
    def start_line(self) -> int | None:
        return self.metadata.get("start_line")

    @property
    def end_line(self) -> int | None:
        return self.metadata.get("end_line")

    @property
    def where(self) -> str:
        if self.start_line is not None and self.end_line is not None:
            return f"{self.file_path}:{self.start_line}-{self.end_line}"
        return self.file_path or self.oid

    def brief(self) -> dict[str, Any]:
        return {"label": self.label, "oid": self.oid, "level": self.level, "score": round(self.score, 4),
                "where": self.where, "name": self.metadata.get("node_name", "")}


@dataclass
class Plan:
    kind: str  # search_summaries | zoom | search_chunks
    query: str
    level: str
    within: list[str] = field(default_factory=list)
    note: str = ""


@dataclass
class ReactResult:
    morph_oid: str
    summaries: list[Evidence]
    chunks: list[Evidence]
    steps: int
    fallback: str | None
    log: list[str]


class ReactLoop:
    def __init__(self, run: CycleRun, session: Any, question: str, *, max_steps: int, persona: str = "BABS"):
        self.run = run
        self.session = session
        self.question = question
        self.max_steps = max(1, max_steps)
        self.persona = persona
        self.morph_oid = ""
        self.evidence: dict[str, Evidence] = {}  # oid -> best hit
        self.log: list[str] = []
        self.fallback: str | None = None
        self._labels = {"summary": 0, "chunk": 0, "fractal": 0}

    # -- views ----------------------------------------------------------------------------------
    def summaries(self) -> list[Evidence]:
        return sorted((e for e in self.evidence.values() if e.level == "summary"), key=lambda e: -e.score)

    def chunks(self) -> list[Evidence]:
        return sorted((e for e in self.evidence.values() if e.level != "summary"), key=lambda e: -e.score)

    # -- the loop -------------------------------------------------------------------------------
    async def run_loop(self) -> ReactResult:
        self.morph_oid = await self.session.run(_open_morph, self.run.cycle_id, self.question)
        steps = 0
        for step in range(1, self.max_steps + 1):
            steps = step
            thought = await self.think(step)
            if thought is None:
                await self.apply_fallback(step)
                break
            plan = self.plan(step, thought)
            if plan is None:
                break
            await self.act(step, plan, thought.get("thought", ""))
        if self.fallback is None and not self.chunks():
            await self.final_zoom(steps + 1)
        return ReactResult(self.morph_oid, self.summaries(), self.chunks(), steps, self.fallback, self.log)

    async def think(self, step: int) -> dict[str, Any] | None:
        messages = [{"role": "user", "content": self.thought_prompt(step)}]
        reply = await self.run.llm("action", {"messages": messages, "actions": ACTIONS,
                                              "max_tokens": THOUGHT_MAX_TOKENS}, persona=self.persona)
        action = reply.get("action") if reply.get("valid") else None
        if not isinstance(action, dict) or action.get("action") not in ACTIONS:
            raw = str(reply.get("raw", ""))[:300]
            self.fallback = (f"step {step}: the model's output could not be used as an action "
                             f"(valid={reply.get('valid')}, attempts={reply.get('attempts')}): {raw!r}")
            return None
        text = str(action.get("thought", "")).strip()
        await self.run.emit("thought", step=step, text=text, action=action.get("action"),
                            query=action.get("query", ""), summary_ids=action.get("summary_ids", []))
        return action

    def plan(self, step: int, thought: dict[str, Any]) -> Plan | None:
        """Turn a thought into an Action under the stated policy; None means: stop, enough evidence."""
        name = thought["action"]
        query = _clean_query(thought.get("query"), self.question)
        if step == 1 or (not self.summaries() and name == "zoom"):
            note = "" if name == "search_summaries" else f"thought chose {name}; step 1 reads summaries first"
            return Plan("search_summaries", query, "summaries", note=note)
        if name == "answer":
            if self.chunks():
                return None
            return self._zoom_plan(self._top_summaries(), self.question, "answer chosen before any chunk was read")
        if name == "zoom":
            chosen = self._resolve_summary_ids(thought.get("summary_ids"))
            note = "" if chosen else f"no usable summary_ids in {thought.get('summary_ids')!r}: zooming into the best"
            return self._zoom_plan(chosen or self._top_summaries(), query, note)
        if name == "search_summaries":
            return Plan("search_summaries", query, "summaries")
        return Plan("search_chunks", query, "chunks")

    def _zoom_plan(self, within: list[str], query: str, note: str) -> Plan:
        if not within:
            return Plan("search_chunks", query, "chunks", note=(note + "; no summaries to zoom into").strip("; "))
        return Plan("zoom", query, "chunks", within=within, note=note)

    def _top_summaries(self) -> list[str]:
        return [e.oid for e in self.summaries()[:ZOOM_DEFAULT]]

    def _resolve_summary_ids(self, ids: Any) -> list[str]:
        if not isinstance(ids, list):
            return []
        by_label = {e.label.upper(): e.oid for e in self.summaries()}
        known = {e.oid for e in self.summaries()}
        out: list[str] = []
        for raw in ids:
            key = str(raw).strip()
            oid = by_label.get(key.upper()) or (key if key in known else None)
            if oid and oid not in out:
                out.append(oid)
        return out

    async def act(self, step: int, plan: Plan, thought_text: str) -> list[Evidence]:
        body: dict[str, Any] = {"text": plan.query, "k": SUMMARY_K if plan.level == "summaries" else CHUNK_K,
                                "level": plan.level}
        if plan.within:
            body["within"] = plan.within
        desc = f"{plan.kind}: {plan.query!r}" + (f" within {len(plan.within)} summaries" if plan.within else "")
        await self.run.emit("action", step=step, text=desc, kind=plan.kind, level=plan.level, within=plan.within,
                            note=plan.note)
        reply = await self.run.memory("search", body)
        raw = [h for h in reply.get("hits", []) if isinstance(h, dict) and h.get("oid")]
        if plan.query != self.question:
            # Anchored retrieval: a small model's query can drift far from the question, so every
            # search also runs with the question itself and the two rankings are merged by score.
            anchored = await self.run.memory("search", {**body, "text": self.question})
            raw = _merge_hits(raw, anchored.get("hits", []), body["k"])
        hits = [self._evidence(h, step) for h in raw]
        await self.run.audit("RETRIEVAL_ACTION", status="SUCCESS", persona=self.persona, step=step,
                             action=plan.kind, query=plan.query, level=plan.level, within=plan.within,
                             retrieved_chunk_ids=[h.oid for h in hits], note=plan.note)
        entries = [f"[{step}] Thought: {thought_text}" if thought_text else f"[{step}] Thought: (none)",
                   f"[{step}] Action: {desc}" + (f" ({plan.note})" if plan.note else ""),
                   f"[{step}] Observation: " + (", ".join(f"{h.label} {h.where}" for h in hits) or "nothing found")]
        refined = {"text": plan.query, "level": plan.level, "within": list(plan.within), "step": step,
                   "action": plan.kind}
        missing = await self.session.run(_record_step, self.morph_oid, entries, refined, [h.oid for h in hits])
        if missing:
            entries.append(f"[{step}] {len(missing)} hit(s) newer than this cycle's snapshot kept by id only")
            await self.session.run(_append_log, self.morph_oid, entries[-1:])
        self.log.extend(entries)
        await self.run.emit("observation", step=step, text=entries[2].split(": ", 1)[1],
                            hits=[h.brief() for h in hits])
        return hits

    async def apply_fallback(self, step: int) -> None:
        reason = self.fallback or "unusable model output"
        await self.run.emit("log", text=f"FALLBACK: {reason}; searching chunks with the original question")
        await self.run.audit("REACT_FALLBACK", status="FAILURE", persona=self.persona, step=step, reason=reason)
        await self.session.run(_append_log, self.morph_oid, [f"[{step}] FALLBACK: {reason}"])
        self.log.append(f"[{step}] FALLBACK: {reason}")
        if not self.summaries():
            await self.act(step, Plan("search_summaries", self.question, "summaries", note="fallback"), "")
        await self.act(step, Plan("search_chunks", self.question, "chunks", note="fallback"), "")

    async def final_zoom(self, step: int) -> None:
        plan = self._zoom_plan(self._top_summaries(), self.question, "no chunk read yet: final zoom for evidence")
        await self.act(step, plan, "")

    def _evidence(self, hit: dict[str, Any], step: int) -> Evidence:
        oid = str(hit["oid"])
        level = str(hit.get("level", "chunk"))
        score = float(hit.get("score") or 0.0)
        known = self.evidence.get(oid)
        if known is not None:
            known.score = max(known.score, score)
            return known
        kind = level if level in self._labels else "chunk"
        self._labels[kind] += 1
        label = {"summary": "S", "chunk": "C", "fractal": "F"}[kind] + str(self._labels[kind])
        ev = Evidence(label=label, oid=oid, level=kind, score=score, text=str(hit.get("text", "")),
                      metadata=dict(hit.get("metadata") or {}), token_count=int(hit.get("token_count") or 0),
                      summary_oid=hit.get("summary_oid"), child_oids=list(hit.get("child_oids") or []), step=step)
        self.evidence[oid] = ev
        return ev

    def thought_prompt(self, step: int) -> str:
        lines = [f"Question: {self.question}",
                 f"This is step {step} of at most {self.max_steps} in a search of BAT OS's own memory."]
        summaries = self.summaries()
        if summaries:
            lines.append("Summaries found (id: file - summary):")
            lines += [f"{e.label}: {e.file_path or e.oid} - {_one_line(e.text)[:PREVIEW_CHARS]}" for e in summaries]
        chunks = self.chunks()
        if chunks:
            lines.append("Code chunks found:")
            lines += [f"{e.label}: {e.where} {e.metadata.get('node_name', '')}".rstrip() for e in chunks]
        if self.log:
            lines.append("Notes so far:")
            lines += self.log[-9:]
        lines.append("Choose the next action.")  # the llm service adds the action list and the JSON form
        return "\n".join(lines)


def _merge_hits(first: list[Any], second: list[Any], k: int) -> list[dict[str, Any]]:
    """Union of two hit lists by oid (the higher score wins), best first, at most ``k``."""
    best: dict[str, dict[str, Any]] = {}
    for hit in [*first, *second]:
        if not isinstance(hit, dict) or not hit.get("oid"):
            continue
        oid = str(hit["oid"])
        if oid not in best or float(hit.get("score") or 0) > float(best[oid].get("score") or 0):
            best[oid] = hit
    return sorted(best.values(), key=lambda h: float(h.get("score") or 0), reverse=True)[:k]


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _clean_query(value: Any, question: str) -> str:
    text = _one_line(str(value or ""))[:QUERY_MAX_CHARS]
    return text if len(text) >= 3 else question


# -- work done on the session's thread, inside the REASONING transaction -------------------------

def _open_morph(root: Any, conn: Any, cycle_id: str, question: str) -> str:
    cycle = records.get_cycle(root, cycle_id)
    morph = root["prototypes"]["query_morph"].clone(
        "query_morph",
        initial_prompt=question,
        refined_query=PersistentMapping({"text": question, "level": "summaries", "within": [], "step": 0}),
        retrieved_context=PersistentList(),
        reasoning_log=[],
        cycle_id=cycle_id,
    )
    conn.add(morph)
    cycle.set_slot("query_morph", morph)
    return oid_hex(morph)


def _record_step(root: Any, conn: Any, morph_oid: str, entries: list[str], refined: dict[str, Any],
                 hit_oids: list[str]) -> list[str]:
    """Update the QueryMorph with one step; return hit oids not loadable in this transaction's snapshot."""
    morph = resolve_oid(conn, morph_oid)
    morph.set_slot("reasoning_log", [*morph.get_slot("reasoning_log"), *entries])
    query = morph.get_slot("refined_query")
    query.clear()
    query.update(refined)
    context = morph.get_slot("retrieved_context")
    have = {oid_hex(o) for o in context}
    missing: list[str] = []
    for oid in hit_oids:
        if oid in have:
            continue
        try:
            context.append(resolve_oid(conn, oid))
        except (KeyError, ConflictError):  # created after this transaction began (ReadConflictError) or gone
            missing.append(oid)
        have.add(oid)
    return missing


def _append_log(root: Any, conn: Any, morph_oid: str, entries: list[str]) -> None:
    morph = resolve_oid(conn, morph_oid)
    morph.set_slot("reasoning_log", [*morph.get_slot("reasoning_log"), *entries])


def _close_morph(root: Any, conn: Any, cycle_id: str, morph_oid: str, summary: dict[str, Any]) -> None:
    morph = resolve_oid(conn, morph_oid)
    morph.set_slot("outcome", summary)


async def _in_session(run: CycleRun, work: Any) -> ReactResult:
    """Run ``work(session)`` as the REASONING state: one transaction, committed at the end, aborted on failure."""
    session = run.env.image.session()
    try:
        result = await work(session)
        await session.run(_close_morph, run.cycle_id, result.morph_oid,
                          {"steps": result.steps, "fallback": result.fallback,
                           "summaries": [e.oid for e in result.summaries], "chunks": [e.oid for e in result.chunks]})
        await session.commit()
        return result
    except BaseException:
        await session.abort()
        raise
    finally:
        await session.close()


async def reason(run: CycleRun, question: str, *, max_steps: int, persona: str = "BABS") -> ReactResult:
    """The REASONING state of a question: the ReAct loop."""
    async def work(session: Any) -> ReactResult:
        return await ReactLoop(run, session, question, max_steps=max_steps, persona=persona).run_loop()

    return await _in_session(run, work)


async def retrieve(run: CycleRun, prompt: str, query: str, *, k: int = CHUNK_K, persona: str = "BABS") -> ReactResult:
    """A REASONING state with one Action and no Thought: the QueryMorph gathers chunks for ``query``.

    For missions whose reasoning happens elsewhere (BRICK writing a method): the model is not asked to steer,
    the context is still retrieved, recorded on a QueryMorph and committed atomically.
    """
    async def work(session: Any) -> ReactResult:
        loop = ReactLoop(run, session, prompt, max_steps=1, persona=persona)
        loop.morph_oid = await session.run(_open_morph, run.cycle_id, prompt)
        plan = Plan("search_chunks", _clean_query(query, prompt), "chunks")
        await loop.act(1, plan, f"gather context for: {_one_line(prompt)[:160]}")
        chunks = loop.chunks()[:k]
        return ReactResult(loop.morph_oid, [], chunks, 1, None, loop.log)

    return await _in_session(run, work)
