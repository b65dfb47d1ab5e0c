"""A parseable ReAct action from a small model: a JSON schema, constrained decoding, a tolerant parser
and one re-ask.

SmolLM2-135M asked for a JSON action without constraints produced 0 of 5 valid; with xgrammar
constraining the tokens to the schema, output is valid JSON unless it runs out of tokens inside a
string, so the schema bounds every string (maxLength) and the array (maxItems), and the generation
gets a mild repetition penalty. The parser then accepts what a model plausibly writes (code fences,
prose around the object, a cut-off tail, ``Action: x`` lines) and normalises it; if that still fails the
model is asked once more, told what was wrong. The same path serves the openai backend, which passes
the schema as ``response_format``.

The vocabulary (action names, the schema and its bounds) is proto.react's, the one the kernel's loop uses.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from proto.react import (
    ACTIONS,
    ANSWER,
    QUERY_MAX,
    SUMMARY_ID_MAX,
    SUMMARY_IDS_MAX,
    THOUGHT_MAX,
    ReactAction,
    action_schema,
)
from services.forge.backends.base import (
    CANCELLED,
    TIMEOUT,
    Backend,
    GenerationParams,
    GenerationResult,
    Messages,
    TokenCallback,
)

ACTION_REPETITION_PENALTY = 1.1  # mild: breaks "server-server-server" loops without mangling JSON


def action_instructions(actions: Mapping[str, str]) -> str:
    lines = [
        "Decide the next step. Reply with one JSON object and nothing else, in this form:",
        '{"thought": "<why, one sentence>", "action": "<action>", "query": "<search text>", "summary_ids": []}',
        "Actions:",
        *(f"- {name}: {description}" for name, description in actions.items()),
    ]
    return "\n".join(lines)


def action_messages(messages: Messages, actions: Mapping[str, str]) -> list[dict[str, str]]:
    """The conversation with the action instructions at the end of the last user turn (a 135M model
    follows what it read last)."""
    out = [{"role": m["role"], "content": m["content"]} for m in messages]
    instructions = action_instructions(actions)
    if out and out[-1]["role"] == "user":
        out[-1]["content"] = f"{out[-1]['content']}\n\n{instructions}"
    else:
        out.append({"role": "user", "content": instructions})
    return out


# -- parsing --------------------------------------------------------------------------------------

_FENCE = re.compile(r"```(?:json)?\s*(.*?)(?:```|$)", re.S)
_LINE_FIELD = re.compile(r"^\s*(thought|action|query|summary_ids)\s*[:=]\s*(.+?)\s*$", re.I | re.M)
_CLOSERS = ("", "}", '"}', "]}", '"]}', '""}')


def _objects(text: str) -> Iterable[dict[str, Any]]:
    """Every JSON object that decodes from some '{' in the text, then repaired cut-off tails."""
    decoder = json.JSONDecoder()
    starts = [i for i, ch in enumerate(text) if ch == "{"]
    for i in starts:
        try:
            obj, _ = decoder.raw_decode(text, i)
        except ValueError:
            continue
        if isinstance(obj, dict):
            yield obj
    if starts:  # output that ran out of tokens: try closing what is open
        tail = re.sub(r",\s*$", "", text[starts[0] :].rstrip())
        for closer in _CLOSERS[1:]:
            try:
                obj = json.loads(tail + closer)
            except ValueError:
                continue
            if isinstance(obj, dict):
                yield obj
                return


def _line_fields(text: str) -> dict[str, Any]:
    """``Thought: ... / Action: ... / Query: ...`` lines, the classic ReAct format."""
    return {m.group(1).lower(): m.group(2).strip().strip('"') for m in _LINE_FIELD.finditer(text)}


def _action_name(value: Any, names: list[str]) -> str | None:
    if not isinstance(value, str):
        return None
    key = re.sub(r"[\s\-]+", "_", value.strip().strip("[]()'\"").lower())
    for name in names:
        if key == name.lower():
            return name
    return None


def _ids(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str | int):
        value = [value]
    if not isinstance(value, list):
        return []
    return [str(v)[:SUMMARY_ID_MAX] for v in value if isinstance(v, str | int) and str(v)][:SUMMARY_IDS_MAX]


def normalize_action(obj: Mapping[str, Any], names: list[str]) -> tuple[ReactAction | None, str]:
    fields = {str(k).strip().lower(): v for k, v in obj.items()}
    name = _action_name(fields.get("action"), names)
    if name is None:
        return None, f"action must be one of {names}, got {fields.get('action')!r}"
    query = fields.get("query")
    query = str(query).strip() if isinstance(query, str | int | float) else ""
    if not query and name != ANSWER:
        return None, f"query must not be empty for {name}"
    thought = fields.get("thought")
    # convert, not the constructor: the bounds are checked, so a limit here can never outgrow proto.react's
    return msgspec.convert({
        "thought": (str(thought).strip() if isinstance(thought, str | int | float) else "")[:THOUGHT_MAX],
        "action": name,
        "query": query[:QUERY_MAX],
        "summary_ids": _ids(fields.get("summary_ids")),
    }, ReactAction), ""


def parse_action(raw: str, actions: Iterable[str] = ACTIONS) -> tuple[ReactAction | None, str]:
    """(action, "") or (None, what was wrong)."""
    names = list(actions)
    text = raw.strip()
    fenced = _FENCE.search(text)
    candidates = [fenced.group(1), text] if fenced else [text]
    problem = "no JSON object found"
    for candidate in candidates:
        for obj in _objects(candidate):
            action, problem = normalize_action(obj, names)
            if action is not None:
                return action, ""
    fields = _line_fields(text)
    if "action" in fields:
        action, problem = normalize_action(fields, names)
        if action is not None:
            return action, ""
    return None, problem


# -- the helper: generate, parse, re-ask once -------------------------------------------------------


@dataclass
class ActionOutcome:
    action: ReactAction | None  # None: no attempt parsed
    problem: str  # what was wrong with the last attempt ("" when it parsed)
    results: list[GenerationResult]  # one per attempt; the last one's text is the raw output


def run_action(
    backend: Backend,
    persona: str,
    messages: Messages,
    *,
    actions: Mapping[str, str] | None = None,
    max_tokens: int = 256,
    temperature: float = 0.0,
    deadline: float | None = None,
    constrained: bool = True,
    reask: bool = True,
    on_token: TokenCallback | None = None,
    cancel: threading.Event | None = None,
) -> ActionOutcome:
    """Blocking: generate, parse, ask once more if it did not parse (``reask``)."""
    actions = dict(actions or ACTIONS)
    names = list(actions)
    convo = action_messages(messages, actions)
    params = GenerationParams(
        max_tokens=max_tokens,
        temperature=temperature,
        json_schema=action_schema(names) if constrained and backend.supports_json_schema else None,
        repetition_penalty=ACTION_REPETITION_PENALTY if constrained else 1.0,
        deadline=deadline,
    )
    results: list[GenerationResult] = []
    attempts_allowed = 2 if reask else 1
    action: ReactAction | None = None
    problem = ""
    for attempt in range(1, attempts_allowed + 1):
        result = backend.generate(persona, convo, params, on_token, cancel)
        results.append(result)
        action, problem = parse_action(result.text, names)
        if action is not None or result.finish_reason in (CANCELLED, TIMEOUT) or attempt == attempts_allowed:
            break
        convo = [
            *convo,
            {"role": "assistant", "content": result.text},
            {"role": "user", "content": f"That reply was not usable: {problem}. Reply with only the JSON object."},
        ]
    return ActionOutcome(action, problem, results)
