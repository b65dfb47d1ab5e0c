"""The Ship of Theseus steward against a REAL supervisord: stop -> run script -> start, and its failure paths."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from services.forge.steward import Instruction, Steward, Supervisor, read_log, write_instruction

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


def _script(root: Path, body: str) -> Path:
    path = root / "train.py"
    path.write_text(textwrap.dedent(body))
    return path


def _instruction(root: Path, script: Path, ident: str, **kw) -> Instruction:
    return Instruction(id=ident, persona="BRICK", script_path=str(script), config_path=str(root / "config.json"),
                       output_dir=str(root / "adapter"), program="dummy", evaluate=False, **kw)


# A training stand-in: proves the worker is DOWN while it runs, streams progress, writes an "adapter".
GOOD_SCRIPT = """
    import json, os, sys, pathlib
    first_pid = int(pathlib.Path('{root}/starts').read_text().split()[0])
    try:
        os.kill(first_pid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    print(json.dumps({{"event": "progress", "stage": "load", "ts": "fake", "step": 0, "total": 2}}))
    print(json.dumps({{"event": "progress", "step": 1, "total": 2, "loss": 2.5, "worker_alive": alive}}))
    print("plain text line")
    print(json.dumps({{"step": 2, "total": 2, "loss": 1.5}}))
    print(json.dumps({{"event": "finished", "ok": True}}))  # must not pass for the steward's own line
    out = pathlib.Path('{root}/adapter'); out.mkdir(exist_ok=True)  # the steward creates it (confined)
    (out / 'adapter_config.json').write_text('{{}}')
    print("config arg:", sys.argv[1])
"""


def test_stop_run_start_through_the_channel(supervised):
    root, supervisor = supervised
    first = _starts(root)
    steward = Steward(root / "channel", supervisor)
    loop = threading.Thread(target=steward.run_forever, args=(0.1,), daemon=True)
    loop.start()
    try:
        write_instruction(root / "channel", _instruction(root, _script(root, GOOD_SCRIPT.format(root=root)), "run1"))
        deadline = time.monotonic() + 30
        while not (root / "channel" / "done" / "run1.json").exists():
            assert time.monotonic() < deadline, read_log(root / "channel", "run1")
            time.sleep(0.1)
    finally:
        steward.request_stop()
        loop.join(10)

    lines = read_log(root / "channel", "run1")
    events = [line["event"] for line in lines]
    assert events[0] == "started" and events[-1] == "finished"
    assert events.index("stopped") < events.index("stage") < events.index("restarted") < events.index("finished")
    load, *progress = [line for line in lines if line["event"] == "progress"]
    assert load["stage"] == "load" and load["ts"] != "fake"  # the script's stage kept, the steward's time
    assert [p["step"] for p in progress] == [1, 2] and progress[0]["worker_alive"] is False
    assert progress[1]["loss"] == 1.5 and progress[0]["stage"] == "train"
    assert any(line["event"] == "output" and line["text"] == "plain text line" for line in lines)
    assert any(line["event"] == "script_finished" for line in lines)  # the script's own line was renamed
    finished = lines[-1]
    assert finished["ok"] is True and finished["returncode"] == 0 and finished["restarted"] is True
    assert finished["adapter_dir"] == str(root / "adapter")
    # The worker was stopped and started again: a second, different pid, running now.
    starts = _starts(root)
    assert len(starts) == 2 and starts[0] == first[0] and starts[1] != starts[0]
    assert supervisor.state("dummy") == "RUNNING"
    done = json.loads((root / "channel" / "done" / "run1.json").read_text())
    assert done["result"]["ok"] is True and not list((root / "channel").glob("run1.json*"))
    assert not list((root / "channel").glob("*.running"))


def test_failed_script_restarts_worker_and_reports(supervised):
    root, supervisor = supervised
    script = _script(root, """
        import sys
        print("loading model")
        print("RuntimeError: out of memory", file=sys.stderr)
        sys.exit(1)
    """)
    steward = Steward(root / "channel", supervisor)
    write_instruction(root / "channel", _instruction(root, script, "bad1"))
    assert steward.poll_once() == 1
    finished = read_log(root / "channel", "bad1")[-1]
    assert finished["event"] == "finished" and finished["ok"] is False and finished["returncode"] == 1
    assert "out of memory" in finished["reason"] and finished["restarted"] is True
    assert len(_starts(root)) == 2 and supervisor.state("dummy") == "RUNNING"
    assert json.loads((root / "channel" / "done" / "bad1.json").read_text())["result"]["ok"] is False


def test_script_without_adapter_and_timeout_fail(supervised):
    root, supervisor = supervised
    steward = Steward(root / "channel", supervisor)
    write_instruction(root / "channel", _instruction(root, _script(root, "print('did nothing')\n"), "noad"))
    slow = root / "slow.py"
    slow.write_text("import time\nprint('working', flush=True)\ntime.sleep(60)\n")
    write_instruction(root / "channel", _instruction(root, slow, "slow1", timeout_s=1.0))
    started = time.monotonic()
    assert steward.poll_once() == 2
    assert time.monotonic() - started < 20
    noad = read_log(root / "channel", "noad")[-1]
    assert noad["ok"] is False and "wrote no adapter" in noad["reason"]
    slow_done = read_log(root / "channel", "slow1")[-1]
    assert slow_done["ok"] is False and "timed out" in slow_done["reason"] and slow_done["restarted"] is True
    assert supervisor.state("dummy") == "RUNNING"


def test_bad_instruction_and_unknown_program(supervised):
    root, supervisor = supervised
    channel = root / "channel"
    steward = Steward(channel, supervisor)
    channel.mkdir(exist_ok=True)
    (channel / "junk.json").write_text("{not json")
    write_instruction(channel, Instruction(id="ghost", persona="BRICK", script_path="/bin/true",
                                           config_path="c.json", output_dir=str(root / "o"), program="nosuch"))
    assert steward.poll_once() == 2
    assert "bad instruction" in read_log(channel, "junk")[-1]["reason"]
    ghost = read_log(channel, "ghost")[-1]
    assert ghost["ok"] is False and "could not stop nosuch" in ghost["reason"] and ghost["returncode"] is None
    assert len(_starts(root)) == 1  # the real worker was never touched


def test_recover_after_steward_crash(supervised):
    root, supervisor = supervised
    channel = root / "channel"
    steward = Steward(channel, supervisor)
    # A previous steward stopped the worker, started training, and died (SIGKILL) mid-run.
    supervisor.stop("dummy")
    orphan = subprocess.Popen([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)",
                               "orphan-train.py"], start_new_session=True, stdout=subprocess.PIPE, text=True)
    assert orphan.stdout.readline() == "up\n"  # it runs (long ago, in the real case)
    ins = _instruction(root, Path("orphan-train.py"), "crash1")
    (channel / "crash1.running").write_text(json.dumps({**ins.to_dict(), "child_pid": orphan.pid}))
    assert steward.recover() == ["crash1"]
    assert orphan.wait(10) == -signal.SIGKILL  # the orphaned training group was killed
    orphan.stdout.close()
    finished = read_log(channel, "crash1")[-1]
    assert finished["ok"] is False and "not retried" in finished["reason"] and finished["restarted"] is True
    assert supervisor.state("dummy") == "RUNNING"
    assert (channel / "done" / "crash1.json").exists() and not (channel / "crash1.running").exists()


def test_steward_main_stops_on_sigterm(supervised):
    root, _ = supervised
    env = {**os.environ, "BATOS_VAR_DIR": str(root)}
    proc = subprocess.Popen([sys.executable, "-m", "services.forge.steward_main", "--channel", str(root / "ch"),
                             "--supervisor-url", f"unix://{root}/supervisor.sock"], env=env,
                            stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    try:
        deadline = time.monotonic() + 20
        while not (root / "ch" / "done").exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "watching" in proc.stderr.read()
