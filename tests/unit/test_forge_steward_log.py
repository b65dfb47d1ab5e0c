"""The steward without supervisord or a broker: its instruction, the events of a run, its private record (the
`status` that ALFRED's audit reads), one run at a time, and closing out a run a dead steward left behind."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

from batos.supervisor_rpc import SupervisorError
from proto import ProtocolError, contract
from proto.bodies.steward import Instruction
from services.forge.steward import ImageOps, Steward, StewardBusy


class StandInSupervisor:
    def __init__(self, fail_stop: bool = False):
        self.calls: list[tuple[str, str]] = []
        self.fail_stop = fail_stop

    def stop(self, program: str) -> str:
        self.calls.append(("stop", program))
        if self.fail_stop:
            raise SupervisorError("BAD_NAME")
        return "STOPPED"

    def start(self, program: str) -> str:
        self.calls.append(("start", program))
        return "RUNNING"


class StandInImage:
    """The steward's image work, in a dict: store records the adapter's files; the forge 'decides' at once."""

    def __init__(self, decide: str | None = "activated"):
        self.experts: dict[str, dict[str, Any]] = {}
        self.decision = decide

    def ops(self) -> ImageOps:
        def store(name: str, path: str, info: dict[str, Any]) -> dict[str, Any]:
            files = sorted(p.name for p in Path(path).iterdir())
            self.experts[name] = {**info, "name": name, "files": files, "oid": "3f", "size": 10,
                                  "decision": self.decision, "reason": "eval loss 1.0 < base 2.0"}
            return self.experts[name]

        return ImageOps(store=store, extract=lambda name, target: target,
                        get=lambda name: self.experts.get(name))


GOOD = """
    import json, pathlib, sys
    config = json.loads(pathlib.Path(sys.argv[1]).read_text())
    print(json.dumps({"event": "progress", "step": 1, "total": 1, "loss": 1.5}))
    print(json.dumps({"event": "finished", "ok": True}))  # must not pass for the steward's own event
    print("rows", len(pathlib.Path(config["train_path"]).read_text().splitlines()))
    out = pathlib.Path(config["output_dir"]); out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text("{}")
    (out / "training_meta.json").write_text(json.dumps({"dataset_sha256": "abc", "steps": 1}))
