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
from services.kernel.react import ReactLoop, reason
from services.kernel.run import CycleRun, execute
from tests.unit.test_kernel_cycle import *  # noqa: F403  (the kernel test kit: fixtures)
from tests.unit.test_kernel_cycle import Events, cycle_slots, new_run

# -- a small memory: two file summaries, two chunks each, as real objects in the image -----------


async def make_corpus(image: Any) -> dict[str, Any]:
    tree = await make_tree(image, paths=("batos/uvm.py", "batos/image.py"))
    paths = dict(zip(tree["summaries"], ("batos/uvm.py", "batos/image.py"), strict=True))
    return {"summaries": [{"oid": s, "path": p} for s, p in paths.items()],
            "chunks": {s: [{"oid": k, "path": paths[s], "i": i} for i, k in enumerate(kids)]
                       for s, kids in tree["chunks"].items()}}


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
                             "text": f"def lookup_slot{c['i']}(obj):  # {c['path']}", "summary_oid": s_oid,
                             "token_count": 7,
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
            "summaries": [s.oid for s in result.summaries], "fallback": result.fallback, "steps": result.steps,
            "stop": result.stop}


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


async def make_tree(image: Any, n_summaries: int = 4, n_chunks: int = 2,
                    paths: tuple[str, ...] = ()) -> dict[str, Any]:
    """File summaries (s1.py.. or ``paths``), each with chunks, as real objects in the image;
    returns {"summaries": [oid], "chunks": {s_oid: [oid]}}."""
    paths = paths or tuple(f"s{f + 1}.py" for f in range(n_summaries))

    def build(root: Any, conn: Any) -> dict[str, Any]:
        protos = root["prototypes"]
        root.setdefault("test_corpus", PersistentList())
        out: dict[str, Any] = {"summaries": [], "chunks": {}}
        for f, path in enumerate(paths):
            s = protos["contextual_summary"].clone("s", summary_text=f"summary of {path}", kind="file",
                                                    metadata={"file_path": path})
            conn.add(s)
            root["test_corpus"].append(s)
            kids = []
            for c in range(n_chunks):
                ch = protos["memory_chunk"].clone("c", source_text=f"def f{f}{c}(): pass",
                                                  metadata={"file_path": path, "start_line": 10 * c + 1,
                                                            "end_line": 10 * c + 9, "node_name": f"f{f}{c}"})
                conn.add(ch)
                root["test_corpus"].append(ch)
                kids.append(oid_hex(ch))
            out["summaries"].append(oid_hex(s))
            out["chunks"][oid_hex(s)] = kids
        return out

    return await image.transact(build)


def tree_search(tree: dict[str, Any], global_chunks: list[str], by_query: dict[str, list[str]] | None = None):
    """Summaries in order S1..Sn; a chunk search without ``within`` returns ``global_chunks`` for the question
    (``by_query[text]`` for other texts, else nothing); with ``within``, the children of those summaries."""
    parent = {c: s for s, cs in tree["chunks"].items() for c in cs}

    def chunk(oid: str, rank: int) -> dict[str, Any]:
        i = list(parent).index(oid)
        return {"oid": oid, "level": "chunk", "score": 0.9 - rank / 100, "text": f"def g{i}(): pass",
                "summary_oid": parent[oid], "token_count": 7,
                "metadata": {"file_path": f"f{i}.py", "start_line": 1, "end_line": 9, "node_name": f"g{i}"}}

    def search(body: dict[str, Any], on_event: Any) -> dict[str, Any]:
        if body["level"] == "summaries":
            return {"hits": [{"oid": s, "level": "summary", "score": 0.9 - i / 10, "text": f"outline {i + 1}",
                              "metadata": {"file_path": f"s{i + 1}.py"}, "child_oids": tree["chunks"][s],
                              "token_count": 5} for i, s in enumerate(tree["summaries"])][: body.get("k", 8)]}
        if body.get("within"):
            oids = [c for s in body["within"] for c in tree["chunks"].get(s, [])]
        else:
            oids = (by_query or {}).get(body["text"], global_chunks if body["text"] == QUESTION else [])
        return {"hits": [chunk(o, r) for r, o in enumerate(oids[: body.get("k", 8)])]}

    return search


QUESTION = "how does lookup work?"


def searches_of(client: Any) -> list[tuple[str, str, list[str] | None]]:
    return [(b["level"], b["text"], b.get("within")) for s, c, b in client.calls if c == "search"]


