"""Kernel: send / define / _doesNotUnderstand_ with a fake BRICK, the real sandbox and a real in-process ZEO."""

from __future__ import annotations

import re
from typing import Any

import msgspec
import pytest
from persistent.list import PersistentList

from batos.errors import ServiceError
from batos.uvm import oid_hex, resolve_oid
from proto.bodies import kernel as K
from services.kernel import dnu
from services.kernel.sandbox import sandbox_available
from tests.unit.test_kernel_cycle import *  # noqa: F403  (the kernel test kit: fixtures)
from tests.unit.test_kernel_cycle import Events

pytestmark = pytest.mark.skipif(not sandbox_available(), reason="no process sandbox here (namespaces unavailable)")

GREET = "def greet(self, who):\n    self.count = self.count + 1\n    return 'hello ' + who + ' from ' + self.owner\n"
MISSION = {"command": "initiate_cognitive_cycle"}


async def make_thing(image: Any, **slots: Any) -> str:
    def make(root: Any, conn: Any) -> str:
        thing = root["prototypes"]["traits"].clone("thing", **(slots or {"owner": "bob", "count": 1}))
        root.setdefault("things", PersistentList()).append(thing)
        conn.add(thing)
        return oid_hex(thing)

    return await image.transact(make)


async def thing(image: Any, oid: str) -> dict[str, Any]:
    def read(root: Any, conn: Any) -> dict[str, Any]:
        obj = resolve_oid(conn, oid)
        m = obj.method_source("greet")
        return {"slots": obj.own_slots(), "methods": obj.method_names(),
                "version": m.version if m else None, "meta": dict(m.meta) if m else None}

    return await image.read(read)


def brick(*replies: str):
    """llm generate replies in order (the last repeats); streams one token event first."""
    seen: list[dict[str, Any]] = []

    async def generate(body: dict[str, Any], on_event: Any) -> dict[str, Any]:
        seen.append(body)
        text = replies[min(len(seen) - 1, len(replies) - 1)]
        if on_event is not None:
            await on_event({"event": "token", "text": text[:5]})
        return {"text": text, "prompt_tokens": 10, "completion_tokens": 20}

    generate.seen = seen  # type: ignore[attr-defined]
    return generate


@pytest.fixture
def services(client):
    client.handlers[("memory", "search")] = lambda body, on_event: {"hits": []}
    return client


async def test_a_found_method_runs_sandboxed_without_the_llm(env, services):
    oid = await make_thing(env.image)
    await env.image.transact(lambda root, conn: resolve_oid(conn, oid).define_method("greet", GREET))
    events = Events()
    out = await dnu.send(env, events, MISSION, oid, "greet", ["ann"], {})
    assert out["result"] == "hello ann from bob" and out["generated"] is False and out["slot_updates"] == ["count"]
    assert events.states() == ["IDLE", "DECOMPOSING", "VALIDATING", "COMPLETE"]
    assert services.count("llm", "generate") == 0
    assert (await thing(env.image, oid))["slots"]["count"] == 2  # the method's slot update was written back


async def test_a_missing_method_is_written_by_brick_validated_run_and_stored(env, services, audit):
    oid = await make_thing(env.image)
    services.handlers[("llm", "generate")] = gen = brick(f"Here you go:\n```python\n{GREET}```\n")
    events = Events()
    out = await dnu.send(env, events, MISSION, oid, "greet", ["ann"], {})
    assert out["result"] == "hello ann from bob" and out["generated"] is True and out["method_version"] == 1
    assert events.states() == ["IDLE", "DECOMPOSING", "REASONING", "SYNTHESIZING", "VALIDATING", "COMPLETE"]
    assert events.of("token")[0]["text"] == "Here "
    stored = await thing(env.image, oid)
    assert stored["methods"] == ["greet"] and stored["version"] == 1
    assert stored["meta"]["cycle_id"] == out["cycle_id"] and stored["meta"]["generated_by"] == "BRICK"
    assert stored["slots"]["count"] == 2
    prompt = gen.seen[0]["messages"][0]["content"]
    assert "obj.greet('ann')" in prompt and prompt.endswith("def greet(self, arg1):") and "self.owner = 'bob'" in prompt
    outcome = audit.of("DNU_OUTCOME")[-1]
    assert outcome["status"] == "SUCCESS" and outcome["mission_type"] == "unhandled_message"
    assert outcome["event_data"]["source"].startswith("def greet") and outcome["event_data"]["llm_prompt"]
    assert outcome["active_persona"] == "BRICK"
    # the next send finds the stored method: no LLM, still sandboxed
    again = await dnu.send(env, Events(), MISSION, oid, "greet", ["cy"], {})
    assert again["result"] == "hello cy from bob" and again["generated"] is False
    assert services.count("llm", "generate") == 1


