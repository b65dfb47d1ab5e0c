"""Kernel: the Token Governor's budgeted prompt, degenerate answers, citations, whole question cycles and the
Two-Cycle Genesis, with fake llm/memory services over a real in-process ZEO."""

from __future__ import annotations

import random
from typing import Any

import pytest

from batos.errors import ServiceError
from proto import ErrorCode
from services.kernel import commands, degenerate, genesis, governor
from services.kernel.autotelic import Autotelic
from services.kernel.kernel import Kernel
from services.kernel.react import Evidence
from tests.unit.test_kernel_cycle import *  # noqa: F403  (the kernel test kit: fixtures)
from tests.unit.test_kernel_cycle import Events, cycle_slots
from tests.unit.test_kernel_react import act, make_corpus, memory_search, scripted_actions

# -- degenerate answers --------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "bad"), [
    ("", True), ("   \n ", True), ("...", True),
    ("server-server-server-server-server-server", True),
    ("a b c d e f a b c d e f a b c d e f a b c d e f", True),
    ("z" * 500, True),
    ("The kernel opens one session for REASONING and commits it at the end [C1].", False),
    ("UvmObject.lookup walks the receiver's slots, then its methods, then each parent depth first.", False),
])
def test_degenerate_answers_are_recognised(text, bad):
    assert degenerate.check(text).degenerate is bad


def test_a_loop_after_a_good_opening_keeps_the_opening():
    good = "The Image gives every unit of work a thread that owns its connection, so asyncio never blocks on ZODB."
    v = degenerate.check(good + " and and and and and and and and and and")
    assert v.degenerate and v.prefix.startswith("The Image gives") and "and and" not in v.prefix


# -- the Token Governor ---------------------------------------------------------------------------


def ev(label: str, level: str, text: str, score: float, path: str = "a.py", start: int = 1) -> Evidence:
    return Evidence(label=label, oid=label.lower(), level=level, score=score, text=text,
                    metadata={"file_path": path, "start_line": start, "end_line": start + 9, "node_name": "f"},
                    token_count=0, summary_oid=None, child_oids=[], step=1)


def corpus(n_s: int, n_c: int, words: int) -> tuple[list[Evidence], list[Evidence]]:
    rnd = random.Random(n_s * 100 + n_c)
    body = lambda: " ".join(rnd.choice(["def", "self", "lookup", "slot", "return", "x", "(", ")"])
                            for _ in range(words))
    s = [ev(f"S{i}", "summary", body(), 1 - i / 10) for i in range(1, n_s + 1)]
    c = [ev(f"C{i}", "chunk", body(), 1 - i / 10, start=10 * i) for i in range(1, n_c + 1)]
    return s, c


@pytest.mark.parametrize("budget", [40, 120, 300, 700, 1200, 3000])
@pytest.mark.parametrize(("n_s", "n_c", "words"), [(0, 0, 10), (3, 6, 40), (6, 12, 200), (1, 1, 2000)])
def test_the_prompt_is_never_over_budget(budget, n_s, n_c, words):
    s, c = corpus(n_s, n_c, words)
    out = governor.assemble("Answer.", "how does lookup work?", s, c, budget)
    assert out.used_tokens == governor.count_tokens(out.prompt) <= budget
    assert out.sections["total"] == out.used_tokens
    assert {e.label for e in (*out.summaries, *out.chunks)} | set(out.dropped) == {e.label for e in (*s, *c)}


def test_summaries_come_first_then_the_best_chunks():
    s, c = corpus(2, 5, 30)
    out = governor.assemble("Answer.", "q?", s, c, 400)
    assert out.prompt.index("[S1]") < out.prompt.index("[S2]") < out.prompt.index("[C1]")
    assert [e.label for e in out.chunks] == [e.label for e in c][: len(out.chunks)]  # by score, best first
    assert out.sections["summaries"] > 0 and out.sections["chunks"] > 0
    assert out.sections["summaries"] <= 0.4 * 400  # summaries leave room for code


def test_a_huge_question_still_fits():
    out = governor.assemble("Answer.", "why " * 3000, *corpus(2, 2, 20), 200)
    assert out.used_tokens <= 200 and not out.chunks and not out.summaries and out.cut == ["question"]


def test_a_chunk_too_big_for_the_room_is_skipped_and_smaller_ones_still_fit():
    s, c = corpus(0, 3, 20)
    c[0].text = "x = 1\n" * 400  # the best-ranked chunk is far over the budget
    out = governor.assemble("Answer.", "q?", s, c, 300)
    assert [e.label for e in out.chunks] == ["C2", "C3"] and out.dropped == ["C1"]


# -- whole question cycles -------------------------------------------------------------------------


def robin(*texts: str):
    seen: list[dict[str, Any]] = []

    async def generate(body: dict[str, Any], on_event: Any) -> dict[str, Any]:
        seen.append(body)
        text = texts[min(len(seen) - 1, len(texts) - 1)]
        for word in text.split(" "):
            await on_event({"event": "token", "text": word + " "})
        return {"text": text, "prompt_tokens": 100, "completion_tokens": len(text.split())}

    generate.seen = seen  # type: ignore[attr-defined]
    return generate


@pytest.fixture
def kernel(env):
    return Kernel(env, Autotelic(env))


@pytest.fixture
async def system(env, client):
    corp = await make_corpus(env.image)
    client.handlers[("memory", "search")] = memory_search(corp)
    client.handlers[("llm", "action")] = scripted_actions(act("search_summaries", "lookup"),
                                                          act("zoom", "lookup", ["S1"]), act("answer"))
    return corp


ANSWER = "UvmObject.lookup searches the slots first and then the parents [C1]."


