"""The forge for real, on CPU: curate 8 tiny golden paths, train the embedded model with the template for 2
steps through the steward, evaluate base vs adapter, store it in an image as a LoRA expert, incarnate it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from batos import models
from batos.config import load
from services.forge import handlers_forge, incarnation, lora_experts
from services.forge.backends import llamacpp
from services.forge.steward import Steward
from services.forge.steward_main import image_ops
from tests.unit.test_forge_curation import dnu_cycle
from tests.unit.test_forge_handlers import Events
from tests.unit.test_forge_history_audit import FakeMemory
from tests.unit.test_forge_incarnation import FakeSystem, image  # noqa: F401  (the image fixture)

pytestmark = pytest.mark.slow


class StubSupervisor:
    """Stands in for supervisord (tests/integration/test_steward.py drives the real one)."""

    def __init__(self):
        self.calls: list[tuple[str, str]] = []

    def stop(self, program):
        self.calls.append(("stop", program))
        return "STOPPED"

    def start(self, program):
        self.calls.append(("start", program))
        return "RUNNING"


async def test_template_trains_evaluates_and_incarnates(tmp_path, monkeypatch, image):  # noqa: F811
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings = load(var_dir=tmp_path / "var", llm_backend="embedded", llm_device="cpu")
    memory = FakeMemory([f for i in range(8) for f in dnu_cycle(
        f"add_{i}", f"def add_{i}(self, x):\n    return x + {i}\n", minute=i)])
    out = await handlers_forge.prepare_forge(settings, memory, Events(), persona="BRICK", max_steps=2,
                                             logging_steps=1, format_prompts=1, eval_max_new_tokens=16,
                                             generate=lambda messages: "def train(): pass  # not a script")
    assert out.script.origin == "template"

    supervisor = StubSupervisor()
    steward = Steward(settings.steward_dir, supervisor, image=image_ops(image, asyncio.get_running_loop()),
                      incarnation_grace=0.1)  # nobody decides here: the incarnation below does
    lines: list[dict] = []
    result = await asyncio.to_thread(steward.run, out.instruction,
                                     lambda event, **data: lines.append({"event": event, **data}))
    finished = next(line for line in lines if line["event"] == "finished")
    assert finished["ok"] is True, finished.get("reason")
    assert supervisor.calls == [("stop", "forge"), ("start", "forge")]

    # Progress was streamed as it happened: training steps with their loss, then the evaluation.
    train_steps = [line for line in lines if line["event"] == "progress" and line.get("stage") == "train"
                   and "loss" in line]
    assert [p["step"] for p in train_steps] == [1, 2] and all(p["total"] == 2 for p in train_steps)
    assert any(line["event"] == "progress" and line.get("model") == "adapter" for line in lines)

    meta = result["training_meta"]
    assert meta["steps"] == 2 and meta["dataset_sha256"] == out.dataset.sha256 and meta["device"] == "cpu"
    assert meta["dtype"] == "float32" and meta["lora"]["r"] == 16 and meta["instruction_id"] == out.instruction_id
    metrics = result["metrics"]
    assert metrics == finished["metrics"] and metrics["eval_examples"] >= 1 and metrics["format_kind"] == "python"
    for model in ("base", "adapter"):
        assert metrics[model]["eval_loss"] > 0 and 0 <= metrics[model]["format_valid"] <= 1
    # Judged on the runtime that serves the model: llama.cpp with the adapter as a GGUF LoRA when installed.
    if llamacpp.available():
        assert metrics["runtime"] == "llamacpp" and metrics["gguf"] == str(models.llm_gguf_path(settings))
        assert Path(metrics["adapter"]["gguf_lora"]).read_bytes()[:4] == b"GGUF"
    else:
        assert metrics["runtime"] == "transformers"
    print("\nforge metrics:", json.dumps({k: metrics[k] for k in ("base", "adapter")}, default=str),
          "train seconds:", meta["seconds"], "eval seconds:", metrics["seconds"])

    stored = await image.read(lora_experts.get, result["expert"])
    assert stored["decision"] is None and stored["train_ids"] == meta["train_ids"]
    system = FakeSystem(image, tmp_path / "cache")
    (report,) = await incarnation.incarnate_lora_experts(system.deps())
    chosen, _ = incarnation.decide(metrics)
    assert report["decision"] == (incarnation.ACTIVATED if chosen else incarnation.KEPT_PREVIOUS)
    local = Path(await incarnation.materialize(result["expert"], system.deps()))
    assert (local / "adapter_config.json").is_file() and (local / "adapter_model.safetensors").is_file()
