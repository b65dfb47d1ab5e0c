"""LLMEngine: the typed bodies, the one-at-a-time queue, cancellation, timeouts, adapters across restarts.

A fake backend stands in for the model (it sleeps per token and honours cancel/deadline like the real
ones), so these run in well under a second each.
"""

import asyncio
import json
import threading
import time

import pytest

import proto
from batos import personas
from proto import contract
from proto.bodies import llm as bodies
from services.forge.backends.base import (
    CANCELLED,
    LENGTH,
    TIMEOUT,
    Backend,
    BackendError,
    GenerationResult,
)
from services.forge.generation import AdapterRegistry, LLMEngine

TOKEN_S = 0.01


class SlowFake(Backend):
    name = "fake"
    model_name = "fake-1"

    def __init__(self, words=("alpha", " beta", " gamma")):
        self.words = list(words)
        self.active: dict[str, dict] = {}
        self.running = 0
        self.max_running = 0
        self.seen: list[tuple[str, list]] = []
        self._lock = threading.Lock()

    @property
    def context_tokens(self):
        return 100

    def generate(self, persona, messages, params, on_token=None, cancel=None):
        with self._lock:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        try:
            self.seen.append((persona, [dict(m) for m in messages]))
            text, reason = "", LENGTH
            for i in range(params.max_tokens):
                if cancel is not None and cancel.is_set():
                    reason = CANCELLED
                    break
                if params.deadline is not None and time.monotonic() > params.deadline:
                    reason = TIMEOUT
                    break
                time.sleep(TOKEN_S)
                piece = self.words[i % len(self.words)]
                text += piece
                if on_token:
                    on_token(piece)
            adapter = self.active.get(persona, {}).get("name")
            return GenerationResult(text, 7, len(text), 0.01, 0.05, 20.0, adapter, self.model_name, reason, 0)
        finally:
            with self._lock:
                self.running -= 1

    def count_tokens(self, text):
        return len(text.split())

    def adapters(self):
        return dict(self.active)

    def activate_adapter(self, persona, path, meta=None):
        if "missing" in path:
            raise BackendError(proto.ErrorCode.BAD_ARGS, f"adapter path {path!r} is not a directory")
        self.active[persona] = {"path": path, "name": f"{persona.lower()}_1", "meta": meta or {}}
        return self.active[persona]

    def deactivate_adapter(self, persona):
        return self.active.pop(persona, None) is not None


def decoded(command, raw):
    """The request as the worker decodes it at the boundary (proto.contract)."""
    return contract.decode_request(contract.spec("llm", command), raw)


def body(command="generate", **kw):
    return decoded(command, {"persona": "ROBIN", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                             **kw})


async def test_generate_streams_tokens_and_replies_with_the_contract_fields():
    backend = SlowFake()
    engine = LLMEngine(backend)
    tokens: list[str] = []
    reply = await engine.generate(body(persona="brick"), on_token=tokens.append)
    assert isinstance(reply, bodies.GenerateReply)
    assert "".join(tokens) == reply.text == "alpha beta gamma"
    assert reply.prompt_tokens == 7 and reply.completion_tokens == len(reply.text) and reply.tokens_per_s == 20.0
    assert reply.persona == "BRICK" and reply.model == "fake-1" and reply.queue_s >= 0 and reply.adapter is None
    persona, messages = backend.seen[0]
    assert persona == "BRICK"
    assert messages[0] == {"role": "system", "content": personas.PERSONAS["BRICK"]}


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"persona": "JOKER"}, "unknown persona 'JOKER'"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "role"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"stop": "END"}, "stop"),
        ({"timeout": 0}, "timeout"),
    ],
)
async def test_bad_arguments_are_bad_args_naming_the_field(bad, message):
    with pytest.raises(proto.ProtocolError) as err:
        body(**bad)  # refused where the worker decodes it: the engine never sees it
    assert err.value.code == proto.ErrorCode.BAD_ARGS
    assert message in err.value.message


async def test_generations_run_one_at_a_time_in_arrival_order():
    backend = SlowFake()
    engine = LLMEngine(backend)
    order: list[int] = []

    async def one(i):
        await engine.generate(body(messages=[{"role": "user", "content": str(i)}]))
        order.append(i)

    tasks = []
    for i in range(4):
        tasks.append(asyncio.create_task(one(i)))
        await asyncio.sleep(0)  # let each enqueue before the next
    await asyncio.gather(*tasks)
    assert backend.max_running == 1
    assert order == [0, 1, 2, 3]


async def test_cancel_stops_a_running_generation():
    engine = LLMEngine(SlowFake())
    cancelled = threading.Event()
    tokens: list[str] = []

    def on_token(t):
        tokens.append(t)
        if len(tokens) == 2:
            cancelled.set()

    with pytest.raises(BackendError) as err:
        await engine.generate(body(max_tokens=1000), on_token=on_token, cancelled=cancelled)
    assert err.value.code == proto.ErrorCode.CANCELLED
    assert len(tokens) == 2


async def test_a_request_cancelled_while_queued_leaves_the_queue():
    backend = SlowFake()
    engine = LLMEngine(backend)
    first = asyncio.create_task(engine.generate(body(max_tokens=30)))
    await asyncio.sleep(0.02)
    cancelled = threading.Event()
    second = asyncio.create_task(engine.generate(body(), cancelled=cancelled))
    await asyncio.sleep(0.02)
    assert engine.queue.waiting == 1
    cancelled.set()
    with pytest.raises(BackendError) as err:
        await second
    assert err.value.code == proto.ErrorCode.CANCELLED and "queued" in err.value.message
    assert (await first).completion_tokens > 0
    assert len(backend.seen) == 1  # the cancelled one never reached the model