async def test_ask_streams_the_answer_and_cites_every_chunk_it_used(kernel, client, system, audit, env):
    client.handlers[("llm", "generate")] = gen = robin(ANSWER)
    events = Events()
    out = await commands.dispatch(kernel, events, commands.from_console("ask", {"question": "how does lookup work?"}))
    assert out["status"] == "SUCCESS" and out["answer"].startswith(ANSWER)
    assert events.states() == ["IDLE", "DECOMPOSING", "REASONING", "SYNTHESIZING", "VALIDATING", "COMPLETE"]
    assert "".join(d["text"] for d in events.of("token")).strip() == ANSWER
    assert [c["where"] for c in out["citations"]] == ["batos/uvm.py:1-9", "batos/uvm.py:11-19"]
    for c in out["citations"]:
        assert f"[{c['label']}] {c['where']}" in out["answer"]  # the answer itself names file:lines
        assert c["where"] in gen.seen[0]["messages"][0]["content"]  # ... of chunks that were in the prompt
    budget = audit.of("PROMPT_BUDGET")[0]
    assert budget["event_data"]["used_tokens"] <= env.settings.answer_budget_tokens
    assert {"system", "question", "summaries", "chunks", "total"} <= set(budget["event_data"]["sections"])
    assert gen.seen[0]["persona"] == "ROBIN"
    slots = await cycle_slots(env.image, out["cycle_id"], "status", "result", "query_morph")
    assert slots["status"] == "SUCCESS" and slots["result"]["answer"] == out["answer"] and slots["query_morph"]
    assert audit.of("CYCLE_END")[-1]["event_data"]["output"] == out["answer"]
    assert 0 <= out["timing"]["other_share"] <= 1


async def test_a_looping_answer_degrades_to_the_evidence_with_a_note(kernel, client, system):
    client.handlers[("llm", "generate")] = robin("server-server-server-server-server-server-server")
    out = await commands.dispatch(kernel, Events(), commands.from_console("ask", {"question": "how?"}))
    assert out["status"] == "SUCCESS_DEGRADED"
    assert "repetition loop" in out["answer"] and "batos/uvm.py:1-9" in out["answer"]
    assert any("replying with the retrieved evidence" in n for n in out["notes"])
    assert out["citations"]  # the evidence is still cited


async def test_an_answer_without_any_retrieved_chunk_is_degraded(kernel, client, env):
    client.handlers[("memory", "search")] = lambda body, ev: {"hits": []}
    client.handlers[("llm", "action")] = scripted_actions(act("answer"))
    client.handlers[("llm", "generate")] = robin(ANSWER)
    out = await commands.dispatch(kernel, Events(), commands.from_console("ask", {"question": "how?"}))
    assert out["status"] == "SUCCESS_DEGRADED" and out["citations"] == []
    assert any("not grounded" in n for n in out["notes"])


async def test_a_failure_after_reasoning_fails_the_cycle_but_keeps_the_committed_reasoning(kernel, client, env,
                                                                                          system):
    def down(body: dict[str, Any], on_event: Any) -> dict[str, Any]:
        raise ServiceError(ErrorCode.UNAVAILABLE, "llm worker lost")

    client.handlers[("llm", "generate")] = down
    events = Events()
    with pytest.raises(ServiceError, match="FAILED in SYNTHESIZING: llm worker lost"):
        await commands.dispatch(kernel, events, commands.from_console("ask", {"question": "how?"}))
    cycle_id = events.items[0][1]["cycle_id"]
    slots = await cycle_slots(env.image, cycle_id, "psm_state", "query_morph")
    assert slots["psm_state"] == "FAILED" and slots["query_morph"] is not None


# -- Two-Cycle Genesis ---------------------------------------------------------------------------


META = "Explain BAT OS to the Architect: its processes, UvmObject, the ReAct cycle and the forge."


async def test_display_yourself_runs_two_linked_cycles(kernel, client, system, env):
    client.handlers[("llm", "generate")] = gen = robin(META, ANSWER)
    events = Events()
    out = await commands.dispatch(kernel, events, commands.from_console("display_yourself", {}))
    plan_id, show_id = out["cycle_ids"]
    assert out["cycle_id"] == show_id and out["parent_cycle"] == plan_id and out["meta_prompt"] == META
    assert events.states(plan_id)[-1] == "COMPLETE" and events.states(show_id)[-1] == "COMPLETE"
    assert (await cycle_slots(env.image, show_id, "parent_cycle"))["parent_cycle"] == plan_id
    assert (await cycle_slots(env.image, plan_id, "child_cycles"))["child_cycles"] == [show_id]
    assert [b["persona"] for b in gen.seen] == ["BRICK", "ROBIN"]
    actions = client.handlers[("llm", "action")].seen
    assert any(META in b["messages"][0]["content"] for b in actions)  # cycle 2 reasons over the meta-prompt
    assert out["answer"].startswith(ANSWER) and out["citations"]


async def test_an_unusable_meta_prompt_falls_back_to_the_stated_template(kernel, client, system):
    client.handlers[("llm", "generate")] = robin("", ANSWER)
    events = Events()
    out = await commands.dispatch(kernel, events, commands.from_console("display_yourself", {}))
    assert out["plan_status"] == "SUCCESS_DEGRADED"
    assert out["meta_prompt"].startswith("Explain to the Architect") and "batos/uvm.py" in out["meta_prompt"]
    assert any("template meta-prompt" in n for n in out["notes"])
    assert any("FALLBACK" in d["text"] for d in events.of("log"))


def test_template_meta_prompt_names_the_files_cycle_one_found():
    reply = {"evidence": [{"where": "batos/uvm.py:1-9"}, {"where": "batos/uvm.py:11-19"}, {"where": "x.py"}]}
    assert "batos/uvm.py, x.py" in genesis.template_meta_prompt(reply)
