"""The llm service end to end: broker + the forge worker process (embedded model), through a Client."""

import asyncio

import pytest

from batos import personas
from batos.errors import ServiceError
from services.forge.backends import llamacpp
from tests.unit.test_llm_openai import FakeServer

pytestmark = pytest.mark.integration  # model-loading tests are also marked slow

MESSAGES = [{"role": "user", "content": "Say hello to the Architect."}]


@pytest.fixture
async def llm(system, client):
    system.start_service("forge")
    await system.wait_registered(client, {"llm": 1, "forge": 1}, timeout=120)
    return client


@pytest.mark.slow
async def test_llm_service_end_to_end(llm):
    tokens: list[str] = []

    async def on_event(body):
        assert body["event"] == "token"
        tokens.append(body["text"])

    reply = await llm.call(
        "llm", "generate", {"persona": "robin", "messages": MESSAGES, "max_tokens": 12}, on_event=on_event, timeout=120
    )
    assert tokens and "".join(tokens) == reply["text"]
    for key in ("prompt_tokens", "completion_tokens", "ttft_s", "total_s", "tokens_per_s", "adapter", "model"):
        assert key in reply
    assert reply["persona"] == "ROBIN" and reply["model"] == "SmolLM2-135M-Instruct"
    assert 0 < reply["completion_tokens"] <= 12

    with pytest.raises(ServiceError) as err:
        await llm.call("llm", "generate", {"persona": "JOKER", "messages": MESSAGES}, timeout=30)
    assert err.value.code == "bad_args" and "unknown persona 'JOKER'" in err.value.message
    with pytest.raises(ServiceError) as err:
        await llm.call(
            "llm", "generate", {"persona": "BRICK", "messages": [{"role": "user", "content": "x " * 9000}]}, timeout=30
        )
    assert err.value.code == "bad_args" and "context is 8192 tokens" in err.value.message

    assert (await llm.call("llm", "count_tokens", {"text": "hello world"}))["tokens"] == 2
    listing = await llm.call("llm", "adapters", {})
    assert listing["personas"] == {p: None for p in personas.PERSONAS}
    status = await llm.call("llm", "status", {})
    # the embedded default runs on llama.cpp; on transformers only where llama-cpp-python did not build
    runtime = "llamacpp" if llamacpp.available() else "local"
    assert status["llm"]["ready"] is True and status["llm"]["backend"] == runtime

    # the command's wiring only (8 free tokens); constrained decoding is tested in test_llm_local.py and
    # its validity rate measured by bench/llm.py
    out = await llm.call(
        "llm",
        "action",
        {
            "persona": "BABS",
            "max_tokens": 8,
            "constrained": False,
            "reask": False,
            "messages": [{"role": "user", "content": "Question: where?"}],
        },
        timeout=60,
    )
    assert set(out) >= {"action", "valid", "raw", "attempts", "completion_tokens"}
    assert out["attempts"] == 1 and out["completion_tokens"] <= 8 and isinstance(out["raw"], str)

    await _cancel_stops_generation_and_frees_the_model(llm)


async def _cancel_stops_generation_and_frees_the_model(llm):
    # (part of the test above: one worker start with the model load serves both)
    call = await llm.start_call("llm", "generate", {"persona": "ROBIN", "messages": MESSAGES, "max_tokens": 2000})
    got = 0
    with pytest.raises(ServiceError) as err:
        async for env in call.events():
            if env.kind == "event":
                got += 1
                if got == 2:
                    await call.cancel()
            elif env.kind == "error":
                raise ServiceError.from_body(env.body)
    assert err.value.code == "cancelled"
    # the next request is served at once: the cancelled generation no longer holds the model
    reply = await asyncio.wait_for(
        llm.call("llm", "generate", {"persona": "ROBIN", "messages": MESSAGES, "max_tokens": 3}), 30
    )
    assert reply["queue_s"] < 1.0


async def test_a_backend_that_cannot_load_answers_unavailable_with_the_reason(system, client):
    system.start_service("forge", BATOS_LLM_BACKEND="openai", BATOS_OPENAI_URL="http://127.0.0.1:9/v1")
    await system.wait_registered(client, {"llm": 1}, timeout=60)
    with pytest.raises(ServiceError) as err:
        await client.call("llm", "generate", {"persona": "ROBIN", "messages": MESSAGES}, timeout=30)
    assert err.value.code == "unavailable" and "openai_model is not set" in err.value.message
    status = await client.call("llm", "status", {})
    assert status["llm"] == {"ready": False, "error": "openai_model is not set"}


async def test_the_openai_backend_through_the_service(system, client):
    fake = FakeServer()  # a stand-in for vLLM / llama.cpp server (see test_llm_openai.py)
    try:
        system.start_service(
            "forge", BATOS_LLM_BACKEND="openai", BATOS_OPENAI_URL=fake.url, BATOS_OPENAI_MODEL="served-model"
        )
        await system.wait_registered(client, {"llm": 1}, timeout=60)
        tokens: list[str] = []
        reply = await client.call(
            "llm",
            "generate",
            {"persona": "ALFRED", "messages": MESSAGES},
            on_event=lambda body: tokens.append(body["text"]),
            timeout=30,
        )
        assert tokens == fake.pieces and reply["text"] == "Hello, Architect."
        assert reply["model"] == "served-model" and reply["completion_tokens"] == 4
        assert fake.requests[0]["messages"][0] == {"role": "system", "content": personas.PERSONAS["ALFRED"]}
    finally:
        fake.close()