async def test_asyncio_cancellation_of_the_handler_stops_the_thread():
    backend = SlowFake()
    engine = LLMEngine(backend)
    cancelled = threading.Event()
    task = asyncio.create_task(engine.generate(body(max_tokens=10_000), cancelled=cancelled))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cancelled.is_set()
    deadline = time.monotonic() + 1
    while backend.running and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert backend.running == 0
    assert not engine.queue.busy


async def test_timeout_covers_queue_wait_and_generation():
    engine = LLMEngine(SlowFake(), request_timeout=60)
    started = time.monotonic()
    with pytest.raises(BackendError) as err:
        await engine.generate(body(max_tokens=10_000, timeout=0.1))
    assert err.value.code == proto.ErrorCode.TIMEOUT and "0.1 s timeout" in err.value.message
    assert time.monotonic() - started < 1.0

    blocker = asyncio.create_task(engine.generate(body(max_tokens=40)))
    await asyncio.sleep(0.01)
    with pytest.raises(BackendError) as err:
        await engine.generate(body(timeout=0.05))
    assert err.value.code == proto.ErrorCode.TIMEOUT and "queue" in err.value.message
    await blocker


async def test_action_reports_attempts_and_token_totals():
    valid = '{"thought": "t", "action": "answer", "query": "q", "summary_ids": []}'
    engine = LLMEngine(SlowFake(words=["junk"]))
    out = await engine.action(body("action", max_tokens=2))
    assert out.valid is False and out.action is None and out.attempts == 2 and out.raw == "junkjunk"
    assert out.completion_tokens == 16 and out.prompt_tokens == 14 and "no JSON object" in out.problem
    engine = LLMEngine(SlowFake(words=[valid]))
    out = await engine.action(body("action", max_tokens=1))
    assert out.valid and out.attempts == 1 and out.action is not None and out.action.action == "answer"


async def test_count_tokens_and_adapters_listing():
    engine = LLMEngine(SlowFake())
    assert engine.count_tokens("a b c") == bodies.CountTokensReply(tokens=3, exact=False)
    with pytest.raises(proto.ProtocolError, match="text"):
        decoded("count_tokens", {})
    listing = engine.adapters()
    assert listing.personas == {p: None for p in personas.PERSONAS}
    assert listing.backend.model == "fake-1" and listing.backend.context_tokens == 100


async def test_adapters_are_recorded_and_restored_after_a_restart(tmp_path):
    registry = AdapterRegistry(tmp_path / "llm_adapters.json")
    engine = LLMEngine(SlowFake(), registry=registry)
    out = await engine.activate_adapter(decoded("activate_adapter", {"persona": "brick", "path": "/a/brick_v2",
                                                                      "meta": {"v": 2}}))
    assert out.persona == "BRICK" and out.adapter.name == "brick_1" and out.adapter.meta == {"v": 2}
    await engine.activate_adapter(bodies.ActivateAdapter(persona="ALFRED", path="/a/alfred_v1"))
    reply = await engine.generate(body(persona="BRICK"))
    assert reply.adapter == "brick_1"
    assert (await engine.generate(body(persona="ROBIN"))).adapter is None
    assert engine.adapter("ALFRED") is not None and engine.adapter("ROBIN") is None
    assert (await engine.deactivate_adapter("ALFRED")).removed is True
    assert json.loads(registry.path.read_text()) == {"BRICK": {"path": "/a/brick_v2", "meta": {"v": 2}}}

    fresh = SlowFake()  # the restarted worker
    restored = await LLMEngine(fresh, registry=registry).restore_adapters()
    assert restored == {"BRICK": "active"}
    assert fresh.active["BRICK"]["path"] == "/a/brick_v2"


async def test_a_bad_adapter_is_refused_and_not_recorded(tmp_path):
    registry = AdapterRegistry(tmp_path / "llm_adapters.json")
    engine = LLMEngine(SlowFake(), registry=registry)
    with pytest.raises(BackendError) as err:
        await engine.activate_adapter(bodies.ActivateAdapter(persona="BRICK", path="/missing/adapter"))
    assert err.value.code == proto.ErrorCode.BAD_ARGS
    assert registry.load() == {}
    with pytest.raises(proto.ProtocolError, match="unknown persona"):
        decoded("activate_adapter", {"persona": "JOKER", "path": "/a"})
    with pytest.raises(proto.ProtocolError, match="path"):
        decoded("activate_adapter", {"persona": "BRICK"})


async def test_restore_skips_an_adapter_whose_files_are_gone(tmp_path):
    registry = AdapterRegistry(tmp_path / "llm_adapters.json")
    registry.save({"BABS": {"path": "/missing/babs"}, "NOBODY": {"path": "/x"}})
    assert set(registry.load()) == {"BABS"}  # unknown personas are ignored
    outcome = await LLMEngine(SlowFake(), registry=registry).restore_adapters()
    assert outcome["BABS"].startswith("failed:")
    (tmp_path / "llm_adapters.json").write_text("{not json")
    assert registry.load() == {}
