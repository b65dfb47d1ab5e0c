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
