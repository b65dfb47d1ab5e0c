"""Kernel REASONING: the QueryMorph's ReAct loop, its stated fallbacks, and its one-transaction atomicity.

Fake llm/memory services, a real in-process ZEO: every failure injected at every step must leave the cycle
FAILED with no QueryMorph (nothing partial) in the image.
"""

from __future__ import annotations

from typing import Any

import pytest
from persistent.list import PersistentList
from persistent.mapping import PersistentMapping

from batos.errors import ServiceError
from batos.uvm import oid_hex, resolve_oid
from proto import ErrorCode
from services.kernel import cycle as records
from services.kernel.psm import State
from services.kernel.react import reason
from services.kernel.run import CycleRun, execute
from tests.unit.test_kernel_cycle import *  # noqa: F403  (the kernel test kit: fixtures)
from tests.unit.test_kernel_cycle import Events, cycle_slots, new_run

# -- a small memory: two file summaries, two chunks each, as real objects in the image -----------


async def make_corpus(image: Any) -> dict[str, Any]:
    def build(root: Any, conn: Any) -> dict[str, Any]:
        protos = root["prototypes"]
        corpus: dict[str, Any] = {"summaries": [], "chunks": {}}
        root.setdefault("test_corpus", PersistentList())
        for f, path in enumerate(("batos/uvm.py", "batos/image.py")):
            s = protos["contextual_summary"].clone("s", summary_text=f"summary of {path}", kind="file",
                                                    metadata={"file_path": path})
            conn.add(s)
            root["test_corpus"].append(s)
            kids = []
            for c in range(2):
                ch = protos["memory_chunk"].clone("c", source_text=f"def f{f}{c}(): pass",
                                                  metadata={"file_path": path, "start_line": 10 * c + 1,
                                                            "end_line": 10 * c + 9, "node_name": f"f{f}{c}"})
                conn.add(ch)
                root["test_corpus"].append(ch)
                kids.append(oid_hex(ch))
            corpus["summaries"].append({"oid": oid_hex(s), "path": path})
            corpus["chunks"][oid_hex(s)] = [{"oid": k, "path": path, "i": i} for i, k in enumerate(kids)]
        return corpus

    return await image.transact(build)


def memory_search(corpus: dict[str, Any]):
    def search(body: dict[str, Any], on_event: Any) -> dict[str, Any]:
        if body["level"] == "summaries":
            return {"hits": [{"oid": s["oid"], "level": "summary", "score": 0.9 - i / 10,
                              "text": f"summary of {s['path']}", "metadata": {"file_path": s["path"]},
                              "child_oids": [c["oid"] for c in corpus["chunks"][s["oid"]]], "token_count": 5}
                             for i, s in enumerate(corpus["summaries"])]}
        within = body.get("within") or list(corpus["chunks"])
        hits = []
        for s_oid in within:
            for c in corpus["chunks"].get(s_oid, []):
                hits.append({"oid": c["oid"], "level": "chunk", "score": 0.8 - c["i"] / 10,
                             "text": f"def f(): # {c['path']}", "summary_oid": s_oid, "token_count": 7,
                             "metadata": {"file_path": c["path"], "start_line": 10 * c["i"] + 1,
                                          "end_line": 10 * c["i"] + 9, "node_name": f"f{c['i']}"}})
        return {"hits": hits[: body.get("k", 8)]}

    return search


def scripted_actions(*actions: dict[str, Any] | None):
    """llm `action` replies in order; None = unparseable output; the last one repeats."""
    seen: list[dict[str, Any]] = []

    def action(body: dict[str, Any], on_event: Any) -> dict[str, Any]:
        seen.append(body)
        a = actions[min(len(seen) - 1, len(actions) - 1)]
        if a is None:
            return {"action": None, "valid": False, "raw": "server-server-server", "attempts": 2}
        return {"action": a, "valid": True, "raw": str(a), "attempts": 1}

    action.seen = seen  # type: ignore[attr-defined]
    return action


def act(action: str, query: str = "", ids: list[str] | None = None, thought: str = "hmm") -> dict[str, Any]:
    return {"thought": thought, "action": action, "query": query, "summary_ids": ids or []}


async def reasoning_body(r: CycleRun, question: str = "how does lookup work?") -> dict[str, Any]:
    await r.to(State.DECOMPOSING)
    await r.to(State.REASONING)
    result = await reason(r, question, max_steps=r.env.settings.react_max_steps)
    return {"morph": result.morph_oid, "chunks": [c.oid for c in result.chunks],
            "summaries": [s.oid for s in result.summaries], "fallback": result.fallback, "steps": result.steps}


