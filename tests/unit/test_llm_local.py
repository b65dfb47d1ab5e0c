"""The local transformers backend on the real embedded model (SmolLM2-135M, CPU), loaded once.

Slow: the first run converts the packaged GGUF (~25 s); afterwards loading takes ~1-3 s and each test
generates a few dozen tokens at most.
"""

import json
import os
import threading
import time

import pytest

import proto
from batos import config, personas
from proto.react import ACTIONS
from services.forge.backends import make_backend
from services.forge.backends.base import CANCELLED, LENGTH, TIMEOUT, BackendError, GenerationParams
from services.forge.backends.local import LocalBackend
from services.forge.streaming import IncrementalDecoder
from tests.unit.scripted_cores import ScriptedCores

pytestmark = pytest.mark.slow
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def backend() -> LocalBackend:
    b = make_backend(config.load(llm_backend="embedded", llm_model="smollm2-135m", llm_runtime="transformers"))
    assert isinstance(b, LocalBackend)
    return b


def chat(persona: str, text: str) -> list[dict[str, str]]:
    return personas.with_system_prompt(persona, [{"role": "user", "content": text}])


def test_greedy_generation_streams_exactly_the_reply_text(backend):
    tokens: list[str] = []
    params = GenerationParams(max_tokens=10)
    result = backend.generate("ROBIN", chat("ROBIN", "What is a persistent object?"), params, tokens.append)
    assert result.text and "".join(tokens) == result.text
    assert 0 < result.completion_tokens <= 10 and result.prompt_tokens > 20
    assert 0 < result.ttft_s <= result.total_s and result.tokens_per_s > 0
    assert result.model == "SmolLM2-135M-Instruct" and result.adapter is None
    again = backend.generate("ROBIN", chat("ROBIN", "What is a persistent object?"), params)
    assert again.text == result.text  # greedy is deterministic


def test_stop_string_ends_generation_before_it(backend):
    messages = chat("BRICK", "Write a Python function add(a, b) that returns a + b.")
    full = backend.generate("BRICK", messages, GenerationParams(max_tokens=12))
    assert len(full.text) > 12
    stop = full.text[8:12]
    cut = backend.generate("BRICK", messages, GenerationParams(max_tokens=12, stop=[stop]))
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.completion_tokens < full.completion_tokens


def test_max_tokens_gives_finish_reason_length(backend):
    result = backend.generate("ROBIN", chat("ROBIN", "Tell me a long story."), GenerationParams(max_tokens=3))
    assert result.completion_tokens == 3 and result.finish_reason == LENGTH


def test_cancel_and_deadline_stop_within_a_token(backend):
    cancel = threading.Event()
    seen: list[str] = []

    def on_token(text):
        seen.append(text)
        if len(seen) == 2:
            cancel.set()

    messages = chat("ROBIN", "Count from one to one hundred in words.")
    result = backend.generate("ROBIN", messages, GenerationParams(max_tokens=200), on_token, cancel)
    assert result.finish_reason == CANCELLED and result.completion_tokens <= 4
    started = time.monotonic()
    slow = lambda _text: time.sleep(0.1)  # a slow consumer makes the deadline certain to pass first
    result = backend.generate("ROBIN", messages, GenerationParams(max_tokens=500, deadline=started + 0.3), slow)
    assert result.finish_reason == TIMEOUT and result.completion_tokens < 10
    assert time.monotonic() - started < 5.0  # one token past the deadline, even on a busy machine


def test_a_prompt_longer_than_the_context_is_bad_args(backend):
    assert backend.context_tokens == 8192
    with pytest.raises(BackendError) as err:
        backend.generate("ROBIN", chat("ROBIN", "hello " * 9000), GenerationParams(max_tokens=5))
    assert err.value.code == proto.ErrorCode.BAD_ARGS
    assert "the model's context is 8192 tokens" in err.value.message
    assert backend.fit_max_tokens(8100, 256) == 92  # what fits is generated


def test_json_schema_constrains_the_output(backend):
    # a small schema keeps this test short; bench/llm.py measures the full action schema
    schema = {
        "type": "object",
        "properties": {
            "action": {"type": "string", "enum": list(ACTIONS)},
            "query": {"type": "string", "maxLength": 12},
        },
        "required": ["action", "query"],
        "additionalProperties": False,
    }
    messages = chat("BABS", "Question: how does the broker route requests? Reply with a JSON action.")
    result = backend.generate("BABS", messages, GenerationParams(max_tokens=40, json_schema=schema))
    obj = json.loads(result.text)
    assert list(obj) == ["action", "query"]
    assert obj["action"] in ACTIONS and len(obj["query"]) <= 12


