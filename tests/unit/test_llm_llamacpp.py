"""The llama.cpp backend on the packaged SmolLM2-135M GGUF (loads in well under a second), loaded once.

Skipped only where llama-cpp-python is not installed (its build failed in `make setup`: the system then
runs on transformers, covered by test_llm_local.py).
"""

import json
import threading
import time

import pytest

import proto
from batos import config, personas
from proto.react import ACTIONS
from services.forge.backends import make_backend
from services.forge.backends.base import CANCELLED, LENGTH, STOP, TIMEOUT, BackendError, GenerationParams
from services.forge.structured import run_action

pytest.importorskip("llama_cpp")
from services.forge.backends.llamacpp import PREFILL_CHUNK, LlamaCppBackend
from services.forge.spare_cores import usable_cores
from tests.unit.scripted_cores import ScriptedCores

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def backend() -> LlamaCppBackend:
    b = make_backend(config.load(llm_backend="embedded", llm_model="smollm2-135m", llm_runtime="auto"))
    assert isinstance(b, LlamaCppBackend)  # the default embedded runtime where llama.cpp is installed
    yield b
    b.close()


def chat(persona: str, text: str) -> list[dict[str, str]]:
    return personas.with_system_prompt(persona, [{"role": "user", "content": text}])


def test_streams_exactly_the_reply_text_and_reports_the_model(backend):
    tokens: list[str] = []
    result = backend.generate("ROBIN", chat("ROBIN", "What is a persistent object?"), GenerationParams(max_tokens=10),
                              tokens.append)  # fmt: skip
    assert result.text and "".join(tokens) == result.text
    assert result.completion_tokens == 10 and result.finish_reason == LENGTH and result.max_tokens == 10
    assert result.prompt_tokens > 20 and 0 < result.ttft_s <= result.total_s and result.tokens_per_s > 0
    assert result.model == "SmolLM2-135M-Instruct" and result.adapter is None
    info = backend.info()
    assert info["backend"] == "llamacpp" and info["context_tokens"] == 8192
    assert info["threads_auto"] is True and 1 <= info["threads"] <= usable_cores()  # BATOS_LLM_THREADS=0


def test_the_thread_count_follows_the_machine_during_a_request_and_the_output_does_not_change(backend):
    """Auto threads: llama.cpp's context gets each new count between decodes; greedy text stays the same."""
    from llama_cpp import llama_cpp as C

    messages = chat("ROBIN", "Explain this code:\n" + "\n".join(f"def g{i}(x):\n    return x * {i}" for i in range(30)))
    params = GenerationParams(max_tokens=12)
    saved = backend._spare
    try:
        backend._spare = ScriptedCores([1])
        backend._llm.reset()
        fixed = backend.generate("ROBIN", messages, params)
        assert backend.threads_used == {1} and C.llama_n_threads(backend._llm._ctx.ctx) == 1
        # a busy neighbour comes and goes: 2 threads for the first chunks, 1, then 2 again while sampling
        backend._spare = ScriptedCores([2, 2, 1, 1, 1, 2, 2, 1, 2])
        backend._llm.reset()
        varied = backend.generate("ROBIN", messages, params)
        assert backend.threads_used == {1, 2}
        assert varied.text == fixed.text and varied.completion_tokens == fixed.completion_tokens
    finally:
        backend._spare = saved


def test_the_prompt_is_the_gguf_chat_template(backend):
    ids = backend.encode_chat(chat("BRICK", "hi"))
    text = backend._llm.detokenize(ids, special=True).decode()
    assert text.startswith("<|im_start|>system\n" + personas.PERSONAS["BRICK"])
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert backend.count_tokens("hello world") == 2


def test_a_shared_prompt_prefix_is_not_decoded_again_and_the_output_is_unchanged(backend, monkeypatch):
    """KV-cache prefix reuse: a second turn only decodes its new tail, and greedy output does not change."""
    long_question = "Explain this code:\n" + "\n".join(f"def f{i}(x):\n    return x + {i}" for i in range(25))
    first = chat("ROBIN", long_question)
    params = GenerationParams(max_tokens=6)
    backend._llm.reset()  # a cold cache, as after a restart
    cold = backend.generate("ROBIN", first, params)
    decoded: list[int] = []
    real_eval = backend._llm.eval
    monkeypatch.setattr(backend._llm, "eval", lambda tokens: (decoded.append(len(tokens)), real_eval(tokens))[1])
    warm = backend.generate("ROBIN", first, params)
    assert warm.text == cold.text
    assert sum(decoded[:1]) == 1  # only the last prompt token is decoded again (for fresh logits)
    decoded.clear()
    second_turn = [*first, {"role": "assistant", "content": cold.text}, {"role": "user", "content": "Shorter?"}]
    backend.generate("ROBIN", second_turn, params)
    prompt = len(backend.encode_chat(second_turn))
    assert cold.prompt_tokens > 2 * PREFILL_CHUNK
    assert sum(decoded) < prompt - cold.prompt_tokens + 20  # the tail and the generated tokens, not the prefix


