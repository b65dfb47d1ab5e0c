"""batos.models: where the packaged models are, and the one-time GGUF -> safetensors conversion."""

import json
import shutil
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
    assert lines[2] == f"forge: trains SmolLM2-135M-Instruct at {target} (0.0 s)"
    assert lines[3].startswith("embedder: ")
    assert models.embedded_llm_checkpoint(settings) == target


def test_cli_paths(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("BATOS_CACHE_DIR", str(tmp_path))
    assert models.main(["paths"]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint: {tmp_path / models.EMBEDDED_LLM_DIRNAME} (ready=False)" in out
    assert "gguf: " in out and "embedder: " in out


def test_the_forge_trains_the_served_model_where_it_has_a_transformers_form(tmp_path):
    for served, trained in (("qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b"), ("smollm2-135m", "smollm2-135m"),
                            ("qwen2.5-coder-1.5b", "smollm2-135m")):
        settings = config.load(cache_dir=tmp_path, llm_model=served)
        assert models.trained_spec(settings).key == trained
        expected = tmp_path / models.LLM_MODELS[served].hf_dirname if served == trained else None
        assert models.training_checkpoint_dir(settings) == expected
    assert models.training_checkpoint_dir(config.load(cache_dir=tmp_path, llm_model="smollm2-135m")) == (
        models.embedded_checkpoint_dir(config.load(cache_dir=tmp_path)))  # the checkpoint it always had


def _fake_checkpoint(path, stamp=None):
    path.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (path / name).write_text("{}")
    if stamp is not None:
        (path / models.SOURCE_STAMP).write_text(json.dumps(stamp))
    return path


def test_a_checkpoint_made_from_other_weights_is_made_again(tmp_path, monkeypatch):
    """The stamp names the GGUF (sha256) a checkpoint was dequantized from: another one is never used."""
    spec = models.LLM_MODELS["qwen2.5-coder-0.5b"]
    settings = config.load(cache_dir=tmp_path, llm_model=spec.key)
    converted = []

    def convert(gguf, spec, target, log):
        converted.append(gguf.name)
        shutil.rmtree(target, ignore_errors=True)
        _fake_checkpoint(target, {"gguf_sha256": spec.sha256})

    monkeypatch.setattr(models, "_convert_gguf", convert)
    monkeypatch.setattr(models, "_spec_gguf_path", lambda settings, spec, log: tmp_path / spec.gguf)
    target = tmp_path / spec.hf_dirname
    _fake_checkpoint(target, {"gguf_sha256": "0" * 64})
    assert models.training_checkpoint(settings) == target and converted == [spec.gguf]
    assert models.training_checkpoint(settings) == target and converted == [spec.gguf]  # now it matches
    shutil.rmtree(target)
    _fake_checkpoint(target)  # no stamp at all: not known to be this model's
    assert models.training_checkpoint(settings) == target and len(converted) == 2


def test_an_unstamped_smollm2_checkpoint_is_adopted_not_replaced(tmp_path, monkeypatch):
    """Checkpoints made before stamps existed stay in place (running processes read them)."""
    monkeypatch.setattr(models, "_convert_gguf", lambda *a: pytest.fail("converted again"))
    target = _fake_checkpoint(tmp_path / models.EMBEDDED_LLM_DIRNAME)
    assert models.embedded_llm_checkpoint(config.load(cache_dir=tmp_path)) == target
    stamp = json.loads((target / models.SOURCE_STAMP).read_text())
    assert stamp["gguf_sha256"] == models.LLM_MODELS["smollm2-135m"].sha256 and stamp["adopted"] is True


def test_a_gguf_with_another_sha256_is_refused_before_converting(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF not the pinned weights")
    with pytest.raises(models.ModelNotAvailable, match="sha256"):
        models._convert_gguf(gguf, models.LLM_MODELS["qwen2.5-coder-0.5b"], tmp_path / "out", print)
    assert not (tmp_path / "out").exists()
    with pytest.raises(models.ModelNotAvailable, match="no transformers form"):
        models.llm_checkpoint(config.load(cache_dir=tmp_path), models.LLM_MODELS["qwen2.5-coder-1.5b"])


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