async def test_the_program_retrieves_alone_and_stops_when_its_searches_agree(env, client, audit):
    tree = await make_tree(env.image, n_summaries=2)
    s1, s2 = tree["summaries"]
    client.handlers[("memory", "search")] = tree_search(tree, [*tree["chunks"][s1], *tree["chunks"][s2]])
    client.handlers[("llm", "action")] = scripted_actions(act("search_chunks", "never asked"))
    events = Events()
    out = await execute(new_run(env, events), reasoning_body)
    # the question itself, over summaries, over chunks, then a zoom into the two best summaries
    assert searches_of(client) == [("summaries", QUESTION, None), ("chunks", QUESTION, None),
                                   ("chunks", QUESTION, [s1, s2])]
    assert client.count("llm", "action") == 0  # sufficient evidence: no model call at all
    assert out["steps"] == 1 and out["fallback"] is None and "more than one search" in out["stop"]
    assert set(out["chunks"]) == {c for cs in tree["chunks"].values() for c in cs}
    m = await morph_state(env.image, out["cycle_id"])
    assert m["proto"] and m["initial"] == QUESTION
    assert m["refined_type"] is PersistentMapping and m["refined"]["within"] == [s1, s2]
    assert m["context_type"] is PersistentList
    assert set(m["context"]) == {s1, s2} | set(out["chunks"])
    assert any("Observation" in line for line in m["log"]) and any("Evidence:" in line for line in m["log"])
    assert audit.types().count("RETRIEVAL_ACTION") == 3 and "LLM_CALL" not in audit.types()
    assert [d["step"] for d in events.of("observation")] == [1, 1, 1]
    assert any("REASONING ended after 1 step" in d["text"] for d in events.of("log"))


async def test_when_searches_disagree_the_models_query_adds_candidates_and_never_replaces_the_question(env, client):
    tree = await make_tree(env.image, n_summaries=3)
    s1, s2, s3 = tree["summaries"]
    extra = tree["chunks"][s1][0]
    client.handlers[("memory", "search")] = tree_search(tree, tree["chunks"][s3], {"lookup chain": [extra]})
    client.handlers[("llm", "action")] = scripted_actions(act("search_chunks", "lookup chain", ["S3"]))
    events = Events()
    out = await execute(new_run(env, events), reasoning_body)
    assert searches_of(client) == [("summaries", QUESTION, None), ("chunks", QUESTION, None),
                                   ("chunks", QUESTION, [s1, s2]),  # step 1: S3's chunks not among them
                                   ("chunks", "lookup chain", None),  # the model's query: one more search
                                   ("chunks", QUESTION, [s3])]  # its chosen summary, zoomed with the question
    assert client.count("llm", "action") == 1 and out["steps"] == 2
    # the question's own ranking leads: S3's chunks (found twice now) first, the model's find after them
    assert out["chunks"][:2] == tree["chunks"][s3] and extra in out["chunks"]
    assert "more than one search" in out["stop"]
    assert [d["step"] for d in events.of("thought")] == [2]
    prompt = client.handlers[("llm", "action")].seen[0]["messages"][0]["content"]
    assert "S3: s3.py" in prompt and "Already searched" in prompt


async def test_a_repeated_thought_is_dropped_and_the_program_goes_on_alone(env, client, settings):
    settings.react_max_steps = 4
    tree = await make_tree(env.image, n_summaries=4, n_chunks=1)
    _, _, s3, s4 = tree["summaries"]
    # the question finds S4's and S3's chunks; step 1 zooms into S1, S2 (no agreement)
    client.handlers[("memory", "search")] = tree_search(tree, [*tree["chunks"][s4], *tree["chunks"][s3]])
    client.handlers[("llm", "action")] = scripted_actions(act("search_chunks", "x", ["S3"], thought="same"),
                                                          act("search_chunks", "y", [], thought="Same!"))
    events = Events()
    out = await execute(new_run(env, events), reasoning_body)
    assert client.count("llm", "action") == 2  # the repeat was the model's last call
    assert any("repeated thought dropped" in line for line in (await morph_state(env.image, out["cycle_id"]))["log"])
    assert ("chunks", "y", None) not in searches_of(client)  # the repeated thought's query is not run
    assert searches_of(client)[-1] == ("chunks", QUESTION, [s4])  # the program zoomed on alone
    assert out["steps"] == 3 and "more than one search" in out["stop"]


async def test_no_search_runs_twice(env, client, settings):
    settings.react_max_steps = 5
    tree = await make_tree(env.image, n_summaries=2)
    client.handlers[("memory", "search")] = tree_search(tree, [])  # the question finds no chunk directly
    client.handlers[("llm", "action")] = scripted_actions(
        act("search_chunks", QUESTION.upper(), ["S1"], thought="a"), act("zoom", "z", ["S1", "S2"], thought="b"))
    out = await execute(new_run(env, events := Events()), reasoning_body)
    seen = searches_of(client)
    assert len(seen) == len({(lv, t.lower(), tuple(w or ())) for lv, t, w in seen})
    assert out["stop"] == "nothing new left to read" and out["chunks"]
    assert events.of("thought")


