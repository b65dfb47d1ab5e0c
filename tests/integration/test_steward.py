"""The Ship of Theseus steward against a REAL supervisord: stop -> run script -> start, and its failure paths.

The broker side (``steward.upgrade`` from the kernel, kill -9 of the steward mid-run) is exercised with the
whole system in tests/integration/test_forge_e2e.py."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from batos.supervisor_rpc import Supervisor
from proto.bodies.steward import Instruction
from services.forge.steward import Steward

pytestmark = pytest.mark.integration

SUPERVISORD = Path(sys.executable).parent / "supervisord"

# The supervised "worker": records its pid at every start, then idles until stopped.
DUMMY = "import os, time, pathlib; pathlib.Path('starts').open('a').write(f'{os.getpid()}\\n'); time.sleep(3600)"


def _conf(root: Path) -> str:
    return textwrap.dedent(f"""
        [unix_http_server]
        file={root}/supervisor.sock

        [supervisord]
        nodaemon=true
        logfile={root}/supervisord.log
        pidfile={root}/supervisord.pid
        directory={root}

        [rpcinterface:supervisor]
        supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

        [program:dummy]
        command={sys.executable} -u -c "{DUMMY}"
        directory={root}
        startsecs=1
        autorestart=true
        stopwaitsecs=5
        stopasgroup=true
    """)


@pytest.fixture
def supervised():
    # A short path of our own: unix socket paths are limited to ~107 bytes and pytest's tmp_path can exceed it.
    root = Path(tempfile.mkdtemp(prefix="batos-sv-"))
    (root / "supervisord.conf").write_text(_conf(root))
    proc = subprocess.Popen([str(SUPERVISORD), "-c", str(root / "supervisord.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        supervisor = Supervisor(f"unix://{root}/supervisor.sock")
        deadline = time.monotonic() + 15
        while True:
            try:
                if supervisor.state("dummy") == "RUNNING":
                    break
            except Exception:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                log = (root / "supervisord.log").read_text()
                raise RuntimeError(f"supervisord did not start the dummy program: {log}")
            time.sleep(0.1)
        yield root, supervisor
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(root, ignore_errors=True)


def _starts(root: Path) -> list[int]:
    return [int(x) for x in (root / "starts").read_text().split()]


class Emitted(list):
    def __call__(self, event: str, **data: Any) -> None:
        self.append({"event": event, **data})

    def kinds(self) -> list[str]:
        return [e["event"] for e in self]


def _instruction(root: Path, script: str, ident: str, **kw: Any) -> Instruction:
    return Instruction(id=ident, persona="BRICK", script=textwrap.dedent(script), config={"persona": "BRICK"},
                       program="dummy", evaluate=False, **kw)


def _steward(root: Path, supervisor: Supervisor) -> Steward:
    return Steward(root / "steward", supervisor, confine_training=False)


# A training stand-in: proves the worker is DOWN while it runs, streams progress, writes an "adapter".
GOOD_SCRIPT = """
    import json, os, sys, pathlib
    first_pid = int(pathlib.Path('{root}/starts').read_text().split()[0])
    try:
        os.kill(first_pid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    config = json.loads(pathlib.Path(sys.argv[1]).read_text())
    print(json.dumps({{"event": "progress", "stage": "load", "ts": "fake", "step": 0, "total": 2}}))
    print(json.dumps({{"event": "progress", "step": 1, "total": 2, "loss": 2.5, "worker_alive": alive}}))
    print("plain text line")
    print(json.dumps({{"step": 2, "total": 2, "loss": 1.5}}))
    print(json.dumps({{"event": "finished", "ok": True}}))  # must not pass for the steward's own event
    out = pathlib.Path(config["output_dir"]); out.mkdir(parents=True, exist_ok=True)
    (out / 'adapter_config.json').write_text('{{}}')
"""


def test_stop_run_start(supervised):
    root, supervisor = supervised
    first = _starts(root)
    events = Emitted()
    result = _steward(root, supervisor).run(_instruction(root, GOOD_SCRIPT.format(root=root), "run1"), events)
    kinds = events.kinds()
    assert kinds[0] == "started" and kinds[-1] == "finished"
    assert kinds.index("stopped") < kinds.index("stage") < kinds.index("restarted") < kinds.index("finished")
    load, *progress = [e for e in events if e["event"] == "progress"]
    assert load["stage"] == "load" and "ts" not in load  # the script's stage kept, its timestamp dropped
    assert [p["step"] for p in progress] == [1, 2] and progress[0]["worker_alive"] is False
    assert progress[1]["loss"] == 1.5 and progress[0]["stage"] == "train"
    assert {"event": "output", "stage": "train", "text": "plain text line"} in events
    assert "script_finished" in kinds  # the script's own event was renamed
    assert result["ok"] is True and result["returncode"] == 0 and result["restarted"] is True
    # The worker was stopped and started again: a second, different pid, running now.
    starts = _starts(root)
    assert len(starts) == 2 and starts[0] == first[0] and starts[1] != starts[0]
    assert supervisor.state("dummy") == "RUNNING"
    assert not list((root / "steward" / "runs").iterdir())  # the work dir is gone


def test_failed_script_restarts_worker_and_reports(supervised):
    root, supervisor = supervised
    script = """
        import sys
        print("loading model")
        print("RuntimeError: out of memory", file=sys.stderr)
        sys.exit(1)
    """
    result = _steward(root, supervisor).run(_instruction(root, script, "bad1"), Emitted())
    assert result["ok"] is False and result["returncode"] == 1
    assert "out of memory" in result["reason"] and result["restarted"] is True
    assert len(_starts(root)) == 2 and supervisor.state("dummy") == "RUNNING"


def test_unknown_program_is_never_run(supervised):
    root, supervisor = supervised
    events = Emitted()
    result = _steward(root, supervisor).run(
        Instruction(id="ghost", persona="BRICK", script="print('ran')\n", config={}, program="nosuch",
                    evaluate=False), events)
    assert result["ok"] is False and "could not stop nosuch" in result["reason"] and result["returncode"] is None
    assert "restart_failed" in events.kinds() and not any(e.get("text") == "ran" for e in events)
    assert len(_starts(root)) == 1  # the real worker was never touched


def test_recover_after_steward_crash(supervised):
    root, supervisor = supervised
    steward = _steward(root, supervisor)
    # A previous steward stopped the worker, started training, and died (SIGKILL) mid-run.
    supervisor.stop("dummy")
    orphan = subprocess.Popen([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)",
                               "orphan-train.py", "config.json"], start_new_session=True, stdout=subprocess.PIPE,
                              text=True)
    assert orphan.stdout is not None and orphan.stdout.readline() == "up\n"
    steward.current_file.write_text(json.dumps({"id": "crash1", "persona": "BRICK", "program": "dummy",
                                                "child_pid": orphan.pid, "argv": ["orphan-train.py", "config.json"]}))
    recovered = steward.recover()
    assert orphan.wait(10) == -signal.SIGKILL  # the orphaned training group was killed
    orphan.stdout.close()
    assert recovered["ok"] is False and "not retried" in recovered["reason"] and recovered["restarted"] is True
    assert supervisor.state("dummy") == "RUNNING"
    assert steward.status()["runs"][-1]["id"] == "crash1" and not steward.current_file.exists()