def test_stop_string_ends_generation_before_it(backend):
    messages = chat("BRICK", "Write a Python function add(a, b) that returns a + b.")
    full = backend.generate("BRICK", messages, GenerationParams(max_tokens=14))
    assert len(full.text) > 12
    stop = full.text[8:12]
    streamed: list[str] = []
    cut = backend.generate("BRICK", messages, GenerationParams(max_tokens=14, stop=[stop]), streamed.append)
    assert cut.text == full.text[: full.text.find(stop)] == "".join(streamed)
    assert cut.finish_reason == STOP and cut.completion_tokens < full.completion_tokens


def test_json_schema_constrains_the_action(backend):
    out = run_action(backend, "BABS", chat("BABS", "Question: How does the broker route a request?"),
                     max_tokens=96, reask=False)  # fmt: skip
    obj = json.loads(out.results[-1].text)  # the grammar admits only the schema's JSON
    assert list(obj) == ["thought", "action", "query", "summary_ids"]
    assert obj["action"] in ACTIONS and out.action is not None and len(out.results) == 1


def test_an_unusable_schema_is_bad_args(backend):
    with pytest.raises(BackendError) as err:
        backend.generate("BRICK", chat("BRICK", "x"), GenerationParams(max_tokens=2, json_schema={"type": "nope"}))
    assert err.value.code == proto.ErrorCode.BAD_ARGS and "unusable json_schema" in err.value.message


def test_cancel_stops_between_tokens_and_the_model_serves_the_next_request(backend):
    cancel = threading.Event()
    tokens: list[str] = []

    def on_token(text: str) -> None:
        tokens.append(text)
        if len(tokens) == 2:
            cancel.set()

    result = backend.generate("ROBIN", chat("ROBIN", "Tell me a long story."), GenerationParams(max_tokens=200),
                              on_token, cancel)  # fmt: skip
    assert result.finish_reason == CANCELLED and result.completion_tokens == 2
    after = backend.generate("ROBIN", chat("ROBIN", "Hello"), GenerationParams(max_tokens=2))
    assert after.completion_tokens == 2 and after.finish_reason == LENGTH


def test_a_passed_deadline_stops_the_prefill_before_any_token(backend):
    messages = chat("ROBIN", "word " * 1000)  # several prefill chunks
    backend._llm.reset()
    result = backend.generate("ROBIN", messages, GenerationParams(max_tokens=50, deadline=time.monotonic() - 1))
    assert result.finish_reason == TIMEOUT and result.completion_tokens == 0 and result.text == ""


def test_a_cancel_before_the_start_is_an_error(backend):
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(BackendError) as err:
        backend.generate("ROBIN", chat("ROBIN", "hi"), GenerationParams(max_tokens=2), cancel=cancel)
    assert err.value.code == proto.ErrorCode.CANCELLED


def test_a_prompt_that_fills_the_context_is_refused():
    small = make_backend(config.load(llm_model="smollm2-135m", llm_context_tokens=256))
    try:
        assert small.context_tokens == 256
        with pytest.raises(BackendError) as err:
            small.generate("BRICK", chat("BRICK", "word " * 300), GenerationParams(max_tokens=3))
        assert err.value.code == proto.ErrorCode.BAD_ARGS and "context is 256 tokens" in err.value.message
        # max_tokens is clamped to the room left
        result = small.generate("BRICK", chat("BRICK", "word " * 120), GenerationParams(max_tokens=500))
        assert result.max_tokens == 256 - result.prompt_tokens
    finally:
        small.close()


def test_an_adapter_that_is_not_a_peft_directory_is_refused(backend, tmp_path):
    with pytest.raises(BackendError) as err:
        backend.activate_adapter("BRICK", str(tmp_path))
    assert err.value.code == proto.ErrorCode.BAD_ARGS and "not a PEFT adapter" in err.value.message
    assert backend.adapters() == {} and backend.deactivate_adapter("BRICK") is False