async def test_the_models_answer_ends_reasoning_once_chunks_exist(env, client):
    tree = await make_tree(env.image, n_summaries=3)
    client.handlers[("memory", "search")] = tree_search(tree, tree["chunks"][tree["summaries"][2]])
    client.handlers[("llm", "action")] = scripted_actions(act("answer"))
    out = await execute(new_run(env, Events()), reasoning_body)
    assert client.count("llm", "action") == 1 and out["steps"] == 2 and out["stop"] == "nothing new left to read"


async def test_one_step_means_no_model_call_and_the_step_cap_holds(env, client, settings):
    tree = await make_tree(env.image, n_summaries=3)
    client.handlers[("memory", "search")] = tree_search(tree, tree["chunks"][tree["summaries"][2]])
    client.handlers[("llm", "action")] = scripted_actions(act("search_chunks", "q"))
    settings.react_max_steps = 1
    out = await execute(new_run(env, Events()), reasoning_body)
    assert client.count("llm", "action") == 0 and out["steps"] == 1 and "step budget" in out["stop"]


async def test_unparseable_output_applies_the_stated_fallback(env, client, audit):
    tree = await make_tree(env.image, n_summaries=4)
    _, _, s3, s4 = tree["summaries"]
    client.handlers[("memory", "search")] = tree_search(tree, tree["chunks"][s4])
    client.handlers[("llm", "action")] = scripted_actions(None)
    events = Events()
    out = await execute(new_run(env, events), reasoning_body)
    assert out["fallback"] and "could not be used" in out["fallback"]
    assert client.count("llm", "action") == 1  # no more asking a model that cannot answer
    assert searches_of(client)[3] == ("chunks", QUESTION, [s3, s4])  # the program goes on alone
    assert any("FALLBACK" in d["text"] for d in events.of("log"))
    assert audit.of("REACT_FALLBACK")[0]["status"] == "FAILURE"
    m = await morph_state(env.image, out["cycle_id"])
    assert any("FALLBACK" in line for line in m["log"])


async def test_no_chunk_anywhere_ends_without_repeating_a_search(env, client):
    tree = await make_tree(env.image, n_summaries=2)
    search = tree_search(tree, [])
    client.handlers[("memory", "search")] = lambda body, ev: search(body, ev) if body["level"] == "summaries" \
        else {"hits": []}
    client.handlers[("llm", "action")] = scripted_actions(act("answer"))
    out = await execute(new_run(env, Events()), reasoning_body)
    assert out["chunks"] == [] and out["stop"] == "nothing new left to read"
    assert len(searches_of(client)) == 3  # summaries, chunks, zoom: nothing else was new


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


FAULTS = [("llm", 1), ("memory", 1), ("memory", 2), ("memory", 3), ("memory", 4), ("memory", 5),
          ("session", 1), ("session", 2), ("session", 4), ("session", 6), ("session", 7), ("session", 8),
          ("session", "commit")]


@pytest.mark.parametrize(("where", "n"), FAULTS)
async def test_a_failure_at_any_step_aborts_reasoning_and_fails_the_cycle(env, client, where, n):
    tree = await make_tree(env.image, n_summaries=3)  # searches disagree: the model is asked once
    s1, _, s3 = tree["summaries"]
    search = tree_search(tree, tree["chunks"][s3], {"lookup chain": tree["chunks"][s1]})
    actions = scripted_actions(act("search_chunks", "lookup chain", ["S3"]))
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


def test_the_thought_prompt_shows_paths_below_the_directory_the_evidence_shares():
    loop = ReactLoop(None, None, "how are rows read?", max_steps=3)  # type: ignore[arg-type]
    for i, (level, path) in enumerate([("summary", "/tmp/q/src/csv/csv.py"), ("chunk", "/tmp/q/src/csv/csv.py")]):
        loop._evidence({"oid": f"o{i}", "level": level, "score": 1.0, "text": "class DictReader: ...",
                        "metadata": {"file_path": path, "start_line": 80, "end_line": 88, "node_name": "DictReader"}},
                       step=1, rank=1)
    prompt = loop.thought_prompt(2)
    assert "S1: csv/csv.py - class DictReader" in prompt and "C1: csv/csv.py:80-88 DictReader" in prompt
    assert "/tmp/q" not in prompt
