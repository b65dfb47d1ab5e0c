"""The evaluation's pieces that need no model weights: output formats and prompt masking."""

from __future__ import annotations

import json

import pytest

from services.forge import evaluation
from services.forge.evaluation import output_format


def test_output_formats():
    code = ["def f(self):\n    return 1\n", "```python\nclass A:\n    pass\n```"]
    assert output_format(code) == "python"
    actions = ['{"thought": "look", "action": "search_chunks", "query": "Token Governor", "summary_ids": []}']
    assert output_format(actions) == "react_action"
    assert output_format(['{"a": 1}', "[1, 2]"]) == "json"
    assert output_format(["The parser lives in x.py.", "def f(): pass"]) is None  # no shared format
    assert output_format([]) is None
    assert evaluation.is_python("x = 1") is False  # code, but not a definition: not the golden format
    assert evaluation.is_python("Sure! ```python\ndef f(): pass\n```") is False  # prose first
    assert evaluation.is_json("```json\n{\"a\": 1}\n```") is True


def test_encode_example_masks_the_prompt():
    # A real chat template (the embedded model's tokenizer; no weights are loaded).
    transformers = pytest.importorskip("transformers")
    from batos.config import load
    from batos.models import checkpoint_ready, embedded_checkpoint_dir

    path = embedded_checkpoint_dir(load())
    if not checkpoint_ready(path):
        pytest.skip("embedded checkpoint not prepared (python -m batos.models prepare)")
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    prompt = [{"role": "system", "content": "You are BRICK."}, {"role": "user", "content": "Write f."}]
    completion = [{"role": "assistant", "content": "def f(self):\n    return 1\n"}]
    ids, n_prompt = evaluation.encode_example(tok, prompt, completion, max_length=1024)
    assert tok.decode(ids[n_prompt:]).startswith("def f(self):\n    return 1\n")
    assert tok.decode(ids[:n_prompt]).endswith("<|im_start|>assistant\n")
    # Truncation keeps the completion (the part that is scored).
    short, n_short = evaluation.encode_example(tok, prompt, completion, max_length=len(ids) - n_prompt + 2)
    assert short[n_short:] == ids[n_prompt:] and n_short == 2


def test_main_refuses_a_missing_adapter(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"output_dir": str(tmp_path / "nothing")}))
    assert evaluation.main(["evaluation", str(config)]) == 1
    assert "no adapter" in capsys.readouterr().err
    assert evaluation.main(["evaluation"]) == 2


def test_completion_nll_scores_the_positions_transformers_scores():
    """llama.cpp's logits row t predicts token t+1, as transformers' shifted labels: same sum, same count."""
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    from services.forge.evaluation_gguf import completion_nll

    ids, n_prompt = [3, 1, 4, 1, 5, 9, 2, 6], 3
    scores = np.random.default_rng(0).normal(size=(len(ids), 10)).astype(np.float32)
    labels = torch.tensor(ids)
    labels[:n_prompt] = -100
    expected = torch.nn.functional.cross_entropy(torch.tensor(scores[:-1]), labels[1:], reduction="sum")
    nll, n = completion_nll(scores, ids, n_prompt)
    assert n == len(ids) - n_prompt and nll == pytest.approx(float(expected), rel=1e-5)
    assert completion_nll(scores, ids, len(ids)) == (0.0, 0)  # nothing to score


def _eval_rows(path, count):
    rows = [{"messages": [{"role": "system", "content": "You are BRICK. Reply with one Python method."},
                          {"role": "user", "content": f"Define add_{i}(self, x) returning x plus {i}."},
                          {"role": "assistant", "content": f"def add_{i}(self, x):\n    return x + {i}\n"}]}
            for i in range(count)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_the_adapter_is_judged_on_the_runtime_that_serves_it(tmp_path, monkeypatch):
    """The embedded default serves through llama.cpp: the evaluation measures the served GGUF with and without
    the adapter as a GGUF LoRA, and its figures agree with the transformers checkpoint's (same weights)."""
    pytest.importorskip("llama_cpp")
    from pathlib import Path

    from batos import config, models
    from services.forge import training_script
    from services.forge.backends import gguf_lora
    from tests.unit.random_lora import random_adapter

    monkeypatch.setattr(gguf_lora, "cache_dir", lambda: tmp_path / "gguf_lora")
    settings = config.load(llm_model="smollm2-135m", llm_backend="embedded", llm_device="cpu", llm_runtime="auto")
    base = training_script.resolve_base_model(settings)
    assert base["model"] == "smollm2-135m" and base["serve_runtime"] == "llamacpp"
    assert base["serve_gguf"] == str(models.embedded_gguf_path())
    import torch

    torch.manual_seed(1)  # PEFT draws the A matrices from the global generator: the same adapter every run
    adapter = random_adapter(Path(base["base_model"]), tmp_path / "adapter", std=0.25)
    eval_path = _eval_rows(tmp_path / "eval.jsonl", 2)
    cfg = training_script.build_config(base=base, persona="BRICK", dataset={"train_path": eval_path,
                                       "eval_path": eval_path}, output_dir=adapter,
                                       evaluation={"max_format_prompts": 1, "max_new_tokens": 8})  # fmt: skip

    served = evaluation.evaluate(cfg)
    # (losses only: greedy generation through transformers is the slow part, and is not compared)
    on_torch = evaluation.evaluate({**cfg, "serve_runtime": "transformers", "evaluation": {"max_format_prompts": 0}})
    assert served["runtime"] == "llamacpp" and on_torch["runtime"] == "transformers"
    assert Path(served["adapter"]["gguf_lora"]).read_bytes()[:4] == b"GGUF"
    assert served["format_kind"] == "python" and served["adapter"]["samples"]
    # same weights on two runtimes (the checkpoint is the GGUF dequantized): the base losses agree ...
    assert served["base"]["eval_loss"] == pytest.approx(on_torch["base"]["eval_loss"], rel=0.1)
    # ... and the adapter moves the loss alike on both: llama.cpp applied it (ignored, it would not move)
    moved_cpp = served["adapter"]["eval_loss"] - served["base"]["eval_loss"]
    moved_torch = on_torch["adapter"]["eval_loss"] - on_torch["base"]["eval_loss"]
    print("\nllama.cpp", served["base"]["eval_loss"], served["adapter"]["eval_loss"],
          "transformers", on_torch["base"]["eval_loss"], on_torch["adapter"]["eval_loss"])
    assert abs(moved_torch) > 0.05 and moved_cpp == pytest.approx(moved_torch, rel=0.3)
