"""Choosing and configuring a backend from settings."""

import pytest
import torch

import proto
from batos import config, personas
from batos.models import embedded_checkpoint_dir
from services.forge.backends import make_backend
from services.forge.backends.base import BackendError, GenerationParams, tokens_per_second
from services.forge.backends.local import LocalBackend, resolve_device, resolve_dtype
from services.forge.backends.openai_compat import OpenAICompatBackend


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"llm_backend": "hf"}, "needs llm_model_path"),
        ({"llm_backend": "hf", "llm_model_path": "/no/such/model"}, "no model at '/no/such/model'"),
        ({"llm_backend": "openai"}, "is not an http(s) URL"),
        ({"llm_backend": "openai", "openai_url": "http://127.0.0.1:8000/v1"}, "openai_model is not set"),
    ],
)
def test_misconfiguration_is_unavailable_with_the_reason(overrides, message):
    with pytest.raises(BackendError) as err:
        make_backend(config.load(**overrides))
    assert err.value.code == proto.ErrorCode.UNAVAILABLE
    assert message in err.value.message


def test_openai_backend_is_built_from_settings_without_connecting():
    backend = make_backend(
        config.load(
            llm_backend="openai", openai_url="http://127.0.0.1:9/v1/", openai_model="m", llm_context_tokens=4096
        )
    )
    assert isinstance(backend, OpenAICompatBackend)
    assert backend.info() == {"backend": "openai", "model": "m", "context_tokens": 4096, "url": "http://127.0.0.1:9/v1"}


def test_dtype_and_device_resolution():
    assert resolve_dtype("auto", "cpu") is torch.float32  # fastest on CPU
    assert resolve_dtype("bf16", "cpu") is torch.bfloat16
    assert resolve_dtype("float16", "cuda") is torch.float16
    with pytest.raises(BackendError) as err:
        resolve_dtype("int3", "cpu")
    assert err.value.code == proto.ErrorCode.BAD_ARGS and "unknown llm_dtype 'int3'" in err.value.message
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="CUDA is not available"):
            resolve_device("cuda")


def test_tokens_per_second_is_the_decode_rate():
    assert tokens_per_second(11, 1.0, 2.0) == 10.0  # 10 tokens after the first, in 1 s
    assert tokens_per_second(1, 0.5, 0.5) == 2.0
    assert tokens_per_second(0, 0.0, 0.0) == 0.0


@pytest.mark.slow
def test_hf_backend_loads_a_local_checkpoint_with_the_configured_dtype():
    settings = config.load(llm_backend="hf", llm_model_path=str(embedded_checkpoint_dir(config.load())),
                           llm_dtype="bfloat16", llm_device="cpu", llm_context_tokens=512)  # fmt: skip
    backend = make_backend(settings)
    assert isinstance(backend, LocalBackend)
    assert backend.model.dtype is torch.bfloat16 and backend.dtype == "bfloat16"
    assert backend.context_tokens == 512  # the setting caps the model's own 8192
    assert backend.model_name == "smollm2-135m-instruct"
    messages = personas.with_system_prompt("BRICK", [{"role": "user", "content": "2+2="}])
    result = backend.generate("BRICK", messages, GenerationParams(max_tokens=3))
    assert result.completion_tokens == 3 and result.text
    with pytest.raises(BackendError, match="context is 512 tokens"):
        backend.generate("BRICK", [{"role": "user", "content": "word " * 600}], GenerationParams(max_tokens=3))


@pytest.mark.slow
def test_without_llama_cpp_the_embedded_model_falls_back_to_transformers_and_says_so(monkeypatch, caplog):
    from services.forge.backends import llamacpp

    monkeypatch.setattr(llamacpp, "available", lambda: False)
    backend = make_backend(config.load(llm_backend="embedded", llm_model="qwen2.5-coder-0.5b"))
    assert isinstance(backend, LocalBackend) and backend.model_name == "SmolLM2-135M-Instruct"
    assert "llama-cpp-python is not installed" in caplog.text
    assert "instead of Qwen2.5-Coder-0.5B-Instruct" in caplog.text
    with pytest.raises(BackendError, match="llama-cpp-python missing"):
        make_backend(config.load(llm_backend="embedded", llm_runtime="llamacpp"))
