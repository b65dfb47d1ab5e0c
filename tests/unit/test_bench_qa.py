"""bench/qa.py's scoring: gold lines from the AST, what counts as cited, first and named."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from bench import qa
from bench.qa_questions import CODEBASES, QUESTIONS

SRC = '''import functools


class Sniffer:
    """Guess a format."""

    @functools.cache
    def has_header(self, sample):
        def rows():
            return sample.splitlines()
        return bool(rows())

    def __next__(self):
        return 1
'''


def test_definitions_give_each_qualified_name_its_lines_decorators_included(tmp_path: Path):
    path = tmp_path / "pkg" / "mod.py"
    path.parent.mkdir()
    path.write_text(SRC)
    defs = qa.definitions(path)
    assert defs["Sniffer"] == (4, 14)
    assert defs["Sniffer.has_header"] == (7, 11) and defs["Sniffer.has_header.rows"] == (9, 10)
    gold = qa.Gold("pkg/mod.py", "Sniffer.has_header", *defs["Sniffer.has_header"])
    assert gold.hit(f"{tmp_path}/pkg/mod.py", 10, 20) and gold.hit("/x/pkg/mod.py", 1, 7)
    assert not gold.hit("/x/pkg/mod.py", 12, 14) and not gold.hit("/x/other/mod.py", 7, 11)
    assert not gold.hit("/x/pkg/mod.py", None, None)
    assert gold.name == "has_header" and qa.Gold("pkg/mod.py", "Sniffer.__next__", 13, 14).name == "Sniffer"


def test_scoring_reads_citations_in_order_and_names_in_the_prose_only():
    gold = [qa.Gold("pkg/mod.py", "Sniffer.has_header", 7, 11)]
    reply = {"status": "SUCCESS", "model_text": "It splits the sample.",
             "answer": "It splits the sample.\n\nSources:\n[E2] /a/pkg/mod.py:7-11 (has_header)",
             "citations": [{"file_path": "/a/pkg/mod.py", "start_line": 1, "end_line": 3},
                           {"file_path": "/a/pkg/mod.py", "start_line": 7, "end_line": 11}]}
    row = qa.score_ask(reply, gold, 12.0, "")
    assert row["cited"] and not row["first"] and not row["named"] and not row["named_body"]
    assert not row["ungrounded"]
    row = qa.score_ask({**reply, "model_text": "has_header() splits it [E2]", "citations": reply["citations"][:1]},
                       gold, 1.0, "")
    assert row["named"] and row["ungrounded"]  # SUCCESS citing no gold
    assert qa.score_ask({}, gold, 3.0, "ServiceError: boom")["status"] == "error"


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="the questions' gold names are CPython 3.11's")
def test_every_questions_gold_exists_in_the_stdlib_copy(tmp_path: Path):
    qa.copy_codebases(tmp_path, list(CODEBASES))
    assert len(QUESTIONS) >= 40 and len({q.codebase for q in QUESTIONS}) >= 3
    for question in QUESTIONS:
        golds = qa.resolve_gold(tmp_path / question.codebase, question)
        assert golds and all(g.start <= g.end for g in golds)
        # never names the function (a plain word such as `send` may still describe the behaviour)
        coined = [g.name for g in golds if "_" in g.name or g.name != g.name.lower()]
        assert not any(name in question.text for name in coined), question.text


def test_the_profile_splits_an_ask_by_state_and_reads_each_generation(tmp_path: Path):
    from bench import qa_profile

    trace = [(0.0, {"event": "state", "state": "IDLE"}), (0.1, {"event": "state", "state": "REASONING"}),
             (0.5, {"event": "state", "state": "SYNTHESIZING"}), (8.5, {"event": "token", "text": "S"}),
             (9.0, {"event": "token", "text": "x"}), (10.0, {"event": "state", "state": "VALIDATING"}),
             (10.1, {"event": "log", "text": "answer rejected (x); one retry with 2 piece(s) of evidence"}),
             (11.1, {"event": "token", "text": "S"}), (12.0, {"event": "state", "state": "COMPLETE"})]
    assert qa_profile.phases(trace, 12.5) == {"IDLE": 0.1, "REASONING": 0.4, "SYNTHESIZING": 9.5,
                                              "VALIDATING": 2.0, "COMPLETE": 0.5}
    assert qa_profile.first_tokens(trace) == [8.0, 1.0]
    log = tmp_path / "forge.log"
    log.write_text("old line\n")
    offset = qa_profile.log_size(log)
    with log.open("a") as f:
        f.write("x INFO services.forge.backends.llamacpp: generate ROBIN: prompt 640 tokens (108 reused from the KV "
                "cache), 37 generated, TTFT 8.10 s, total 11.50 s, stop\n")
    assert qa_profile.generations(log, offset) == [{"persona": "ROBIN", "prompt": 640, "reused": 108,
                                                    "generated": 37, "ttft_s": 8.1, "total_s": 11.5}]
    assert qa_profile.generations(log, qa_profile.log_size(log)) == []
    assert qa_profile.cpu_used({"a": 1.0}, {"a": 3.5, "b": 1.0}) == {"a": 2.5}
