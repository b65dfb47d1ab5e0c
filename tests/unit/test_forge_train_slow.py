"""The forge for real, on CPU: curate 8 tiny golden paths, train the embedded model with the template for 2
steps through the steward, evaluate base vs adapter, and incarnate the result."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from batos.config import load
from services.forge import handlers_forge, incarnation
from services.forge.steward import Steward, read_log
from tests.unit.test_forge_curation import dnu_cycle
from tests.unit.test_forge_handlers import Events
from tests.unit.test_forge_history_audit import FakeMemory
from tests.unit.test_forge_incarnation import FakeSystem

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


async def test_template_trains_evaluates_and_incarnates(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings = load(var_dir=tmp_path / "var", llm_backend="embedded", llm_device="cpu")
    memory = FakeMemory([f for i in range(8) for f in dnu_cycle(
        f"add_{i}", f"def add_{i}(self, x):\n    return x + {i}\n", minute=i)])
    out = await handlers_forge.prepare_forge(settings, memory, Events(), persona="BRICK", max_steps=2,
                                             logging_steps=1, format_prompts=1, eval_max_new_tokens=16,
                                             generate=lambda messages: "def train(): pass  # not a script")
    assert out["script"]["origin"] == "template"

    supervisor = StubSupervisor()
    steward = Steward(settings.upgrade_channel, supervisor)
    assert steward.poll_once() == 1
    lines = read_log(settings.upgrade_channel, out["instruction_id"])
    finished = lines[-1]
    assert finished["event"] == "finished", lines[-5:]
    assert finished["ok"] is True, finished.get("reason")
    assert supervisor.calls == [("stop", "forge"), ("start", "forge")]

    # Progress was streamed as it happened: training steps with their loss, then the evaluation.
    train_steps = [line for line in lines if line["event"] == "progress" and line.get("stage") == "train"
                   and "loss" in line]
    assert [p["step"] for p in train_steps] == [1, 2] and all(p["total"] == 2 for p in train_steps)
    assert any(line["event"] == "progress" and line.get("model") == "adapter" for line in lines)

    adapter = Path(out["output_dir"])
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    meta = json.loads((adapter / "training_meta.json").read_text())
    assert meta["steps"] == 2 and meta["dataset_sha256"] == out["dataset"]["sha256"] and meta["device"] == "cpu"
    assert meta["dtype"] == "float32" and meta["lora"]["r"] == 16 and meta["instruction_id"] == out["instruction_id"]
    metrics = json.loads((adapter / "metrics.json").read_text())
    assert metrics == finished["metrics"] and metrics["eval_examples"] >= 1 and metrics["format_kind"] == "python"
    for model in ("base", "adapter"):
        assert metrics[model]["eval_loss"] > 0 and 0 <= metrics[model]["format_valid"] <= 1
    print("\nforge metrics:", json.dumps({k: metrics[k] for k in ("base", "adapter")}, default=str),
          "train seconds:", meta["seconds"], "eval seconds:", metrics["seconds"])

    system = FakeSystem()
    (report,) = await incarnation.incarnate_lora_experts(settings.lora_dir, system.deps())
    chosen, _ = incarnation.decide(metrics)
    assert report["decision"] == (incarnation.ACTIVATED if chosen else incarnation.KEPT_PREVIOUS)
    assert system.blobs and system.blobs[0][1]["train_ids"] == meta["train_ids"]
    assert os.path.getsize(adapter / "adapter_model.safetensors") < len(system.blobs[0][0])