"""


def instruction(ident: str = "brick-1", script: str = GOOD, **kw: Any) -> Instruction:
    return Instruction(id=ident, persona="BRICK", script=textwrap.dedent(script),
                       config={"persona": "BRICK", "dataset_sha256": "abc"},
                       files={"train.jsonl": '{"messages": []}\n{"messages": []}\n', "eval.jsonl": ""},
                       evaluate=False, **kw)


def steward(tmp_path: Path, supervisor: Any = None, image: StandInImage | None = None) -> Steward:
    return Steward(tmp_path / "steward", supervisor or StandInSupervisor(), image=image.ops() if image else None,
                   confine_training=False, incarnation_grace=5)


class Emitted(list):
    def __call__(self, event: str, **data: Any) -> None:
        self.append({"event": event, **data})

    def kinds(self) -> list[str]:
        return [e["event"] for e in self]


def test_a_run_streams_its_events_stores_the_adapter_and_reports_the_decision(tmp_path):
    sup, image = StandInSupervisor(), StandInImage()
    s = steward(tmp_path, sup, image)
    events = Emitted()
    ins = instruction()
    result = s.run(ins, events)
    assert sup.calls == [("stop", "forge"), ("start", "forge")]
    kinds = events.kinds()
    assert kinds[:3] == ["started", "stopped", "stage"] and kinds[-2:] == ["finished", "incarnated"]
    assert kinds.index("stored") < kinds.index("restarted") < kinds.index("finished")  # stored before the restart
    assert "script_finished" in kinds  # the script's own "finished" was renamed
    assert {"event": "output", "stage": "train", "text": "rows 2"} in events  # the dataset travelled inline
    progress = next(e for e in events if e["event"] == "progress")
    assert progress["loss"] == 1.5 and progress["stage"] == "train"
    assert result["ok"] is True and result["expert"] == "brick_brick-1" and result["decision"] == "activated"
    stored = image.experts["brick_brick-1"]
    assert stored["files"] == ["adapter_config.json", "training_meta.json"] and stored["instruction_id"] == "brick-1"
    # the work dir is gone, the run is on record, nothing is in flight
    assert not (tmp_path / "steward" / "runs" / "brick-1").exists() and not s.current_file.exists()
    status = s.status()
    assert status["busy"] == [] and status["last_forge"] == {"BRICK": ins.created_at}
    assert [r["id"] for r in status["runs"]] == ["brick-1"] and status["runs"][0]["ok"] is True


def test_failures_restart_the_worker_and_say_why(tmp_path):
    sup = StandInSupervisor()
    s = steward(tmp_path, sup)
    failed = s.run(instruction("b1", "import sys\nprint('RuntimeError: out of memory')\nsys.exit(1)\n"), Emitted())
    assert failed["ok"] is False and failed["returncode"] == 1 and "out of memory" in failed["reason"]
    nothing = s.run(instruction("b2", "print('did nothing')\n"), Emitted())
    assert nothing["ok"] is False and "wrote no adapter" in nothing["reason"]
    slow = s.run(instruction("b3", "import time\nprint('working', flush=True)\ntime.sleep(60)\n", timeout_s=0.5),
                 Emitted())
    assert slow["ok"] is False and "timed out" in slow["reason"] and slow["restarted"] is True
    assert sup.calls == [("stop", "forge"), ("start", "forge")] * 3
    refused = steward(tmp_path, StandInSupervisor(fail_stop=True)).run(instruction("b4"), Emitted())
    assert "could not stop forge" in refused["reason"] and refused["returncode"] is None
    assert [r["ok"] for r in s.runs()][:3] == [False, False, False]
    assert s.status()["last_forge"]["BRICK"]  # failed attempts count as forges too


def test_one_upgrade_at_a_time(tmp_path):
    s = steward(tmp_path)
    started = threading.Event()
    script = "import time\nprint('up', flush=True)\ntime.sleep(30)\n"

    def emit(event: str, **data: Any) -> None:
        if event == "output":
            started.set()

    runner = threading.Thread(target=s.run, args=(instruction("long", script), emit))
    runner.start()
    try:
        assert started.wait(20)
        assert s.status()["busy"] == ["BRICK"] and s.status()["current"]["id"] == "long"
        with pytest.raises(StewardBusy, match="running forge long"):
            s.run(instruction("second"), Emitted())
    finally:
        s.request_stop()  # SIGTERM: kills the step; the worker is restarted in the finally clause
        runner.join(20)
    assert s.runs()[-1]["reason"].startswith("steward stopped during the run")


def test_the_instruction_is_checked_where_it_is_decoded():
    upgrade = contract.spec("steward", "upgrade")
    assert upgrade is not None and upgrade.request is Instruction
    good = contract.encode(instruction())
    assert contract.decode_request(upgrade, json.loads(json.dumps(good))) == instruction(created_at=good["created_at"])
    for bad, match in (({**good, "script": ""}, r"\$\.script"), ({**good, "id": "../../etc"}, r"\$\.id"),
                       ({**good, "files": {"../x.py": ""}}, r"\$\.files"), ({**good, "config": {}}, r"\$\.config"),
                       ({**good, "persona": "JOKER"}, "unknown persona"), ({**good, "program": "a b"}, r"\$\.program"),
                       ({**good, "surprise": 1}, "unknown field"), (["no"], "Expected `object`")):
        with pytest.raises(ProtocolError, match=match) as err:
            contract.decode_request(upgrade, bad)
        assert err.value.code == "bad_args"


def test_recover_closes_out_a_run_a_dead_steward_left(tmp_path):
    sup = StandInSupervisor()
    s = steward(tmp_path, sup)
    orphan = subprocess.Popen([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)",
                               "train_template.py", "config.json"], start_new_session=True, stdout=subprocess.PIPE,
                              text=True)
    assert orphan.stdout is not None and orphan.stdout.readline() == "up\n"
    work = s.state_dir / "runs" / "crash1"
    work.mkdir(parents=True)
    s.current_file.write_text(json.dumps({**contract.encode(instruction("crash1").describe()), "work_dir": str(work),
                                          "child_pid": orphan.pid, "argv": ["train_template.py", "config.json"]}))
    recovered = s.recover()
    assert orphan.wait(10) == -9  # the orphaned training group was killed
    orphan.stdout.close()
    assert recovered["id"] == "crash1" and "not retried" in recovered["reason"] and recovered["restarted"] is True
    assert "orphaned training process killed" in recovered["reason"]
    assert sup.calls == [("start", "forge")] and not work.exists() and not s.current_file.exists()
    assert s.runs()[-1]["id"] == "crash1" and s.runs()[-1]["ok"] is False
    assert s.recover() is None  # nothing left


def test_only_service_keys_reach_the_steward():
    """The steward's commands are internal: a console key is refused; a key must be listed to serve it."""
    from broker.roles import Access, Grant
    from proto.roles import Role

    access = Access({"svc": Grant(Role.SERVICE, frozenset({"*"})), "mem": Grant(Role.SERVICE, frozenset({"memory"}))})
    for command in ("upgrade", "status"):
        assert "internal to BAT OS" in access.may_request(Role.CONSOLE, "steward", command)
        assert access.may_request(Role.SERVICE, "steward", command) is None
    assert access.may_serve(Role.SERVICE, "steward", "svc") is None  # the local workers' key (the steward's)
    assert "may not serve 'steward'" in access.may_serve(Role.SERVICE, "steward", "mem")
    assert "console key" in access.may_serve(Role.CONSOLE, "steward", "someone")