async def test_garbage_from_brick_is_a_clean_failure_with_its_reason(env, services, audit):
    oid = await make_thing(env.image)
    services.handlers[("llm", "generate")] = gen = brick("server-server-server-server")
    events = Events()
    with pytest.raises(ServiceError) as info:
        await dnu.send(env, events, MISSION, oid, "greet", ["ann"], {})
    assert info.value.code == "rejected" and "no acceptable method after 2 attempts" in info.value.message
    assert "was refused" in gen.seen[1]["messages"][0]["content"]  # the re-ask says why
    assert events.states()[-2:] == ["SYNTHESIZING", "FAILED"]
    assert (await thing(env.image, oid))["methods"] == []
    assert audit.of("DNU_OUTCOME")[-1]["status"] == "FAILURE"
    assert audit.of("CYCLE_END")[-1]["status"] == "FAILURE"


@pytest.mark.parametrize(("code", "kind", "expect"), [
    ("def greet(self, who):\n    return len(who) / 0\n", "sandbox", "ZeroDivisionError"),
    # wall clock and CPU limits are equal: whichever the supervisor sees first names the kill
    ("def greet(self, who):\n    while who:\n        pass\n", "sandbox", "timeout|cpu"),
    ("def greet(self, who):\n    import os\n    return os.getcwd()\n", "rejected", "os"),
])
async def test_a_method_that_fails_or_is_refused_is_not_stored(env, services, settings, code, kind, expect):
    env.settings = settings.model_copy(update={"sandbox_timeout": 1.0})
    oid = await make_thing(env.image)
    services.handlers[("llm", "generate")] = brick(code)
    events = Events()
    with pytest.raises(ServiceError) as info:
        await dnu.send(env, events, MISSION, oid, "greet", ["ann"], {})
    assert info.value.code == kind and re.search(expect, info.value.message)
    assert events.states()[-1] == "FAILED"
    stored = await thing(env.image, oid)
    assert stored["methods"] == [] and stored["slots"]["count"] == 1


async def test_a_reply_that_continues_the_given_signature_is_read_as_its_body(env, services):
    oid = await make_thing(env.image)
    services.handlers[("llm", "generate")] = brick("    return arg1 * 2\n```\nThis doubles it.")
    out = await dnu.send(env, Events(), MISSION, oid, "double", [21], {})
    assert out["result"] == 42 and out["method_source"] == "def double(self, arg1):\n    return arg1 * 2\n"


def test_extract_prefers_a_whole_def_and_refuses_what_is_neither():
    sig = "def double(self, arg1):"
    assert dnu.extract("```python\ndef double(self, x):\n    return x + x\n```", "double", sig).startswith(
        "def double(self, x):")
    assert dnu.extract("return arg1 * 2", "double", sig) == "def double(self, arg1):\n    return arg1 * 2\n"
    with pytest.raises(dnu.code_policy.PolicyViolation):
        dnu.extract("server-server-server", "double", sig)


async def test_define_validates_and_stores_then_send_runs_it(env, services, audit):
    oid = await make_thing(env.image)
    events = Events()
    out = await dnu.define(env, events, MISSION, oid, "greet", GREET)
    assert out["version"] == 1 and out["params"] == ["who"]
    assert events.states() == ["IDLE", "DECOMPOSING", "VALIDATING", "COMPLETE"]
    assert (await dnu.define(env, Events(), MISSION, oid, "greet", GREET))["version"] == 2
    assert (await dnu.send(env, Events(), MISSION, oid, "greet", ["x"], {}))["result"] == "hello x from bob"
    with pytest.raises(ServiceError) as info:
        await dnu.define(env, Events(), MISSION, oid, "greet", "def greet(self):\n    return open('/etc/passwd')\n")
    assert info.value.code == "rejected" and "open" in info.value.message
    assert audit.of("METHOD_DEFINED")
    with pytest.raises(ServiceError, match="data slot #owner"):
        await dnu.define(env, Events(), MISSION, oid, "owner", "def owner(self):\n    return 1\n")


async def test_data_slots_and_read_only_builtins_answer_directly(env, services):
    oid = await make_thing(env.image)
    assert (await dnu.send(env, Events(), MISSION, oid, "owner", [], {}))["result"] == "bob"
    assert (await dnu.send(env, Events(), MISSION, oid, "get_slot", ["count"], {}))["result"] == 1
    with pytest.raises(ServiceError, match="data slot"):
        await dnu.send(env, Events(), MISSION, oid, "owner", [1], {})
    with pytest.raises(ServiceError, match="changes the image"):
        await dnu.send(env, Events(), MISSION, oid, "set_slot", ["count", 3], {})


@pytest.mark.parametrize(("oid", "selector", "code"), [
    ("beef00", "greet", "not_found"),
    ("0", "greet", "bad_args"),
    ("THING", "_secret", "bad_args"),
    ("THING", "__class__", "bad_args"),
])
async def test_bad_input_is_a_clear_error_before_any_cycle(env, services, oid, selector, code):
    oid = await make_thing(env.image) if oid == "THING" else oid
    events = Events()
    with pytest.raises(ServiceError) as info:
        await dnu.send(env, events, MISSION, oid, selector, [], {})
    assert info.value.code == code
    assert events.states() == []


