"""A forge adapter (PEFT LoRA on the SmolLM2 checkpoint) converted to a GGUF LoRA and applied by llama.cpp per persona.

The adapter here is made, not trained (random B matrices, so it visibly changes the output in a few
tokens); training it for real is the forge's end-to-end test (tests/integration/test_forge_e2e.py).
"""

import pytest

import proto
from batos import config, models, personas, runtime_install
from services.forge.backends import make_backend
from services.forge.backends.base import BackendError, GenerationParams

pytest.importorskip("llama_cpp")
from services.forge.backends import gguf_lora
from services.forge.backends.gguf_lora import gguf_lora_for

pytestmark = pytest.mark.slow

if not (runtime_install.tools_dir() / "convert_lora_to_gguf.py").is_file():
    pytest.skip("llama.cpp's LoRA converter is not unpacked (make setup)", allow_module_level=True)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(models.embedded_llm_checkpoint(config.load())))
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      task_type="CAUSAL_LM")  # fmt: skip
    peft = get_peft_model(base, lora)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    out = tmp_path_factory.mktemp("adapter") / "brick_test"
    peft.save_pretrained(str(out))
    return out


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


def test_an_adapter_for_another_model_is_refused(adapter_dir):
    with pytest.raises(BackendError) as err:
        gguf_lora_for(adapter_dir, None)  # the served model has no transformers form the forge trained
    assert err.value.code == proto.ErrorCode.BAD_ARGS and "cannot take its adapters" in err.value.message