async def morph_state(image: Any, cycle_id: str) -> dict[str, Any]:
    def read(root: Any, conn: Any) -> dict[str, Any]:
        m = records.get_cycle(root, cycle_id).get_slot("query_morph")
        return {"refined": m.get_slot("refined_query"), "refined_type": type(m.get_slot("refined_query")),
                "context": [oid_hex(o) for o in m.get_slot("retrieved_context")],
                "context_type": type(m.get_slot("retrieved_context")),
                "log": list(m.get_slot("reasoning_log")), "initial": m.get_slot("initial_prompt"),
                "proto": m.parents[0] is root["prototypes"]["query_morph"]}

    return await image.read(read)


# -- the loop ----------------------------------------------------------------------------------


async def test_summaries_then_zoom_into_the_chosen_summary_then_answer(env, client, audit):
    corpus = await make_corpus(env.image)
    s2 = corpus["summaries"][1]["oid"]
    client.handlers[("memory", "search")] = memory_search(corpus)
    client.handlers[("llm", "action")] = scripted_actions(
        act("search_summaries", "lookup"), act("zoom", "lookup chain", ["S2"]), act("answer"))
    events = Events()
    out = await execute(new_run(env, events), reasoning_body)
    searches = [b for s, c, b in client.calls if c == "search"]
    # each of the model's queries is paired with an anchored search for the question itself
    assert [b["level"] for b in searches] == ["summaries", "summaries", "chunks", "chunks"]
    assert searches[0]["text"] == "lookup" and searches[2]["text"] == "lookup chain"
    assert searches[1]["text"] == searches[3]["text"] != "lookup"
    assert searches[2]["within"] == searches[3]["within"] == [s2]  # the chosen summary's children only
    assert sorted(out["chunks"]) == sorted(c["oid"] for c in corpus["chunks"][s2])
    assert out["steps"] == 3 and out["fallback"] is None
    assert [d["step"] for d in events.of("thought")] == [1, 2, 3]
    assert [d["step"] for d in events.of("observation")] == [1, 2]
    assert all(d["cycle_id"] == out["cycle_id"] for _, d in events.items)
    m = await morph_state(env.image, out["cycle_id"])
    assert m["proto"] and m["initial"] == "how does lookup work?"
    assert m["refined_type"] is PersistentMapping and m["refined"]["within"] == [s2]
    assert m["context_type"] is PersistentList
    assert set(m["context"]) == {s["oid"] for s in corpus["summaries"]} | set(out["chunks"])
    assert any("Thought: hmm" in line for line in m["log"]) and any("Observation" in line for line in m["log"])
    assert audit.types().count("LLM_CALL") == 3 and audit.types().count("RETRIEVAL_ACTION") == 2
    assert audit.of("RETRIEVAL_ACTION")[1]["event_data"]["retrieved_chunk_ids"] == out["chunks"]
    # the thought prompt at step 2 showed the summaries by label
    assert "S2: batos/image.py" in client.handlers[("llm", "action")].seen[1]["messages"][0]["content"]


async def test_step_one_always_reads_summaries_and_bad_ids_zoom_into_the_best(env, client):
    corpus = await make_corpus(env.image)
    client.handlers[("memory", "search")] = memory_search(corpus)
    client.handlers[("llm", "action")] = scripted_actions(
        act("search_chunks", "x"), act("zoom", "y", ["S9", "nonsense"]), act("answer"))
    events = Events()
    await execute(new_run(env, events), reasoning_body)
    searches = [b for s, c, b in client.calls if c == "search"]
    assert searches[0]["level"] == "summaries"
    assert searches[1]["within"] == [s["oid"] for s in corpus["summaries"]]  # top 2 by score
    assert "step 1 reads summaries first" in events.of("action")[0]["note"]
    assert "no usable summary_ids" in events.of("action")[1]["note"]


async def test_answer_before_any_chunk_zooms_instead_of_stopping(env, client):
    corpus = await make_corpus(env.image)
    client.handlers[("memory", "search")] = memory_search(corpus)
    client.handlers[("llm", "action")] = scripted_actions(act("search_summaries", "q"), act("answer"), act("answer"))
    out = await execute(new_run(env, Events()), reasoning_body)
    assert out["chunks"] and out["steps"] == 3


async def test_the_step_cap_holds_and_a_final_zoom_finds_evidence(env, client, settings):
    corpus = await make_corpus(env.image)
    client.handlers[("memory", "search")] = memory_search(corpus)
    client.handlers[("llm", "action")] = scripted_actions(act("search_summaries", "again and again"))
    events = Events()
    out = await execute(new_run(env, events), reasoning_body)
    assert client.count("llm", "action") == settings.react_max_steps
    assert out["chunks"]  # final zoom
    assert events.of("action")[-1]["kind"] == "zoom" and "final zoom" in events.of("action")[-1]["note"]


