"""Generated training scripts run confined (issue 13 item 9): the real steward, real namespaces.

A hostile "training script" probes what the steward's rights would give it -- files outside its output,
the keys, a TCP service and a unix socket on the host, the steward's environment, disks under /dev, the
process table -- and reports each outcome as a JSON line (relayed by the steward as a ``probe`` event). The
supervisord half is a stand-in (stop/start are not what is under test); the confinement is the real one.
"""

from __future__ import annotations

import json
import os
import socket
import textwrap
import threading
from pathlib import Path

import pytest

from services.forge import confine
from services.forge.steward import Instruction, Steward

pytestmark = [pytest.mark.skipif(bool(confine.available()), reason=confine.available() or "n/a"),
              pytest.mark.timeout(120)]

SECRET_ENV = "STEWARD_SECRET_TOKEN"


class StandInSupervisor:
    def stop(self, program: str) -> str:
        return "STOPPED"

    def start(self, program: str) -> str:
        return "RUNNING"


PROBE = """
    import json, os, socket, sys
    found = {{}}
    def probe(name, fn):
        try:
            found[name] = "allowed: " + repr(fn())[:200]
        except BaseException as e:
            found[name] = "denied: " + type(e).__name__
    def write(path):
        with open(path, "w") as fh:
            fh.write("pwned")
    probe("write_output", lambda: write({out!r} + "/adapter_config.json"))
    probe("write_repo", lambda: write({repo!r} + "/pwned-by-training.txt"))
    probe("write_own_config", lambda: write(sys.argv[1]))
    probe("write_other_adapter", lambda: write({other!r} + "/adapter_config.json"))
    probe("write_var", lambda: write({var!r} + "/pwned.txt"))
    probe("write_tmp", lambda: write("/tmp/pwned-by-training.txt"))
    probe("read_key", lambda: open({key!r}).read())
    probe("tcp", lambda: socket.create_connection(("127.0.0.1", {port}), timeout=2).close())
    def unix():
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(2)
        s.connect({sock!r})
        s.close()
    probe("unix_socket", unix)
    found["secret_env"] = "present" if os.environ.get({env!r}) else "absent"
    found["disks"] = sorted(n for n in os.listdir("/dev") if n.startswith(("sd", "vd", "nvme", "loop", "mem")))
    found["pids"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    print(json.dumps({{"event": "probe", **found}}), flush=True)
"""


@pytest.fixture
def world(tmp_path: Path):
    var = tmp_path / "var"
    (var / "keys").mkdir(parents=True)
    (var / "keys" / "console.key_secret").write_text("KEY-MATERIAL")
    other = var / "lora_adapters" / "ROBIN-old"
    other.mkdir(parents=True)
    run = var / "forge" / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    server = socket.create_server(("127.0.0.1", 0))
    unix_path = str(var / "zeo.sock")
    unix_server = socket.socket(socket.AF_UNIX)
    unix_server.bind(unix_path)
    unix_server.listen()
    stop = threading.Event()

    def accept(sock: socket.socket) -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                sock.accept()[0].close()
            except OSError:
                pass

    threads = [threading.Thread(target=accept, args=(s,), daemon=True) for s in (server, unix_server)]
    for t in threads:
        t.start()
    os.environ[SECRET_ENV] = "hunter2"
    try:
        yield {"var": var, "run": run, "other": other, "port": server.getsockname()[1], "sock": unix_path}
    finally:
        os.environ.pop(SECRET_ENV, None)
        stop.set()
        server.close()
        unix_server.close()


def out_dir(world: dict, ident: str) -> Path:
    """Where the steward points a run's output: its private work dir (the only writable place)."""
    return world["var"] / "steward" / "runs" / ident / "adapter"


def run_script(world: dict, body: str, ident: str, **kw) -> list[dict]:
    steward = Steward(world["var"] / "steward", StandInSupervisor())  # hides var/keys by default
    events: list[dict] = []
    steward.run(Instruction(id=ident, persona="BRICK", script=textwrap.dedent(body), config={"persona": "BRICK"},
                            program="forge", evaluate=False, origin="generated", **kw),
                lambda event, **data: events.append({"event": event, **data}))
    return events


def test_a_generated_training_script_writes_only_its_output_and_reaches_nothing(world):
    repo = Path(__file__).resolve().parents[2]
    body = PROBE.format(out=str(out_dir(world, "probe1")), repo=str(repo),
                        other=str(world["other"]), var=str(world["var"]), port=world["port"], sock=world["sock"],
                        key=str(world["var"] / "keys" / "console.key_secret"), env=SECRET_ENV)
    lines = run_script(world, body, "probe1")
    probe = next((line for line in lines if line["event"] == "probe"), None)
    assert probe is not None, lines
    assert probe["write_output"].startswith("allowed")
    for name in ("write_repo", "write_own_config", "write_other_adapter", "write_var", "write_tmp", "read_key",
                 "tcp", "unix_socket"):
        assert probe[name].startswith("denied"), (name, probe[name])
    assert probe["secret_env"] == "absent" and probe["disks"] == []
    assert max(probe["pids"]) < 10  # its own PID namespace: no host process visible
    assert not (repo / "pwned-by-training.txt").exists() and (world["run"] / "config.json").read_text() == "{}"
    finished = lines[-1]
    assert finished["event"] == "finished" and finished["ok"] is True  # it did write an adapter_config.json


@pytest.mark.parametrize(("body", "expect"), [
    ("import pathlib, sys\nout = pathlib.Path({out!r})\n(out / 'adapter_config.json').write_text('{{}}')\n"
     "(out / 'adapter_model.bin').write_bytes(b'pickle')\n", "adapter_model.bin"),
    ("import os, pathlib\nout = pathlib.Path({out!r})\n(out / 'adapter_config.json').write_text('{{}}')\n"
     "os.symlink('/etc/passwd', out / 'tokenizer.json')\n", "symbolic link"),
])
def test_an_adapter_holding_pickles_or_links_is_refused(world, body, expect):
    ident = f"bad{abs(hash(expect)) % 1000}"
    lines = run_script(world, body.format(out=str(out_dir(world, ident))), ident)
    finished = lines[-1]
    assert finished["ok"] is False and expect in finished["reason"], finished


def test_a_script_that_overruns_is_killed_with_its_namespace(world):
    lines = run_script(world, "import time\nprint('working', flush=True)\ntime.sleep(60)\n", "slow1",
                       timeout_s=1.5)
    finished = lines[-1]
    assert finished["ok"] is False and "timed out" in finished["reason"]


def test_without_confinement_a_generated_script_is_not_run(world, monkeypatch):
    monkeypatch.setattr(confine, "available", lambda: "test: namespaces missing")
    lines = run_script(world, "print('ran')\n", "noconf")
    assert not any(line.get("text") == "ran" for line in lines)
    assert lines[-1]["ok"] is False and "was not run" in lines[-1]["reason"]


def test_confined_env_keeps_only_the_allow_list(tmp_path):
    env = confine.confined_env(tmp_path, {"PATH": "/bin", "OPENAI_API_KEY": "k", "BATOS_OPENAI_API_KEY": "k",
                                          "CUDA_VISIBLE_DEVICES": "0"})
    assert "OPENAI_API_KEY" not in env and "BATOS_OPENAI_API_KEY" not in env
    assert env["CUDA_VISIBLE_DEVICES"] == "0" and env["HOME"] == str(tmp_path.resolve())
    assert json.loads(confine.confined_argv(["x"], writable=[tmp_path])[-3])["writable"] == [str(tmp_path.resolve())]
