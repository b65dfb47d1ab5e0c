"""One ReAct vocabulary (proto/react.py): the kernel's loop, the llm service's constrained decoding and parser,
and the forge's evaluation all use the same action names and bounds. Each test here fails if one side grows its
own copy or a bound drifts."""

from __future__ import annotations

import json
import typing

import msgspec
import pytest

from proto import contract, react
from proto.bodies import llm
from services.forge import evaluation, structured


def _schema_of(struct: type) -> dict[str, typing.Any]:
    schema = msgspec.json.schema(struct)
    return dict(schema["$defs"][struct.__name__]["properties"])


def test_the_names_are_one_list():
    assert list(react.ACTIONS) == list(typing.get_args(react.ActionName))
    assert react.ANSWER in react.ACTIONS


def test_the_constrained_schema_has_the_types_bounds():
    """What the model is constrained to (action_schema) is what the wire type accepts (ReactAction)."""
    constrained = react.action_schema()["properties"]
    typed = _schema_of(react.ReactAction)
    assert list(constrained) == list(typed)  # same fields, same order ("thought" first)
    assert constrained["thought"]["maxLength"] == typed["thought"]["maxLength"] == react.THOUGHT_MAX
    assert constrained["query"]["maxLength"] == typed["query"]["maxLength"] == react.QUERY_MAX
    assert constrained["summary_ids"]["maxItems"] == typed["summary_ids"]["maxItems"] == react.SUMMARY_IDS_MAX
    assert (constrained["summary_ids"]["items"]["maxLength"] == typed["summary_ids"]["items"]["maxLength"]
            == react.SUMMARY_ID_MAX)
    assert constrained["action"]["enum"] == list(react.ACTIONS)  # in the order the prompt lists them
    assert sorted(typed["action"]["enum"]) == sorted(react.ACTIONS)


def test_a_caller_cannot_send_another_vocabulary():
    """The kernel used to send its own action list (with ``zoom``) while the forge defaulted to another."""
    spec = contract.spec("llm", "action")
    assert spec is not None and spec.request is llm.Action and "actions" not in llm.Action.__struct_fields__
    with pytest.raises(Exception, match="unknown field `actions`"):
        contract.decode_request(spec, {"messages": [{"role": "user", "content": "q"}], "actions": {"x": "y"}})
    prompt = structured.action_instructions(react.ACTIONS)
    assert all(f"- {name}: {text}" in prompt for name, text in react.ACTIONS.items())


@pytest.mark.parametrize("name", list(react.ACTIONS))
def test_every_action_the_model_may_write_reaches_the_kernel_as_a_react_action(name):
    """Model text at the worst of its bounds -> the llm service's parser -> the wire -> the kernel's type."""
    written = {"thought": "t" * 999, "action": name, "query": "q" * 999, "summary_ids": ["S1", "x" * 99, "S3", "S4"]}
    action, problem = structured.parse_action(json.dumps(written))
    assert problem == "" and action is not None and action.action == name
    reply = llm.ActionReply(action=action, valid=True, raw="", attempts=1)
    spec = contract.spec("llm", "action")
    assert spec is not None
    back = contract.decode_reply(spec, json.loads(json.dumps(contract.encode_reply(spec, reply))))
    assert isinstance(back, llm.ActionReply) and back.action == action
    assert len(action.query) == react.QUERY_MAX and len(action.thought) == react.THOUGHT_MAX
    assert len(action.summary_ids) == react.SUMMARY_IDS_MAX
    assert max(map(len, action.summary_ids)) <= react.SUMMARY_ID_MAX
    assert evaluation.is_react_action(json.dumps(written))  # the adapter's format score counts it valid


def test_a_reply_outside_the_vocabulary_is_refused_at_the_kernels_boundary():
    spec = contract.spec("llm", "action")
    assert spec is not None
    for action in ({"action": "delete_everything"}, {"action": "answer", "query": "q" * (react.QUERY_MAX + 1)}):
        with pytest.raises(Exception, match="outside its contract"):
            contract.decode_reply(spec, {"action": action, "valid": True, "raw": "", "attempts": 1})
