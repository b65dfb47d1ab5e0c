"""The forge service's run/curate/history against a fake memory: stages, files, instruction, errors."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from batos import personas
from batos.errors import ServiceError
from batos.worker import Request
from services.forge import handlers_forge
from services.forge.steward import Instruction, write_instruction
from services.forge.training_script import template_source
from tests.unit.test_forge_curation import dnu_cycle
from tests.unit.test_forge_history_audit import FakeMemory
from tests.unit.test_forge_training_script import GOOD


@pytest.fixture
def settings(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    return SimpleNamespace(var_dir=tmp_path / "var", upgrade_channel=tmp_path / "var" / "upgrade_channel",
                           lora_dir=tmp_path / "var" / "lora_adapters", llm_backend="hf", llm_model_path=str(model),
                           llm_dtype="auto", llm_device="auto", llm_request_timeout=5.0, forge_threshold=3,
                           forge_program="forge", forge_train_timeout=21600.0)


def history(n=6):
    return FakeMemory([f for i in range(n) for f in dnu_cycle(f"m{i}", f"def m{i}(self):\n    return {i}\n",
                                                                minute=i)])


class Events:
    def __init__(self):
        self.seen: list[tuple[str, dict]] = []

    async def __call__(self, name, **data):
        self.seen.append((name, data))


async def test_run_writes_dataset_script_and_instruction(settings):
    events = Events()
    out = await handlers_forge.prepare_forge(settings, history(), events, persona="BRICK",
                                             generate=lambda messages: "no idea, sorry", epochs=2,
                                             previous_adapter="/prev", cycle_id="c-1")
    assert [d["stage"] for _, d in events.seen] == ["curation", "script", "upgrade_requested"]
    assert events.seen[0][1]["examples"] == 6 and events.seen[1][1]["origin"] == "template"
    assert "rejected" in events.seen[1][1]["reason"]

    ins = json.loads((settings.upgrade_channel / f"{out['instruction_id']}.json").read_text())
    Instruction.from_dict(ins)  # the steward can read it
    assert ins["persona"] == "BRICK" and ins["program"] == "forge" and ins["origin"] == "template"
    assert Path(ins["script_path"]).read_text() == template_source()
    assert ins["output_dir"].startswith(str(settings.lora_dir / "brick_"))
    assert out["log_path"] == str(settings.upgrade_channel / f"{out['instruction_id']}.log.jsonl")

    config = json.loads(Path(ins["config_path"]).read_text())
    assert config["base_model"] == settings.llm_model_path and config["training"]["num_train_epochs"] == 2
    assert config["previous_adapter"] == "/prev" and config["cycle_id"] == "c-1"
    assert config["instruction_id"] == out["instruction_id"] and config["output_dir"] == ins["output_dir"]
    train = [json.loads(line) for line in Path(config["train_path"]).read_text().splitlines()]
    held = Path(config["eval_path"]).read_text().splitlines()
    assert len(train) + len(held) == 6 and len(config["train_ids"]) == len(train)
    # Trained on what the model sees at inference: BRICK's persona prompt merged before the kernel's system text.
    system = train[0]["messages"][0]
    assert system["role"] == "system" and system["content"] == personas.system_prompt("BRICK") + "\n\nYou are BRICK."


async def test_generated_script_is_used_when_valid(settings):
    async def brick(messages):
        return f"```python\n{GOOD}```"

    out = await handlers_forge.prepare_forge(settings, history(), Events(), persona="BRICK", generate=brick)
    assert out["script"]["origin"] == "generated"
    assert Path(out["script_path"]).name == "train_generated.py" and Path(out["script_path"]).read_text() == GOOD


async def test_no_examples_is_rejected_and_leaves_nothing(settings):
    with pytest.raises(ServiceError) as err:
        await handlers_forge.prepare_forge(settings, history(), Events(), persona="ROBIN")
    assert err.value.code == "rejected" and "no golden-path examples for ROBIN" in err.value.message
    assert not list((settings.var_dir / "forge_runs").glob("*")) and not settings.upgrade_channel.exists()


async def test_pending_forge_is_busy(settings):
    write_instruction(settings.upgrade_channel, Instruction(id="x", persona="BRICK", script_path="s",
                                                            config_path="c", output_dir="o"))
    with pytest.raises(ServiceError) as err:
        await handlers_forge.prepare_forge(settings, history(), Events(), persona="BRICK")
    assert err.value.code == "busy"


async def test_bad_epochs_and_missing_weights(settings):
    with pytest.raises(ServiceError) as err:
        await handlers_forge.prepare_forge(settings, history(), Events(), persona="BRICK", epochs=5)
    assert err.value.code == "bad_args"
    settings.llm_backend, settings.llm_model_path = "openai", ""
    with pytest.raises(ServiceError) as err:
        await handlers_forge.prepare_forge(settings, history(), Events(), persona="BRICK")
    assert err.value.code == "unavailable"


class FakeRequest:
    arg = Request.arg  # the real argument checking

    def __init__(self, command, args, settings, memory):
        self.command, self.args = command, args
        self.ctx = SimpleNamespace(settings=settings, state={})
        self.client = SimpleNamespace(call=lambda service, command, body, timeout=None: memory(service, command, body))
        self.events = Events()

    async def emit(self, name, **data):
        await self.events(name, **data)


async def test_handlers(settings):
    req = FakeRequest("curate", {"persona": "brick", "eval_percent": 0}, settings, history(4))
    out = await handlers_forge.forge_handlers["curate"](req)
    assert out["persona"] == "BRICK" and out["counts"]["train"] == 4 and out["counts"]["eval"] == 0
    assert Path(out["dataset"]["train_path"]).is_file()

    for bad in ({"persona": "JOKER"}, {}, {"persona": 7}):
        with pytest.raises(ServiceError) as err:
            await handlers_forge.forge_handlers["run"](FakeRequest("run", bad, settings, history()))
        assert err.value.code == "bad_args"

    req = FakeRequest("run", {"persona": "BRICK", "generate_script": False, "max_steps": 2}, settings, history())
    out = await handlers_forge.forge_handlers["run"](req)
    assert out["script"]["reason"] == "script generation disabled"
    assert json.loads(Path(out["config_path"]).read_text())["training"]["max_steps"] == 2

    report = await handlers_forge.forge_handlers["history"](FakeRequest("history", {}, settings, history()))
    assert report["busy"] == ["BRICK"] and report["due"] == []  # the run above is pending
