"""REASONING: the program leads retrieval over hierarchical memory; the model's QueryMorph queries only add to it.

Blueprint §3.1-3.3. The loop runs inside ONE image session (a transaction spanning its awaits): the QueryMorph
is created there, each search updates its ``refined_query`` (PersistentMapping), ``retrieved_context``
(PersistentList of the retrieved MemoryChunk / ContextualSummary / ContextFractal objects themselves) and
``reasoning_log``, and the caller commits once at the end or aborts on any failure, so nothing partial remains.

Step 1, the program alone (no model call): memory ``search`` with the Architect's question over summaries and
over chunks, then a zoom (``within``) into the children of the best summaries, again with the question.
Each search is a ranked list; evidence is ranked by reciprocal rank fusion over the lists that found it (the
question's own chunk search counts fully, zooms and the model's queries count half), so a chunk that several
searches agree on rises, and a drifting model query can add a candidate but never outrank the question's.

Sufficient evidence ends REASONING: two of the top three chunks found by more than one search (agreement), or
the top three unchanged by a step (stable), or nothing left to read. Otherwise, while steps remain, BABS is
asked for a thought (llm ``action``: a proto.react.ReactAction, the vocabulary and bounds the llm service
constrains the model to); its query becomes one more chunk search and its summary_ids choose the next zoom;
without a usable thought the program zooms into the next best summaries not yet read. Nothing is repeated: a
search already run (same text, level and scope) is skipped, and a thought that repeats an earlier one is dropped
and the model is not asked again (the program goes on alone). Unparseable model output (no ``action`` in the
reply) is the stated FALLBACK: logged, emitted, audited, and the program goes on alone.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from persistent.list import PersistentList
from persistent.mapping import PersistentMapping
from ZODB.POSException import ConflictError

from batos.uvm import oid_hex, resolve_oid
from proto.bodies.llm import Action, Message
from proto.react import CHUNK_K, SUMMARY_K, ReactAction
from services.kernel import cycle as records
from services.kernel.run import CycleRun

log = logging.getLogger("batos.kernel.react")

ZOOM_DEFAULT = 2  # summaries zoomed into per step when the thought names none usable
THOUGHT_MAX_TOKENS = 160  # room for a bounded JSON object; xgrammar ends strings within the schema
PREVIEW_CHARS = 220  # per summary in the thought prompt
SEARCH_TEXT_MAX = 400  # the program's own search text (retrieve); the model's queries are proto.react.QUERY_MAX
RRF_K = 60  # reciprocal rank fusion's usual constant: ranks, not scores, so lists of any scorer mix
QUESTION_WEIGHT = 1.0  # the Architect's question over all chunks
SIDE_WEIGHT = 0.5  # zooms and the model's queries: they add candidates, the question's ranking leads
TOP = 3  # the top chunks whose agreement or stability makes the evidence sufficient
AGREE_MIN = 2  # of the TOP chunks, found by more than one search


@dataclass
class Evidence:
    label: str  # S1, C2, F3: how the thought prompt and events name it
    oid: str
    level: str  # summary | chunk | fractal
    score: float  # the best score memory gave it
    text: str
    metadata: dict[str, Any]
    token_count: int
    summary_oid: str | None
    child_oids: list[str]
    step: int
    fused: float = 0.0  # reciprocal rank fusion over the searches that found it: the order used everywhere
    found_by: list[str] = field(default_factory=list)  # the searches (by key) that found it

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
    weight: float = QUESTION_WEIGHT


@dataclass
class ReactResult:
    morph_oid: str
    summaries: list[Evidence]
    chunks: list[Evidence]
    steps: int
    fallback: str | None
    log: list[str]
    stop: str = ""  # why REASONING ended
    thoughts: int = 0  # model calls made


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
        self.searched: set[tuple[str, str, tuple[str, ...]]] = set()  # (query, level, within): never twice
        self.thoughts_seen: set[str] = set()
        self.zoomed: set[str] = set()  # summary oids already read
        self.model_on = True
        self.thoughts = 0
        self._labels = {"summary": 0, "chunk": 0, "fractal": 0}

    # -- views ----------------------------------------------------------------------------------
    def summaries(self) -> list[Evidence]:
        return sorted((e for e in self.evidence.values() if e.level == "summary"), key=lambda e: (-e.fused, -e.score))

    def chunks(self) -> list[Evidence]:
        return sorted((e for e in self.evidence.values() if e.level != "summary"), key=lambda e: (-e.fused, -e.score))

    def top(self) -> list[str]:
        return [e.oid for e in self.chunks()[:TOP]]

    # -- the loop -------------------------------------------------------------------------------
    async def run_loop(self) -> ReactResult:
        self.morph_oid = await self.session.run(_open_morph, self.run.cycle_id, self.question)
        await self.first_step()
        step, stop = 1, self.sufficient(None)
        while stop is None and step < self.max_steps:
            step += 1
            before = self.top()
            ran = await self.next_step(step)
            stop = self.sufficient(before) if ran else "nothing new left to read"
        stop = stop or f"step budget reached ({self.max_steps} steps)"
        entry = f"[{step}] Evidence: {stop}; top chunks " + (", ".join(e.where for e in self.chunks()[:TOP]) or "none")
        await self.session.run(_append_log, self.morph_oid, [entry])
        self.log.append(entry)
        await self.run.emit("log", text=f"REASONING ended after {step} step(s): {stop}")
        return ReactResult(self.morph_oid, self.summaries(), self.chunks(), step, self.fallback, self.log,
                           stop, self.thoughts)

    async def first_step(self) -> None:
        """The program's own retrieval with the question: summaries, chunks, and a zoom into the best summaries."""
        await self.act(1, Plan("search_summaries", self.question, "summaries"), "")
        await self.act(1, Plan("search_chunks", self.question, "chunks"), "")
        within = self._unread_summaries(ZOOM_DEFAULT)
        if within:
            await self.act(1, Plan("zoom", self.question, "chunks", within=within, weight=SIDE_WEIGHT), "")

    async def next_step(self, step: int) -> bool:
        """One more step: the model's thought (if still asked) adds a query and chooses a zoom; the program zooms
        into unread summaries otherwise. False when nothing new could be searched."""
        thought = await self.think(step) if self.model_on else None
        text, query, chosen = "", "", []
        if thought is not None:
            text = _one_line(thought.thought)
            if thought.action == "answer" and self.chunks():
                return False
            query = _one_line(thought.query)
            chosen = [o for o in self._resolve_summary_ids(thought.summary_ids) if o not in self.zoomed]
        ran = False
        if len(query) >= 3 and _norm(query) != _norm(self.question):
            ran |= await self.act(step, Plan("search_chunks", query, "chunks", weight=SIDE_WEIGHT,
                                             note="the model's query adds candidates"), text) is not None
        within = chosen or self._unread_summaries(ZOOM_DEFAULT)
        if within:
            note = "summaries the model chose" if chosen else "the next best summaries not yet read"
            ran |= await self.act(step, Plan("zoom", self.question, "chunks", within=within, weight=SIDE_WEIGHT,
                                             note=note), "" if ran else text) is not None
        return ran

    def sufficient(self, before: list[str] | None) -> str | None:
        """Why the evidence is enough, or None."""
        chunks = self.chunks()
        if not chunks:
            return None
        top = chunks[:TOP]
        agreed = sum(1 for e in top if len(set(e.found_by)) > 1)
        if agreed >= min(AGREE_MIN, len(chunks)):
            return f"{agreed} of the top {len(top)} chunks were found by more than one search"
        if before is not None and before == [e.oid for e in top]:
            return "the top chunks did not change"
        return None

    async def think(self, step: int) -> ReactAction | None:
        ask = Action(persona=self.persona, messages=[Message("user", self.thought_prompt(step))],
                     max_tokens=THOUGHT_MAX_TOKENS)
        self.thoughts += 1
        reply = await self.run.llm(ask)
        action = reply.action
        if action is None:
            self.fallback = (f"step {step}: the model's output could not be used as an action "
                             f"(attempts={reply.attempts}: {reply.problem}): {reply.raw[:300]!r}")
            await self.apply_fallback(step)
            return None
        text = action.thought.strip()
        await self.run.emit("thought", step=step, text=text, action=action.action, query=action.query,
                            summary_ids=action.summary_ids)
        key = _norm(text)
        if key and key in self.thoughts_seen:
            self.model_on = False
            await self._note(step, f"repeated thought dropped ({text[:80]!r}); the program goes on alone")
            return None
        self.thoughts_seen.add(key)
        return action

    def _unread_summaries(self, n: int) -> list[str]:
        return [e.oid for e in self.summaries() if e.oid not in self.zoomed][:n]

    def _top_summaries(self) -> list[str]:
        return [e.oid for e in self.summaries()[:ZOOM_DEFAULT]]

    def _resolve_summary_ids(self, ids: list[str]) -> list[str]:
        by_label = {e.label.upper(): e.oid for e in self.summaries()}
        known = {e.oid for e in self.summaries()}
        out: list[str] = []
        for raw in ids:
            key = raw.strip()
            oid = by_label.get(key.upper()) or (key if key in known else None)
            if oid and oid not in out:
                out.append(oid)
        return out

    async def _note(self, step: int, text: str) -> None:
        entry = f"[{step}] {text}"
        await self.session.run(_append_log, self.morph_oid, [entry])
        self.log.append(entry)
        await self.run.emit("log", text=text)

    async def search(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        reply = await self.run.memory("search", body)
        return [h for h in reply.get("hits", []) if isinstance(h, dict) and h.get("oid")]

    async def act(self, step: int, plan: Plan, thought_text: str, *,
                  raw: list[dict[str, Any]] | None = None) -> list[Evidence] | None:
        """Run one search (None if this exact search already ran), fuse its ranking in, record the step."""
        key = (_norm(plan.query), plan.level, tuple(sorted(plan.within)))
        if raw is None and key in self.searched:
            return None
        self.searched.add(key)
        self.zoomed.update(plan.within)
        body: dict[str, Any] = {"text": plan.query, "k": SUMMARY_K if plan.level == "summaries" else CHUNK_K,
                                "level": plan.level}
        if plan.within:
            body["within"] = plan.within
        desc = f"{plan.kind}: {plan.query!r}" + (f" within {len(plan.within)} summaries" if plan.within else "")
        await self.run.emit("action", step=step, text=desc, kind=plan.kind, level=plan.level, within=plan.within,
                            note=plan.note)
        if raw is None:
            raw = await self.search(body)
        tag = f"{step}:{plan.kind}:{len(self.searched)}"
        hits = [self._evidence(h, step, rank, plan.weight, tag) for rank, h in enumerate(raw, 1)]
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
        """The stated FALLBACK: the model is not asked again; the program goes on alone with the question."""
        reason = self.fallback or "unusable model output"
        self.model_on = False
        await self.run.emit("log", text=f"FALLBACK: {reason}; the program goes on alone with the question")
        await self.run.audit("REACT_FALLBACK", status="FAILURE", persona=self.persona, step=step, reason=reason)
        await self.session.run(_append_log, self.morph_oid, [f"[{step}] FALLBACK: {reason}"])
        self.log.append(f"[{step}] FALLBACK: {reason}")

    def _evidence(self, hit: dict[str, Any], step: int, rank: int = 1, weight: float = QUESTION_WEIGHT,
                  tag: str = "") -> Evidence:
        oid = str(hit["oid"])
        level = str(hit.get("level", "chunk"))
        score = float(hit.get("score") or 0.0)
        known = self.evidence.get(oid)
        if known is None:
            kind = level if level in self._labels else "chunk"
            self._labels[kind] += 1
            label = {"summary": "S", "chunk": "C", "fractal": "F"}[kind] + str(self._labels[kind])
            known = Evidence(label=label, oid=oid, level=kind, score=score, text=str(hit.get("text", "")),
                             metadata=dict(hit.get("metadata") or {}), token_count=int(hit.get("token_count") or 0),
                             summary_oid=hit.get("summary_oid"), child_oids=list(hit.get("child_oids") or []),
                             step=step)
            self.evidence[oid] = known
        known.score = max(known.score, score)
        known.fused += weight / (RRF_K + rank)
        if tag and tag not in known.found_by:
            known.found_by.append(tag)
        return known

    def thought_prompt(self, step: int) -> str:
        lines = [f"Question: {self.question}",
                 f"This is step {step} of at most {self.max_steps} in a search of the code in memory."]
        summaries = self.summaries()
        root = path_root([*summaries, *self.chunks()])  # paths as the Architect reads them, and fewer tokens
        if summaries:
            lines.append("Summaries found (id: file - summary):")
            lines += [f"{e.label}: {e.file_path.removeprefix(root) or e.oid} - {_one_line(e.text)[:PREVIEW_CHARS]}"
                      for e in summaries]
        chunks = self.chunks()
        if chunks:
            lines.append("Code chunks found:")
            lines += [f"{e.label}: {e.where.removeprefix(root)} {e.metadata.get('node_name', '')}".rstrip()
                      for e in chunks]
        searched = sorted({q for q, _, _ in self.searched if q})
        if searched:
            lines.append("Already searched (do not repeat): " + "; ".join(searched)[:600])
        lines.append("Choose the next action: a new query for what is still missing, or answer.")
        return "\n".join(lines)


def path_root(chunks: list[Evidence]) -> str:
    """The directory prefix the evidence blocks leave out of their paths: above the deepest directory all the
    retrieved chunks share, so ``/tmp/x/src/csv/csv.py`` shows as ``csv/csv.py`` (fewer prompt tokens, and a path
    the Architect recognises). Computed over every retrieved chunk, so a retry's blocks render as the first ones."""
    paths = [e.file_path for e in chunks if e.file_path]
    if not paths or not all(os.path.isabs(p) for p in paths):
        return ""
    dirs = sorted({os.path.dirname(p) for p in paths})
    common = os.path.commonpath(dirs)
    root = os.path.dirname(common) if len(dirs) == 1 else common
    return "" if root in ("", "/") else root.rstrip("/") + "/"


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


def _norm(text: str) -> str:
    """A query or thought as compared for repeats: case, punctuation and spacing ignored."""
    return " ".join("".join(c if c.isalnum() else " " for c in text.lower()).split())


def _clean_query(value: Any, question: str) -> str:
    text = _one_line(str(value or ""))[:SEARCH_TEXT_MAX]
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
                          {"steps": result.steps, "fallback": result.fallback, "stop": result.stop,
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
        body = {"text": plan.query, "k": CHUNK_K, "level": "chunks"}
        raw = await loop.search(body)
        if plan.query != prompt:  # anchored: the prompt itself too, the two rankings merged by score
            raw = _merge_hits(raw, await loop.search({**body, "text": prompt}), CHUNK_K)
        await loop.act(1, plan, f"gather context for: {_one_line(prompt)[:160]}", raw=raw)
        chunks = loop.chunks()[:k]
        return ReactResult(loop.morph_oid, [], chunks, 1, None, loop.log)

    return await _in_session(run, work)
