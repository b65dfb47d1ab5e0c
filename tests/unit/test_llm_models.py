"""batos.models: where the packaged models are, and the one-time GGUF -> safetensors conversion."""

import json
import threading
import time

import pytest

from batos import config, models


def test_packaged_files_are_found_without_importing_the_packages():
    gguf = models.embedded_gguf_path()
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf.stat().st_size > 50_000_000
    embedder = models.embedder_model_path()
    assert (embedder / "model.safetensors").is_file()
    assert json.loads((embedder / "config.json").read_text())["hidden_size"] == 384


def test_a_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(models, "EMBEDDED_LLM_PACKAGE", "no_such_package_xyz")
    with pytest.raises(models.ModelNotAvailable, match="'no_such_package_xyz' is not installed"):
        models.embedded_gguf_path()


def test_prepare_is_quick_and_says_so_when_the_checkpoint_exists(tmp_path):
    target = tmp_path / models.EMBEDDED_LLM_DIRNAME
    target.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (target / name).write_text("{}")
    settings = config.load(cache_dir=tmp_path)
    started = time.monotonic()
    lines = models.prepare(settings)
    assert time.monotonic() - started < 1.0
    assert lines[0] == f"embedded LLM: ready at {target}"
    assert lines[1].startswith("embedder: ")
    assert models.embedded_llm_checkpoint(settings) == target


def test_cli_paths(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("BATOS_CACHE_DIR", str(tmp_path))
    assert models.main(["paths"]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint: {tmp_path / models.EMBEDDED_LLM_DIRNAME} (ready=False)" in out
    assert "gguf: " in out and "embedder: " in out


@pytest.mark.slow
def test_conversion_runs_once_even_when_asked_concurrently(tmp_path):
    """Two callers at once (the worker and `make setup`): one converts, the other waits for it."""
    settings = config.load(cache_dir=tmp_path)
    results: list = []
    logs: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(models.embedded_llm_checkpoint(settings, log=logs.append)))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    target = tmp_path / models.EMBEDDED_LLM_DIRNAME
    assert results == [target, target]
    assert sum(line.startswith("converting") for line in logs) == 1
    assert models.checkpoint_ready(target)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".smollm2")] == [".smollm2-135m-instruct.lock"]
    cfg = json.loads((target / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "quantization_config" not in cfg
    assert (target / "model.safetensors").stat().st_size > 500_000_000  # plain fp32 weights

    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    model = AutoModelForCausalLM.from_pretrained(str(target))
    tokenizer = AutoTokenizer.from_pretrained(str(target))
    assert time.monotonic() - started < 10  # ~1 s on an idle machine vs ~21 s from the GGUF
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith(
        "<|im_start|>system"
    )
    assert model.config.vocab_size == 49152
