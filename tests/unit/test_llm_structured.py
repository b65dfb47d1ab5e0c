"""The ReAct action helper: schema, tolerant parser, one re-ask (scripted backend, no model)."""

import json

import msgspec
import pytest

from proto.react import ACTIONS, QUERY_MAX, THOUGHT_MAX, ReactAction, action_schema
from services.forge.backends.base import (
    CANCELLED,
    STOP,
    Backend,
    GenerationParams,
    GenerationResult,
)
from services.forge.structured import action_messages, parse_action, run_action

NAMES = list(ACTIONS)


class Scripted(Backend):
    """Answers with the next scripted text; records what it was asked."""

    name = "scripted"
    supports_json_schema = True

    def __init__(self, replies, finish=STOP):
        self.replies = list(replies)
        self.finish = finish
        self.calls: list[tuple[list, GenerationParams]] = []

    @property
    def context_tokens(self):
        return 0

    def generate(self, persona, messages, params, on_token=None, cancel=None):
        self.calls.append(([dict(m) for m in messages], params))
        text = self.replies.pop(0)
        if on_token:
            on_token(text)
        return GenerationResult(text, 10, 5, 0.01, 0.02, 100.0, None, "scripted", self.finish, params.max_tokens)

    def count_tokens(self, text):
        return len(text.split())

    def adapters(self):
        return {}

    def activate_adapter(self, persona, path, meta=None):
        raise NotImplementedError

    def deactivate_adapter(self, persona):
        return False


def test_schema_bounds_every_string_and_the_array():
    schema = action_schema(NAMES)
    props = schema["properties"]
    assert list(props) == ["thought", "action", "query", "summary_ids"]  # thought before action
    assert props["thought"]["maxLength"] == THOUGHT_MAX == 200
    assert props["query"]["maxLength"] == QUERY_MAX == 120
    assert props["action"]["enum"] == NAMES
    assert props["summary_ids"]["maxItems"] == 3 and "maxLength" in props["summary_ids"]["items"]
    assert schema["additionalProperties"] is False


GOOD = {"thought": "look at summaries", "action": "search_summaries", "query": "broker routing", "summary_ids": []}


@pytest.mark.parametrize(
    "raw",
    [
        json.dumps(GOOD),
        "Sure! Here is my action:\n```json\n" + json.dumps(GOOD, indent=2) + "\n```\nHope that helps.",
        "I think {not json} but then " + json.dumps(GOOD) + " and trailing {",
        '{"thought": "look at summaries", "action": "Search Summaries", "query": "broker routing"}',
        '{"thought": "look at summaries", "action": "search_summaries", "query": "broker routing", "summary_ids": ["a',
        "Thought: look at summaries\nAction: search_summaries\nQuery: broker routing",
    ],
    ids=["plain", "fenced", "prose", "loose-name", "cut-off", "react-lines"],
)
def test_parser_accepts_what_a_model_plausibly_writes(raw):
    action, problem = parse_action(raw, NAMES)
    assert problem == "" and action is not None
    assert action.action == "search_summaries"
    assert action.query == "broker routing"
    assert action.thought == "look at summaries"
    assert isinstance(action.summary_ids, list)


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ("I don't know", "no JSON object"),
        ('{"thought": "x", "action": "delete_everything", "query": "q"}', "action must be one of"),
        ('{"thought": "x", "action": "search_chunks", "query": ""}', "query must not be empty"),
        ("[1, 2, 3]", "no JSON object"),
    ],
)
def test_parser_says_what_was_wrong(raw, problem):
    action, why = parse_action(raw, NAMES)
    assert action is None
    assert problem in why


def test_parser_normalises_fields():
    raw = json.dumps(
        {"THOUGHT": "t" * 500, "action": "answer", "query": 42, "summary_ids": ["a1", 7, "b2", "c3", "d4"], "x": 1}
    )
    action, _ = parse_action(raw, NAMES)
    assert action == ReactAction(thought="t" * THOUGHT_MAX, action="answer", query="42", summary_ids=["a1", "7", "b2"])
    single, _ = parse_action('{"action": "search_chunks", "query": "q", "summary_ids": "ab12"}', NAMES)
    assert single is not None and single.summary_ids == ["ab12"] and single.thought == ""
    answer, _ = parse_action('{"action": "answer"}')  # an answer may come without a query; proto.react's names
    assert answer is not None and answer.query == ""
    long, _ = parse_action(json.dumps({"action": "zoom", "query": "q" * 500, "summary_ids": ["S1"]}))
    assert long is not None and long.query == "q" * QUERY_MAX  # cut to the vocabulary's bound, never refused
    msgspec.convert(msgspec.to_builtins(long), ReactAction)  # within every bound of the type


def test_instructions_go_to_the_end_of_the_last_user_turn():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Question: why?"}]
    out = action_messages(msgs, ACTIONS)
    assert len(out) == 2 and msgs[1]["content"] == "Question: why?"  # the caller's list is not modified
    assert out[1]["content"].startswith("Question: why?\n\n")
    for name in NAMES:
        assert f"- {name}:" in out[1]["content"]
    assert action_messages([{"role": "assistant", "content": "a"}], ACTIONS)[-1]["role"] == "user"


def test_valid_first_time_is_one_constrained_attempt():
    backend = Scripted([json.dumps(GOOD)])
    out = run_action(backend, "BABS", [{"role": "user", "content": "q"}])
    assert out.action is not None and len(out.results) == 1 and out.action.action == "search_summaries"
    params = backend.calls[0][1]
    assert params.json_schema == action_schema(NAMES)
    assert params.repetition_penalty > 1.0


def test_invalid_reply_gets_one_reask_that_names_the_problem():
    backend = Scripted(["server-server-server", json.dumps(GOOD)])
    out = run_action(backend, "BABS", [{"role": "user", "content": "q"}])
    assert out.action is not None and len(out.results) == 2
    reask = backend.calls[1][0]
    assert reask[-2] == {"role": "assistant", "content": "server-server-server"}
    assert "no JSON object" in reask[-1]["content"]


def test_two_failures_give_valid_false_and_the_raw_text():
    backend = Scripted(["nope", "still nope"])
    out = run_action(backend, "BABS", [{"role": "user", "content": "q"}])
    assert out.action is None and out.results[-1].text == "still nope" and len(out.results) == 2


def test_without_the_helper_there_is_no_schema_and_no_reask():
    backend = Scripted(["nope"])
    out = run_action(backend, "BABS", [{"role": "user", "content": "q"}], constrained=False, reask=False)
    assert len(out.results) == 1 and out.action is None
    assert backend.calls[0][1].json_schema is None


def test_a_cancelled_generation_is_not_reasked():
    backend = Scripted(["{", "unused"], finish=CANCELLED)
    out = run_action(backend, "BABS", [{"role": "user", "content": "q"}])
    assert len(out.results) == 1


def test_custom_actions_restrict_the_enum():
    backend = Scripted(['{"thought": "t", "action": "search_summaries", "query": "q", "summary_ids": []}'] * 2)
    out = run_action(backend, "BABS", [{"role": "user", "content": "q"}], actions={"answer": "reply now"})
    assert backend.calls[0][1].json_schema["properties"]["action"]["enum"] == ["answer"]
    assert out.action is None and "action must be one of ['answer']" in out.problem
