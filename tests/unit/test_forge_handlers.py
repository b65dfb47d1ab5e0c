"""The forge service's run/curate/history against a fake memory and steward: stages, the instruction, errors."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import msgspec
import pytest

from batos import personas
from batos.errors import ServiceError
from proto.bodies.steward import Instruction
from services.forge import handlers_forge
from services.forge.training_script import template_source
from tests.typed_handler import call_handler
from tests.unit.test_forge_curation import dnu_cycle
from tests.unit.test_forge_history_audit import FakeMemory
from tests.unit.test_forge_training_script import GOOD


@pytest.fixture
def settings(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    return SimpleNamespace(var_dir=tmp_path / "var",
                           lora_dir=tmp_path / "var" / "lora_adapters", llm_backend="hf", llm_model_path=str(model),
                           llm_dtype="auto", llm_device="auto", llm_request_timeout=5.0, forge_threshold=3,
                           forge_program="forge", forge_train_timeout=21600.0)


def history(n=6, steward=None):
    return FakeMemory([f for i in range(n) for f in dnu_cycle(f"m{i}", f"def m{i}(self):\n    return {i}\n",
                                                                minute=i)], steward=steward)


class Events:
    def __init__(self):
        self.seen: list[tuple[str, dict]] = []

    async def __call__(self, name, **data):
        self.seen.append((name, data))


async def test_run_returns_the_stewards_instruction_with_everything_inline(settings):
    events = Events()
    out = await handlers_forge.prepare_forge(settings, history(), events, persona="BRICK",
                                             generate=lambda messages: "no idea, sorry", epochs=2,
                                             previous_expert="brick_old", cycle_id="c-1")
    assert [d["stage"] for _, d in events.seen] == ["curation", "script", "upgrade_requested"]
    assert events.seen[0][1]["examples"] == 6 and events.seen[1][1]["origin"] == "template"
    assert "rejected" in events.seen[1][1]["reason"]

    ins = msgspec.to_builtins(out.instruction)
    parsed = msgspec.convert(json.loads(json.dumps(ins)), Instruction)  # the steward can take it as sent
    assert parsed.id == out.instruction_id and parsed.previous_expert == "brick_old"
    assert ins["persona"] == "BRICK" and ins["program"] == "forge" and ins["origin"] == "template"
    assert ins["script"] == template_source() and sorted(ins["files"]) == ["eval.jsonl", "train.jsonl"]
    assert not (settings.var_dir / "forge_runs").exists()  # nothing passed through files

    config = ins["config"]
    assert config["base_model"] == settings.llm_model_path and config["training"]["num_train_epochs"] == 2
    assert config["cycle_id"] == "c-1" and config["instruction_id"] == out.instruction_id
    assert not {"train_path", "eval_path", "output_dir"} & set(config)  # the steward sets its own paths
    train = [json.loads(line) for line in ins["files"]["train.jsonl"].splitlines()]
    held = ins["files"]["eval.jsonl"].splitlines()
    assert len(train) + len(held) == 6 and len(config["train_ids"]) == len(train)
    # Trained on what the model sees at inference: BRICK's persona prompt merged before the kernel's system text.
    system = train[0]["messages"][0]
    assert system["role"] == "system" and system["content"] == personas.system_prompt("BRICK") + "\n\nYou are BRICK."


async def test_generated_script_is_used_when_valid(settings):
    async def brick(messages):
        return f"```python\n{GOOD}```"

    out = await handlers_forge.prepare_forge(settings, history(), Events(), persona="BRICK", generate=brick)
    assert out.script.origin == "generated"
    assert out.instruction.origin == "generated" and out.instruction.script == GOOD


async def test_no_examples_is_rejected_and_leaves_nothing(settings):
    with pytest.raises(ServiceError) as err:
        await handlers_forge.prepare_forge(settings, history(), Events(), persona="ROBIN")
    assert err.value.code == "rejected" and "no golden-path examples for ROBIN" in err.value.message


async def test_a_persona_the_steward_is_forging_is_busy(settings):
    with pytest.raises(ServiceError) as err:
        await handlers_forge.prepare_forge(settings, history(steward={"busy": ["BRICK"], "last_forge": {}}),
                                           Events(), persona="BRICK")
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
    def __init__(self, command, args, settings, memory):
        self.command, self.args = command, args
        self.ctx = SimpleNamespace(settings=settings, state={})
        self.client = SimpleNamespace(call=lambda service, command, body, timeout=None: memory(service, command, body))
        self.events = Events()

    async def emit(self, name, **data):
        await self.events(name, **data)

    async def run(self):
        return await call_handler("forge", self.command, handlers_forge.HANDLERS[self.command], self, self.args)


async def test_handlers(settings):
    out = await FakeRequest("curate", {"persona": "brick", "eval_percent": 0}, settings, history(4)).run()
    assert out["persona"] == "BRICK" and out["counts"]["train"] == 4 and out["counts"]["eval"] == 0
    assert Path(out["dataset"]["train_path"]).is_file()

    for bad in ({"persona": "JOKER"}, {}, {"persona": 7}, {"persona": "BRICK", "epoch": 2}):
        with pytest.raises(ServiceError) as err:
            await FakeRequest("run", bad, settings, history()).run()
        assert err.value.code == "bad_args"

    req = FakeRequest("run", {"persona": "BRICK", "generate_script": False, "max_steps": 2, "reason": "6 new"},
                      settings, history())
    out = await req.run()
    assert out["script"]["reason"] == "script generation disabled"
    assert out["instruction"]["config"]["training"]["max_steps"] == 2
    assert out["dataset"]["train_path"] is None and out["dataset"]["train"] + out["dataset"]["eval"] == 6

    report = await FakeRequest("history", {}, settings, history()).run()
    assert report["due"] == ["BRICK"] and report["counts"]["BRICK"] == 3  # threshold 3, 6 successes
    busy = history(steward={"busy": ["BRICK"], "last_forge": {"BRICK": "2025-09-01T00:00:00+00:00"}})
    report = await FakeRequest("history", {}, settings, busy).run()
    assert report["busy"] == ["BRICK"] and report["due"] == []