def test_a_selector_that_is_not_an_identifier_is_refused_by_sends_type():
    with pytest.raises(msgspec.ValidationError, match=r"at `\$\.selector`"):
        msgspec.convert({"oid": "0", "selector": "not an identifier"}, K.Send)


NOTHING = "def greet(self, who):\n    who.strip()\n"
BOOM = "def greet(self, who):\n    return who + 1\n"


@pytest.mark.parametrize(("first", "told"), [(NOTHING, "returned None and changed nothing"),
                                             (BOOM, "TypeError")])
async def test_a_method_that_fails_on_the_call_gets_one_retry_told_why(env, services, audit, first, told):
    oid = await make_thing(env.image)
    services.handlers[("llm", "generate")] = gen = brick(first, GREET)
    events = Events()
    out = await dnu.send(env, events, MISSION, oid, "greet", ["ann"], {})
    assert out["result"] == "hello ann from bob" and out["attempts"] == 2
    retry = gen.seen[1]["messages"][0]["content"]
    assert told in retry and "A previous answer was:" in retry and first.splitlines()[1].strip() in retry
    assert events.states() == ["IDLE", "DECOMPOSING", "REASONING", "SYNTHESIZING", "VALIDATING", "COMPLETE"]
    assert (await thing(env.image, oid))["methods"] == ["greet"]


async def test_a_nonsense_method_that_runs_is_not_persisted_as_success(env, services, audit):
    oid = await make_thing(env.image)
    services.handlers[("llm", "generate")] = brick(NOTHING)
    events = Events()
    with pytest.raises(ServiceError) as info:
        await dnu.send(env, events, MISSION, oid, "greet", ["ann"], {})
    assert info.value.code == "rejected" and "after 2 attempts" in info.value.message
    assert "returned None and changed nothing" in info.value.message
    assert events.states()[-1] == "FAILED" and (await thing(env.image, oid))["methods"] == []
    assert audit.of("DNU_OUTCOME")[-1]["status"] == "FAILURE"


async def test_brick_sees_the_other_methods_signatures_and_docstrings(env, services):
    oid = await make_thing(env.image)
    helper = 'def shout(self, text, times=2):\n    """Upper-case text, repeated."""\n    return text.upper() * times\n'
    await env.image.transact(lambda root, conn: resolve_oid(conn, oid).define_method("shout", helper))
    services.handlers[("llm", "generate")] = gen = brick("def greet(self, who):\n    return self.shout(who)\n")
    out = await dnu.send(env, Events(), MISSION, oid, "greet", ["ann"], {})
    assert out["result"] == "ANNANN"
    prompt = gen.seen[0]["messages"][0]["content"]
    assert "self.shout(text, times=2)  -- Upper-case text, repeated." in prompt


@pytest.mark.parametrize("selector", ["lookup", "define_method", "send"])
async def test_selectors_that_shadow_builtins_are_bad_args(env, services, selector):
    oid = await make_thing(env.image)
    with pytest.raises(ServiceError) as info:
        await dnu.define(env, Events(), MISSION, oid, selector, f"def {selector}(self):\n    return 1\n")
    assert info.value.code == "bad_args"
    with pytest.raises(ServiceError) as info:
        await dnu.send(env, Events(), MISSION, oid, selector, [], {})
    assert info.value.code == "bad_args"


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("args", [[_nested(5000)], [_nested(40)], [b"bytes"], [list(range(200_000))]])
async def test_deep_huge_or_non_json_arguments_are_bad_args_before_any_cycle(env, services, args):
    oid = await make_thing(env.image)
    events = Events()
    with pytest.raises(ServiceError) as info:
        await dnu.send(env, events, MISSION, oid, "greet", args, {})
    assert info.value.code == "bad_args" and "arguments of #greet refused" in info.value.message
    assert events.states() == []


@pytest.mark.parametrize(("source", "args", "kwargs", "ignored"), [
    ("def f(self, arg1):\n    return self.count + 1\n", [1], {}, ["arg1"]),
    ("def f(self, a, b):\n    return a\n", [1, 2], {}, ["b"]),
    ("def f(self, a, b=0):\n    return a\n", [1], {}, []),  # b was not passed
    ("def f(self, a, *, k=None):\n    return a\n", [1], {"k": 2}, ["k"]),
    ("def f(self, *rest):\n    return 1\n", [1, 2], {}, []),
    ("def f(self, **kw):\n    return kw\n", [], {"x": 1}, []),
    ("def f(self, text):\n    return len([w for w in text.split()])\n", ["a b"], {}, []),
])
def test_ignored_arguments_are_found_by_parsing(source, args, kwargs, ignored):
    assert dnu.ignored_arguments(source, args, kwargs) == ignored


async def test_a_method_that_ignores_its_arguments_is_retried_and_never_run(env, services):
    oid = await make_thing(env.image)
    services.handlers[("llm", "generate")] = gen = brick("def greet(self, who):\n    return self.count + 1\n", GREET)
    out = await dnu.send(env, Events(), MISSION, oid, "greet", ["ann"], {})
    assert out["result"] == "hello ann from bob" and out["attempts"] == 2
    assert "never reads its argument who" in gen.seen[1]["messages"][0]["content"]
