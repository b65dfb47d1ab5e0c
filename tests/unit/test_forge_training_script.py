"""fineTuneNewLoRA_: validating BRICK's training script, the template fallback, and the run's config."""

from __future__ import annotations

import ast
import json
from types import SimpleNamespace

import pytest

from services.forge import training_script as ts
from services.forge.training_script import (
    ForgeConfigError,
    build_config,
    extract_code,
    produce_script,
    template_source,
    validate_script,
)

GOOD = '''
import json, sys
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
import trl

cfg = json.load(open(sys.argv[1]))
tok = AutoTokenizer.from_pretrained(cfg["base_model"])
model = AutoModelForCausalLM.from_pretrained(cfg["base_model"])
data = load_dataset("json", data_files=cfg["train_path"], split="train")
lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
args = trl.SFTConfig(output_dir=cfg["output_dir"], learning_rate=2e-4, save_strategy="no")
trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=lora)
trainer.train()
trainer.model.save_pretrained(cfg["output_dir"])
'''


def test_good_script_and_the_template_pass():
    assert validate_script(GOOD) == []
    assert validate_script(template_source()) == []  # the template obeys the rules it stands in for


@pytest.mark.parametrize("mutation, problem", [
    (("import json, sys", "import json, sys, subprocess"), "import of 'subprocess' is not allowed"),
    (("from datasets import load_dataset", "from requests import get"), "import from 'requests' is not allowed"),
    (("trainer.train()", "pass"), "never calls train()"),
    (("trainer.model.save_pretrained(cfg[\"output_dir\"])", "pass"), "never saves the adapter"),
    (("from peft import LoraConfig", "from peft import get_peft_model as LoraConfig2"), "does not use peft.LoraConfig"),
    (("trl.SFTTrainer(", "trl.Trainer("), "does not use trl.SFTTrainer"),
    (("cfg = json.load(open(sys.argv[1]))", "cfg = json.load(open('c.json'))"), "sys.argv"),
    (("trainer.train()", "trainer.train(); import os; os.system('rm -rf /')"), "call to system() is not allowed"),
    (("trainer.train()", "trainer.train(); eval('1')"), "call to eval() is not allowed"),
    (("trainer.train()", "trainer.train(); ().__class__.__bases__"), "dunder attribute access '__class__'"),
    (("import json, sys", "from . import json, sys"), "import from '.'"),
])
def test_bad_scripts_are_rejected(mutation, problem):
    old, new = mutation
    assert old in GOOD
    problems = validate_script(GOOD.replace(old, new))
    assert any(problem in p for p in problems), problems


def test_unparseable_and_empty():
    assert validate_script("def (:\n")[0].startswith("does not parse")
    assert validate_script("   ") == ["empty script"]
    assert validate_script("x = 1\n" * 5000) == [f"script longer than {ts.MAX_SCRIPT_CHARS} characters"]


def test_extract_code_from_a_reply():
    reply = f"Here is the script:\n```python\n{GOOD}```\nIt trains a LoRA."
    assert extract_code(reply) == GOOD
    assert extract_code("print(1)") == "print(1)"
    assert extract_code("```\nunterminated = 1\n") == "unterminated = 1\n"


async def test_generated_script_accepted():
    async def generate(messages):
        assert messages[-1]["role"] == "user" and "sys.argv[1]" in messages[-1]["content"]
        assert '"r": 16' in messages[-1]["content"]  # Table 4 goes into the prompt
        return f"```python\n{GOOD}```"

    choice = await produce_script(generate, {"base_model": "m", "output_dir": "o"})
    assert choice.origin == "generated" and choice.source == GOOD and choice.reason == ""


@pytest.mark.parametrize("reply", [
    "I am a small model. Fine-tuning is the process of server-server-server-server",
    "```python\nimport torch\nmodel = torch.nn.Linear(2, 2)\n```",
    "",
])
async def test_garbage_falls_back_to_the_template(reply):
    choice = await produce_script(lambda messages: reply, {"base_model": "m"})  # a sync generate works too
    assert choice.origin == "template" and choice.source == template_source()
    assert choice.reason.startswith("generated script rejected:") and choice.problems


async def test_generation_error_and_disabled_fall_back():
    async def broken(messages):
        raise TimeoutError("llm took too long")

    choice = await produce_script(broken, {})
    assert choice.origin == "template" and "TimeoutError: llm took too long" in choice.reason
    assert (await produce_script(None, {})).reason == "script generation disabled"