def test_count_tokens_and_incremental_decoding_with_the_real_tokenizer(backend):
    text = "Déjà vu 🐍 — naïve café, 日本語 and code: def f(x): return x**2"
    ids = backend.tokenizer.encode(text, add_special_tokens=False)
    assert backend.count_tokens(text) == len(ids)
    decoder = IncrementalDecoder(backend.tokenizer)
    pieces = [decoder.push([i]) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


@pytest.fixture(scope="module")
def tiny_lora(tmp_path_factory, backend) -> str:
    """A randomly initialised rank-4 LoRA for the embedded model, made with PEFT on a separate copy."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from batos.models import embedded_checkpoint_dir

    base = AutoModelForCausalLM.from_pretrained(str(embedded_checkpoint_dir(config.load())))
    # init_lora_weights=False: random B as well as A, so the adapter really changes the output
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    path = tmp_path_factory.mktemp("lora") / "brick_v1"
    get_peft_model(base, cfg).save_pretrained(str(path))
    return str(path)


def test_a_persona_adapter_changes_only_that_personas_logits(backend, tiny_lora):
    brick = robin = [{"role": "user", "content": "Explain the kernel."}]  # the persona alone differs
    base_brick = backend.next_token_logits("BRICK", brick)
    base_robin = backend.next_token_logits("ROBIN", robin)
    model_before = backend.model
    try:
        info = backend.activate_adapter("BRICK", tiny_lora, {"version": 1})
        assert info["path"] == tiny_lora and info["meta"] == {"version": 1}
        lora_brick = backend.next_token_logits("BRICK", brick)
        assert (lora_brick - base_brick).abs().max() > 1e-2  # BRICK now runs with its adapter
        assert (backend.next_token_logits("ROBIN", robin) - base_robin).abs().max() < 1e-4  # ROBIN: base
        assert backend.next_token_logits("BRICK", brick).allclose(lora_brick, atol=1e-5)  # switching back
        result = backend.generate("BRICK", brick, GenerationParams(max_tokens=2))
        assert result.adapter == info["name"]
        assert backend.generate("ROBIN", robin, GenerationParams(max_tokens=2)).adapter is None
        assert set(backend.adapters()) == {"BRICK"}

        backend.activate_adapter("ALFRED", tiny_lora)  # a second persona shares the base model
        assert backend.next_token_logits("BRICK", brick).allclose(lora_brick, atol=1e-5)
        backend.activate_adapter("BRICK", tiny_lora, {"version": 2})  # replacement keeps serving
        assert backend.adapters()["BRICK"]["meta"] == {"version": 2}
        assert backend.next_token_logits("BRICK", brick).allclose(lora_brick, atol=1e-5)
    finally:
        backend.deactivate_adapter("ALFRED")
        backend.deactivate_adapter("BRICK")
    assert backend.adapters() == {}
    assert backend.model is model_before  # the last adapter out leaves the plain base model
    assert backend.next_token_logits("BRICK", brick).allclose(base_brick, atol=1e-5)


def test_a_bad_adapter_path_is_bad_args(backend, tmp_path):
    for path, why in [(tmp_path / "nope", "not a directory"), (tmp_path, "adapter_config.json")]:
        with pytest.raises(BackendError) as err:
            backend.activate_adapter("BRICK", str(path))
        assert err.value.code == proto.ErrorCode.BAD_ARGS and why in err.value.message
    assert backend.adapters() == {}


def test_on_cpu_torch_threads_follow_the_machine_between_tokens(backend, monkeypatch):
    """Auto threads (BATOS_LLM_THREADS=0) on CPU: each forward pass gets the count decided just before it."""
    import torch

    assert backend.info()["threads_auto"] is True
    seen: list[int] = []
    real_forward = backend.model.forward
    monkeypatch.setattr(backend.model, "forward", lambda *a, **k: (seen.append(torch.get_num_threads()),
                                                                    real_forward(*a, **k))[1])  # fmt: skip
    saved, before = backend._spare, torch.get_num_threads()
    try:
        backend._spare = ScriptedCores([2, 1, 1, 2, 1])
        result = backend.generate("ROBIN", chat("ROBIN", "What is a persistent object?"),
                                  GenerationParams(max_tokens=5))
    finally:
        backend._spare = saved
        torch.set_num_threads(before)
    assert result.completion_tokens == 5
    assert seen == [2, 1, 1, 2, 1]  # the prompt's pass, then one per new token


def test_a_fixed_thread_count_is_set_once_and_kept():
    import torch

    before = torch.get_num_threads()
    try:
        b = make_backend(config.load(llm_backend="embedded", llm_model="smollm2-135m", llm_runtime="transformers",
                                     llm_threads=1))  # fmt: skip
        assert b.info()["threads_auto"] is False and torch.get_num_threads() == 1
        b.generate("ROBIN", chat("ROBIN", "hi"), GenerationParams(max_tokens=3))
        assert torch.get_num_threads() == 1
        b.close()
    finally:
        torch.set_num_threads(before)
