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
    assert lines[1].startswith("llm model smollm2-135m (SmolLM2-135M-Instruct): ")  # served from its package
    assert lines[2].startswith("embedder: ")
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


# -- the GGUF model catalogue (BATOS_LLM_MODEL) ------------------------------------------------------------


def _fake_parts(tmp_path, monkeypatch, chunks: list[bytes]) -> list[str]:
    """Part packages like the registry's: each exposes get_part_path() to its piece of the file."""
    requirements = []
    for i, data in enumerate(chunks, 1):
        pkg = tmp_path / "site" / f"fake_gguf_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(data)
        (pkg / "__init__.py").write_text(
            "import os\ndef get_part_path():\n"
            f"    return os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'part{i:02d}.bin')\n"
        )
        requirements.append(f"fake-gguf-part{i}==1.0")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return requirements


def test_a_split_model_is_assembled_once_in_order_and_checked(tmp_path, monkeypatch):
    import hashlib

    chunks = [b"GGUF" + b"a" * 1000, b"b" * 1000, b"c" * 10]
    spec = models.LLMSpec("fake-1b", "Fake-1B", "fake.gguf", hashlib.sha256(b"".join(chunks)).hexdigest(),
                          parts=tuple(_fake_parts(tmp_path, monkeypatch, chunks)))  # fmt: skip
    monkeypatch.setitem(models.LLM_MODELS, "fake-1b", spec)
    settings = config.load(cache_dir=tmp_path / "cache", llm_model="fake-1b")
    logs: list[str] = []
    path = models.llm_gguf_path(settings, log=logs.append)
    assert path == tmp_path / "cache" / "models" / "fake.gguf" and path.read_bytes() == b"".join(chunks)
    assert logs == ["assembling fake.gguf from 3 parts"]
    assert models.llm_gguf_path(settings, log=logs.append) == path and len(logs) == 1  # not again
    assert models.install_llm_packages(spec) == []  # all importable: pip is not run


def test_a_wrong_checksum_leaves_no_file(tmp_path, monkeypatch):
    spec = models.LLMSpec("fake-bad", "Fake", "bad.gguf", "0" * 64, parts=tuple(_fake_parts(tmp_path, monkeypatch,
                                                                                          [b"x", b"y"])))  # fmt: skip
    monkeypatch.setitem(models.LLM_MODELS, "fake-bad", spec)
    settings = config.load(cache_dir=tmp_path / "cache", llm_model="fake-bad")
    with pytest.raises(models.ModelNotAvailable, match=r"sha256 \w+ is not the expected 0000"):
        models.llm_gguf_path(settings)
    assert [p.name for p in (tmp_path / "cache" / "models").iterdir()] == [".bad.gguf.lock"]


def test_unknown_and_uninstalled_models_are_clear_errors(tmp_path):
    with pytest.raises(models.ModelNotAvailable, match="unknown llm_model 'gpt-9'"):
        models.llm_spec("gpt-9")
    spec = models.LLMSpec("missing", "M", "m.gguf", "0" * 64, parts=("no-such-part-pkg1==1.0",))
    with pytest.raises(models.ModelNotAvailable, match=r"no-such-part-pkg1==1\.0 is not installed"):
        models._assemble(spec, tmp_path / "m.gguf", lambda msg: None)


def test_the_catalogue_pins_every_package_and_the_embedded_gguf_is_served_in_place():
    for spec in models.LLM_MODELS.values():
        assert all("==" in r for r in spec.requirements()) and len(spec.sha256) == 64
    assert models.llm_gguf_path(config.load(llm_model="smollm2-135m")) == models.embedded_gguf_path()
    assert models.LLM_MODELS[models.TEST_LLM_MODEL].hf_checkpoint  # the forge trains it
