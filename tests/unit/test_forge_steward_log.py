"""The upgrade channel's files without supervisord: instructions, and following a run's status log."""

from __future__ import annotations

import asyncio
import json

import pytest

from services.forge.steward import (
    Instruction,
    InstructionError,
    all_instructions,
    follow_log,
    log_path,
    write_instruction,
)


async def _collect(channel, ident, **kw):
    return [line async for line in follow_log(channel, ident, interval=0.01, **kw)]


async def test_follow_until_incarnated_across_partial_writes(tmp_path):
    path = log_path(tmp_path, "r1")

    async def writer():
        await asyncio.sleep(0.05)
        with open(path, "ab") as f:
            f.write(b'{"event": "started"}\n{"event": "progress", "st')  # a line cut mid-write
            f.flush()
            await asyncio.sleep(0.05)
            f.write(b'ep": 1}\n{"event": "finished", "ok": true}\n')
            f.flush()
            await asyncio.sleep(0.05)
            f.write(b'{"event": "incarnated", "decision": "activated"}\n{"event": "after"}\n')

    task = asyncio.create_task(writer())
    lines = await asyncio.wait_for(_collect(tmp_path, "r1"), 5)
    await task
    assert [line["event"] for line in lines] == ["started", "progress", "finished", "incarnated"]
    assert lines[1]["step"] == 1


async def test_follow_stops_at_a_failed_finish_and_after_the_grace(tmp_path):
    log_path(tmp_path, "bad").write_text('{"event": "finished", "ok": false, "reason": "oom"}\n{"event": "x"}\n')
    assert [line["event"] for line in await _collect(tmp_path, "bad")] == ["finished"]
    log_path(tmp_path, "ok").write_text('{"event": "finished", "ok": true}\n')
    lines = await asyncio.wait_for(_collect(tmp_path, "ok", incarnation_grace=0.05), 5)
    assert [line["event"] for line in lines] == ["finished"]  # the worker never reported: stop waiting
    with pytest.raises(TimeoutError):
        await _collect(tmp_path, "never", timeout=0.05)


def test_instruction_round_trip_and_validation(tmp_path):
    ins = Instruction(id="brick-1", persona="BRICK", script_path="/s.py", config_path="/c.json", output_dir="/o",
                      dataset={"train_path": "/t"})
    path = write_instruction(tmp_path, ins)
    assert Instruction.from_dict(json.loads(path.read_text())) == ins
    assert not list(tmp_path.glob(".*"))  # the tmp file was renamed into place
    assert [i["state"] for i in all_instructions(tmp_path)] == ["pending"]
    with pytest.raises(InstructionError, match="script_path"):
        Instruction.from_dict({"id": "a", "persona": "BRICK", "config_path": "c", "output_dir": "o"})
    with pytest.raises(InstructionError, match="alphanumeric"):
        Instruction.from_dict({**ins.to_dict(), "id": "../../etc/passwd"})
    with pytest.raises(InstructionError, match="object"):
        Instruction.from_dict(["not", "a", "dict"])