async def test_unparseable_output_applies_the_stated_fallback(env, client, audit):
    corpus = await make_corpus(env.image)
    client.handlers[("memory", "search")] = memory_search(corpus)
    client.handlers[("llm", "action")] = scripted_actions(None)
    events = Events()
    out = await execute(new_run(env, events), reasoning_body)
    assert out["fallback"] and "could not be used" in out["fallback"]
    searches = [b for s, c, b in client.calls if c == "search"]
    assert [(b["level"], b["text"]) for b in searches] == [("summaries", "how does lookup work?"),
                                                          ("chunks", "how does lookup work?")]
    assert "within" not in searches[1]
    assert any("FALLBACK" in d["text"] for d in events.of("log"))
    assert audit.of("REACT_FALLBACK")[0]["status"] == "FAILURE"
    assert client.count("llm", "action") == 1  # no more asking a model that cannot answer
    m = await morph_state(env.image, out["cycle_id"])
    assert any("FALLBACK" in line for line in m["log"])


async def test_hits_newer_than_the_snapshot_are_kept_by_id_only(env, client):
    corpus = await make_corpus(env.image)
    search = memory_search(corpus)

    def search_with_phantom(body: dict[str, Any], on_event: Any) -> dict[str, Any]:
        out = search(body, on_event)
        out["hits"].append({"oid": "ffffff", "level": "chunk", "score": 0.1, "text": "gone",
                            "metadata": {"file_path": "x.py", "start_line": 1, "end_line": 2}})
        return out

    client.handlers[("memory", "search")] = search_with_phantom
    client.handlers[("llm", "action")] = scripted_actions(act("search_summaries", "q"), act("zoom", "q", ["S1"]),
                                                          act("answer"))
    out = await execute(new_run(env, Events()), reasoning_body)
    m = await morph_state(env.image, out["cycle_id"])
    assert "ffffff" not in m["context"] and "ffffff" in out["chunks"]
    assert any("newer than this cycle's snapshot" in line for line in m["log"])


# -- atomicity: a failure injected at every step leaves nothing partial ------------------------


class FaultySession:
    """Wraps a real Session; raises at the n-th run() (or at commit when n == 'commit')."""

    def __init__(self, inner: Any, fail_at: int | str, record: dict[str, Any]):
        self.inner, self.fail_at, self.record, self.runs = inner, fail_at, record, 0

    async def run(self, fn: Any, *args: Any) -> Any:
        self.runs += 1
        if self.runs == self.fail_at:
            raise RuntimeError(f"injected failure in session.run #{self.runs}")
        out = await self.inner.run(fn, *args)
        if self.runs == 1:
            self.record["morph"] = out
        return out

    async def commit(self) -> None:
        if self.fail_at == "commit":
            raise RuntimeError("injected failure at commit")
        await self.inner.commit()

    async def abort(self) -> None:
        self.record["aborted"] = True
        await self.inner.abort()

    async def close(self) -> None:
        await self.inner.close()


class FaultyImage:
    def __init__(self, inner: Any, fail_at: int | str, record: dict[str, Any]):
        self.inner, self.fail_at, self.record = inner, fail_at, record

    def session(self) -> FaultySession:
        return FaultySession(self.inner.session(), self.fail_at, self.record)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def failing_on(n: int, handler: Any):
    calls = {"n": 0}

    def wrapped(body: dict[str, Any], on_event: Any) -> dict[str, Any]:
        calls["n"] += 1
        if calls["n"] == n:
            raise ServiceError(ErrorCode.UNAVAILABLE, f"injected failure in call #{n}")
        return handler(body, on_event)

    return wrapped


FAULTS = [("llm", 1), ("llm", 2), ("llm", 3), ("memory", 1), ("memory", 2),
          ("session", 1), ("session", 2), ("session", 3), ("session", 4), ("session", "commit")]


@pytest.mark.parametrize(("where", "n"), FAULTS)
async def test_a_failure_at_any_step_aborts_reasoning_and_fails_the_cycle(env, client, where, n):
    corpus = await make_corpus(env.image)
    search = memory_search(corpus)
    actions = scripted_actions(act("search_summaries", "q"), act("zoom", "q", ["S1"]), act("answer"))
    record: dict[str, Any] = {}
    client.handlers[("memory", "search")] = failing_on(n, search) if where == "memory" else search
    client.handlers[("llm", "action")] = failing_on(n, actions) if where == "llm" else actions
    env.image = FaultyImage(env.image, n if where == "session" else -1, record)
    events = Events()
    run = new_run(env, events)
    with pytest.raises(ServiceError) as info:
        await execute(run, reasoning_body)
    assert "injected failure" in info.value.message and "FAILED in REASONING" in info.value.message
    assert events.states() == ["IDLE", "DECOMPOSING", "REASONING", "FAILED"]
    slots = await cycle_slots(env.image, run.cycle_id, "psm_state", "query_morph", "status")
    assert slots == {"psm_state": "FAILED", "query_morph": None, "status": "FAILURE"}
    if "morph" in record:  # the QueryMorph made inside the aborted transaction does not exist
        with pytest.raises(KeyError):
            await env.image.read(lambda root, conn: resolve_oid(conn, record["morph"]))
    assert record.get("aborted")
