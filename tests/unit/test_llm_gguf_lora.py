"""A forge adapter (PEFT LoRA on the SmolLM2 checkpoint) converted to a GGUF LoRA and applied by llama.cpp per persona.

The adapter here is made, not trained (random B matrices, so it visibly changes the output in a few
tokens); training it for real is the forge's end-to-end test (tests/unit/test_forge_train_slow.py).
"""

import json

import pytest

import proto
from batos import config, models, personas, runtime_install
from services.forge.backends import make_backend
from services.forge.backends.base import BackendError, GenerationParams

pytest.importorskip("llama_cpp")
from services.forge.backends import gguf_lora
from services.forge.backends.gguf_lora import gguf_lora_for
from tests.unit.random_lora import random_adapter

pytestmark = pytest.mark.slow

if not (runtime_install.tools_dir() / "convert_lora_to_gguf.py").is_file():
    pytest.skip("llama.cpp's LoRA converter is not unpacked (make setup)", allow_module_level=True)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    checkpoint = models.embedded_llm_checkpoint(config.load())
    return random_adapter(checkpoint, tmp_path_factory.mktemp("adapter") / "brick_test")


def chat(persona: str) -> list[dict[str, str]]:
    return personas.with_system_prompt(persona, [{"role": "user", "content": "Write a Python function add(a, b)."}])


def test_the_adapter_applies_to_its_persona_only_and_can_be_removed(adapter_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_lora, "cache_dir", lambda: tmp_path / "gguf_lora")  # a fresh conversion cache
    backend = make_backend(config.load(llm_model="smollm2-135m", llm_runtime="llamacpp"))
    try:
        params = GenerationParams(max_tokens=12)
        base_brick = backend.generate("BRICK", chat("BRICK"), params).text
        base_robin = backend.generate("ROBIN", chat("ROBIN"), params).text
        info = backend.activate_adapter("BRICK", str(adapter_dir), {"why": "test"})
        assert info["gguf"].startswith(str(tmp_path / "gguf_lora")) and info["meta"] == {"why": "test"}
        assert backend.adapters() == {"BRICK": info}
        tuned = backend.generate("BRICK", chat("BRICK"), params)
        assert tuned.adapter == "brick_test" and tuned.text != base_brick
        robin = backend.generate("ROBIN", chat("ROBIN"), params)  # the KV cache is not shared across adapters
        assert robin.adapter is None and robin.text == base_robin
        assert backend.generate("BRICK", chat("BRICK"), params).text == tuned.text  # and back again
        assert backend.deactivate_adapter("BRICK") is True and backend.adapters() == {}
        assert backend.generate("BRICK", chat("BRICK"), params).text == base_brick
        # converted once: the same content maps to the same file, which is not written again
        gguf = tmp_path / "gguf_lora" / info["gguf"].rsplit("/", 1)[1]
        assert gguf.read_bytes()[:4] == b"GGUF"
        mtime = gguf.stat().st_mtime_ns
        assert gguf_lora_for(adapter_dir, backend.base_checkpoint) == gguf and gguf.stat().st_mtime_ns == mtime
    finally:
        backend.close()


@pytest.mark.parametrize("key", ["smollm2-135m", "qwen2.5-coder-0.5b"])  # the test model, the default
def test_the_gguf_lora_moves_the_logits_as_the_peft_adapter_does(key, adapter_dir, tmp_path, monkeypatch):
    """llama.cpp with the converted LoRA vs PEFT on the checkpoint, on the same tokens: fails if llama.cpp
    ignores the adapter (no change) or applies it wrongly (a change unlike PEFT's)."""
    import numpy as np
    import torch
    from llama_cpp import Llama
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setattr(gguf_lora, "cache_dir", lambda: tmp_path / "gguf_lora")
    settings = config.load(llm_model=key)
    checkpoint = models.training_checkpoint_dir(settings)
    try:
        gguf = models.llm_gguf_path(settings)
    except models.ModelNotAvailable as e:
        pytest.skip(str(e))
    if not models.checkpoint_ready(checkpoint):
        pytest.skip(f"{key}'s transformers form is not made (BATOS_LLM_MODEL={key} python -m batos.models prepare)")
    if key != "smollm2-135m":
        adapter_dir = random_adapter(checkpoint, tmp_path / "adapter")
    ids = AutoTokenizer.from_pretrained(str(checkpoint))("def add(a, b):\n    return a + b\n")["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(str(checkpoint))
    with torch.no_grad():
        hf_base = base(torch.tensor([ids])).logits[0].numpy()
        hf_lora = PeftModel.from_pretrained(base, str(adapter_dir))(torch.tensor([ids])).logits[0].numpy()

    def llama_logits(lora: str | None) -> np.ndarray:
        llm = Llama(model_path=str(gguf), n_ctx=64, logits_all=True, lora_path=lora,
                    n_threads=1, verbose=False)  # fmt: skip
        try:
            llm.eval(ids)
            return np.array(llm.scores[: len(ids)])
        finally:
            llm.close()

    cpp_base = llama_logits(None)
    cpp_lora = llama_logits(str(gguf_lora_for(adapter_dir, str(checkpoint))))
    hf_delta, cpp_delta = hf_lora - hf_base, cpp_lora - cpp_base
    corr = np.corrcoef(hf_delta.ravel(), cpp_delta.ravel())[0, 1]
    print(f"\n{key}: mean |logit change| llama.cpp {np.abs(cpp_delta).mean():.3f}, PEFT {np.abs(hf_delta).mean():.3f};"
          f" correlation {corr:.3f}")  # measured: 0.990 (SmolLM2), 0.987 (Qwen 0.5B)
    assert np.abs(cpp_delta).mean() > 0.5 * np.abs(hf_delta).mean()  # the adapter is applied, at its scale
    assert corr > 0.9  # and does what PEFT's does
    # the base logits agree too (the checkpoint is the GGUF dequantized): the comparison above is fair
    assert np.corrcoef(hf_base.ravel(), cpp_base.ravel())[0, 1] > 0.95


def test_an_adapter_for_another_model_is_refused(adapter_dir, tmp_path):
    with pytest.raises(BackendError) as err:
        gguf_lora_for(adapter_dir, None)  # the served model has no transformers form the forge trained
    assert err.value.code == proto.ErrorCode.BAD_ARGS and "cannot take its adapters" in err.value.message
    other = tmp_path / "other-model"  # a checkpoint of another shape (e.g. Qwen's): refused before converting
    other.mkdir()
    cfg = json.loads((models.embedded_llm_checkpoint(config.load()) / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "hidden_size": 896, "model_type": "qwen2"}))
    with pytest.raises(BackendError) as err:
        gguf_lora_for(adapter_dir, str(other))
    assert err.value.code == proto.ErrorCode.BAD_ARGS and "does not fit this model" in err.value.message