def test_template_defaults_are_table_4():
    # Read the template's constants without importing it (the import pulls trl).
    tree = ast.parse(template_source())
    consts = {t.id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
              for t in node.targets if isinstance(t, ast.Name) and t.id.endswith("_DEFAULTS")}
    assert consts["LORA_DEFAULTS"] == ts.TABLE4_LORA
    assert consts["TRAINING_DEFAULTS"] == ts.TABLE4_TRAINING
    assert ts.TABLE4_LORA == {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "bias": "none",
                              "task_type": "CAUSAL_LM", "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    t = ts.TABLE4_TRAINING
    keys = ("learning_rate", "lr_scheduler_type", "per_device_train_batch_size", "gradient_accumulation_steps",
            "save_strategy", "logging_steps")
    assert tuple(t[k] for k in keys) == (2e-4, "cosine", 2, 2, "no", 10)


def test_build_config(tmp_path):
    base = {"base_model": "/m", "dtype": "auto", "device": "auto"}
    dataset = {"train_path": tmp_path / "t.jsonl", "eval_path": tmp_path / "e.jsonl", "sha256": "ab",
               "train_ids": ["e1"], "eval_ids": ["e2"]}
    cfg = build_config(base=base, persona="BRICK", dataset=dataset, output_dir=tmp_path / "out", epochs=3,
                       max_steps=4, logging_steps=1, previous_adapter="/prev")
    assert cfg["training"]["num_train_epochs"] == 3 and cfg["training"]["max_steps"] == 4
    assert cfg["training"]["logging_steps"] == 1 and cfg["lora"] == ts.TABLE4_LORA
    assert cfg["train_ids"] == ["e1"] and cfg["previous_adapter"] == "/prev" and cfg["base_model"] == "/m"
    json.dumps(cfg)  # it goes to disk as JSON
    with pytest.raises(ForgeConfigError, match="1-3"):
        build_config(base=base, persona="BRICK", dataset=dataset, output_dir=tmp_path, epochs=4)
    with pytest.raises(ForgeConfigError, match="max_steps"):
        build_config(base=base, persona="BRICK", dataset=dataset, output_dir=tmp_path, max_steps=0)


def test_resolve_base_model(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    hf = SimpleNamespace(llm_backend="hf", llm_model_path=str(model), llm_dtype="bfloat16", llm_device="cuda")
    assert ts.resolve_base_model(hf) == {"base_model": str(model), "dtype": "bfloat16", "device": "cuda",
                                         "serve_runtime": "transformers"}
    with pytest.raises(ForgeConfigError, match="no local weights"):
        ts.resolve_base_model(SimpleNamespace(llm_backend="openai", llm_model_path="", llm_dtype="auto",
                                              llm_device="auto"))
    with pytest.raises(ForgeConfigError, match="not a local transformers checkpoint"):
        ts.resolve_base_model(SimpleNamespace(llm_backend="hf", llm_model_path=str(tmp_path), llm_dtype="auto",
                                              llm_device="auto"))


@pytest.mark.parametrize(("served", "trained", "on_llamacpp"), [
    ("qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b", True),  # the default: its HF form, judged on llama.cpp
    ("smollm2-135m", "smollm2-135m", True),
    ("qwen2.5-coder-1.5b", "smollm2-135m", False),  # no HF form: the 135M model, judged on transformers
])  # fmt: skip
def test_resolve_embedded_base_model(monkeypatch, tmp_path, served, trained, on_llamacpp):
    import batos.models
    from batos.config import load

    made = []

    def checkpoint(settings, spec, log=None):  # stands in for the one-time GGUF dequantization
        made.append(spec.key)
        path = tmp_path / spec.hf_dirname
        path.mkdir(exist_ok=True)
        (path / "config.json").write_text("{}")
        return path

    monkeypatch.setattr(batos.models, "llm_checkpoint", checkpoint)
    monkeypatch.setattr(batos.models, "llm_gguf_path", lambda settings, log=None: tmp_path / "served.gguf")
    settings = load(llm_model=served, llm_backend="embedded", llm_runtime="auto", cache_dir=tmp_path)
    base = ts.resolve_base_model(settings)
    if not ts.serves_with_llamacpp(settings):  # llama-cpp-python not installed: the fallback's model
        trained = "smollm2-135m"
    assert made == [trained] and base["model"] == trained
    assert base["base_model"] == str(tmp_path / batos.models.LLM_MODELS[trained].hf_dirname)
    if on_llamacpp and ts.serves_with_llamacpp(settings):
        assert base["serve_runtime"] == "llamacpp" and base["serve_gguf"] == str(tmp_path / "served.gguf")
    else:
        assert base["serve_runtime"] == "transformers" and "serve_gguf" not in base
    # the transformers fallback serves SmolLM2-135M whatever llm_model says: the forge trains that
    forced = ts.resolve_base_model(load(llm_model=served, llm_backend="embedded", llm_runtime="transformers",
                                        cache_dir=tmp_path))  # fmt: skip
    assert forced["serve_runtime"] == "transformers" and forced["model"] == "smollm2-135m"
