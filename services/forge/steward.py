"""The Ship of Theseus steward (blueprint §5.3): stop the worker, run the forge, start the worker again.

The upgrade channel (``var/upgrade_channel/``) is a directory; one instruction is one JSON file:

    <id>.json         pending: written by the forge handler (tmp file + rename, so never seen half-written)
    <id>.running      the same instruction, renamed when the steward takes it, with the child's pid added
    <id>.log.jsonl    what happened, one JSON object a line, for the kernel to relay to the console:
                      started, stopped, stage, progress, output, restarted, finished{ok, returncode, ...}
    done/<id>.json    the instruction with its ``result`` once handled (success or not)

The steward drives supervisord over its XML-RPC interface: ``stopProcess(program, wait=True)``, then the
training script (and, after it, our own evaluation module, so the metrics that decide activation never
come from the generated code being judged), then ``startProcess(program, wait=True)`` in a ``finally``:
the worker is restarted whatever happened, unchanged when training failed, and the reason is reported.

Crash safety: a ``.running`` file found at start-up means a steward died mid-run. It is NOT retried: the
likeliest killers (the OOM killer during training, a hung device) would strike again and loop with the
worker down. The steward kills the orphaned training process group if it is still alive, reports the run as
failed, makes sure the program is running, and moves the instruction to ``done/``. ALFRED's next audit
dispatches a new forge once enough new history has accumulated.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import xmlrpc.client
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from services.forge import confine

log = logging.getLogger("batos.steward")

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TRAIN_TIMEOUT = 6 * 3600.0  # seconds; a CPU run of 1-3 epochs on a few hundred examples fits easily
EVALUATION_MODULE = "services.forge.evaluation"
OUTPUT_TAIL_LINES = 20  # the last lines of a failed step go into the reason
STEWARD_EVENTS = frozenset({"started", "stopped", "stage", "stage_done", "restarted", "restart_failed", "finished",
                            "incarnated"})


# What a training run may leave in its adapter directory is data, never code: the forge and the evaluation
# load it. Pickle-based weights (torch.load), code and links are refused.
UNSAFE_ADAPTER_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".py", ".pyc", ".so",
                                     ".npy", ".npz", ".joblib"})


class ConfinementUnavailable(RuntimeError):
    """The training script must run confined and cannot be here."""


def adapter_problem(adapter: Path) -> str:
    """Why the adapter directory must not be loaded ("" when it may): links, pickles, code."""
    for path in adapter.rglob("*"):
        if path.is_symlink():
            return f"{path.relative_to(adapter)} is a symbolic link"
        if path.is_file() and path.suffix.lower() in UNSAFE_ADAPTER_SUFFIXES:
            return f"{path.relative_to(adapter)} is not a data file the forge loads safely ({path.suffix})"
        if not (path.is_file() or path.is_dir()):
            return f"{path.relative_to(adapter)} is not a regular file"
    return ""


class InstructionError(ValueError):
    """An instruction file that cannot be handled (unreadable, missing fields)."""


@dataclass
class Instruction:
    id: str
    persona: str
    script_path: str
    config_path: str
    output_dir: str
    program: str = "forge"
    dataset: dict[str, Any] = field(default_factory=dict)  # train_path, eval_path, sha256
    origin: str = "template"  # "generated" or "template": who wrote the script
    evaluate: bool = True  # run the evaluation module after a successful training script
    timeout_s: float = DEFAULT_TRAIN_TIMEOUT
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())

    @classmethod
    def from_dict(cls, raw: Any) -> Instruction:
        if not isinstance(raw, dict):
            raise InstructionError("an instruction must be a JSON object")
        missing = [k for k in ("id", "persona", "script_path", "config_path", "output_dir") if not raw.get(k)]
        if missing:
            raise InstructionError(f"instruction lacks {', '.join(missing)}")
        known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        if not str(known["id"]).replace("-", "").replace("_", "").isalnum():
            raise InstructionError(f"instruction id {known['id']!r} must be alphanumeric (it names files)")
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def write_instruction(channel: Path, instruction: Instruction) -> Path:
    """Publish an instruction atomically: the steward only picks up ``*.json`` names, the tmp is hidden."""
    channel.mkdir(parents=True, exist_ok=True)
    final = channel / f"{instruction.id}.json"
    tmp = channel / f".{instruction.id}.json.tmp"
    tmp.write_text(json.dumps(instruction.to_dict(), indent=1), encoding="utf-8")
    os.replace(tmp, final)
    return final


def log_path(channel: Path, instruction_id: str) -> Path:
    return channel / f"{instruction_id}.log.jsonl"


def read_log(channel: Path, instruction_id: str) -> list[dict[str, Any]]:
    """The status lines written so far (a partial last line is skipped: it is still being written)."""
    path = log_path(channel, instruction_id)
    if not path.exists():
        return []
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            lines.append(json.loads(line))
    return lines


async def follow_log(channel: Path, instruction_id: str, *, interval: float = 0.5, timeout: float | None = None,
                     incarnation_grace: float = 300.0) -> AsyncIterator[dict[str, Any]]:
    """Yield the run's status lines as they are written (for the kernel to relay to the console).

    Ends after ``finished`` when the run failed; after a successful one it waits (at most
    ``incarnation_grace`` seconds) for the restarted worker's ``incarnated`` line, which says whether the new
    adapter was activated. ``timeout`` bounds the whole wait (TimeoutError).
    """
    path = log_path(channel, instruction_id)
    deadline = None if timeout is None else time.monotonic() + timeout
    grace_until: float | None = None
    offset = 0
    pending = b""
    while True:
        if path.exists():
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
            offset += len(chunk)
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for raw in complete:
                try:
                    line = json.loads(raw)
                except json.JSONDecodeError:
                    continue
                yield line
                if line.get("event") == "incarnated":
                    return
                if line.get("event") == "finished":
                    if not line.get("ok"):
                        return
                    grace_until = time.monotonic() + incarnation_grace
        now = time.monotonic()
        if grace_until is not None and now > grace_until:
            return
        if deadline is not None and now > deadline:
            raise TimeoutError(f"forge run {instruction_id} did not finish within {timeout:g} s")
        await asyncio.sleep(interval)


def all_instructions(channel: Path) -> list[dict[str, Any]]:
    """Every instruction in the channel, pending, running or done (ALFRED reads when each persona forged)."""
    found = []
    for pattern, state in (("*.json", "pending"), ("*.running", "running"), ("done/*.json", "done")):
        for path in sorted(channel.glob(pattern)):
            if path.name.startswith("."):
                continue
            with contextlib.suppress(OSError, json.JSONDecodeError):
                raw = json.loads(path.read_text(encoding="utf-8"))
                if isinstance(raw, dict):
                    found.append({**raw, "state": state})
    return found


# -- supervisord --------------------------------------------------------------------------------


class SupervisorError(RuntimeError):
    pass


class Supervisor:
    """The two supervisord calls the protocol needs, over its XML-RPC interface (unix socket or http)."""

    def __init__(self, url: str):
        from supervisor.xmlrpc import SupervisorTransport  # supervisor is pinned; imported here to keep tests light

        if not url.startswith(("unix://", "http://")):
            raise SupervisorError(f"supervisor url must be unix://PATH or http://HOST:PORT, not {url!r}")
        self.url = url
        # supervisorctl's own arrangement: the transport knows the real address, the proxy url is nominal.
        self._transport = SupervisorTransport(None, None, url)
        self._proxy = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=self._transport)

    def _call(self, method: str, *args: Any) -> Any:
        try:
            return getattr(self._proxy.supervisor, method)(*args)
        except xmlrpc.client.Fault as e:
            raise SupervisorError(f"supervisord {method}{args}: {e.faultString}") from e
        except (OSError, http.client.HTTPException) as e:
            # The transport keeps one persistent connection; after a failure it is unusable
            # ("CannotSendRequest") until dropped, so drop it and let the next call reconnect.
            self._transport.close()
            raise SupervisorError(f"supervisord at {self.url} unreachable: {e}") from e

    def state(self, program: str) -> str:
        return str(self._call("getProcessInfo", program)["statename"])

    def stop(self, program: str) -> str:
        try:
            self._call("stopProcess", program, True)
        except SupervisorError as e:
            if "NOT_RUNNING" not in str(e):  # already stopped is what we want
                raise
        return self.state(program)

    def start(self, program: str) -> str:
        try:
            self._call("startProcess", program, True)
        except SupervisorError as e:
            if "ALREADY_STARTED" not in str(e):
                raise
        return self.state(program)


# -- the steward ----------------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(UTC).isoformat()


class StatusLog:
    """Appends status lines to ``<id>.log.jsonl``; each line is flushed at once (the kernel tails it)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")  # kept open for the whole run

    def write(self, event: str, **data: Any) -> None:
        self._file.write(json.dumps({"event": event, "ts": _now(), **data}, default=str) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


@dataclass
class StepResult:
    returncode: int
    tail: list[str]
    reason: str = ""


class Steward:
    def __init__(self, channel: Path, supervisor: Supervisor, *, python: str = sys.executable,
                 own_program: str = "steward", confine_training: bool = True, hidden: list[Path] | None = None):
        self.channel = channel
        # Training scripts run confined (confine.py): no network, read-only world, writes only to the output
        # and a scratch dir, secrets hidden. Default hidden: the var dir's keys (the channel lives in var/).
        self.confine_training = confine_training
        self.hidden = list(hidden) if hidden is not None else [channel.parent / "keys"]
        self.supervisor = supervisor
        self.python = python
        self.own_program = own_program  # never stop ourselves
        self._child: subprocess.Popen[str] | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        (channel / "done").mkdir(parents=True, exist_ok=True)

    # -- driving ---------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """SIGTERM/SIGINT: kill a running step (the program is still restarted by the finally clause)."""
        self._stopping.set()
        self._kill_child()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def pending(self) -> list[Path]:
        """Instruction files, oldest first."""
        found = []
        for path in self.channel.glob("*.json"):
            if not path.name.startswith("."):
                with contextlib.suppress(FileNotFoundError):  # taken between the listing and the stat
                    found.append((path.stat().st_mtime, path.name, path))
        return [path for *_, path in sorted(found)]

    def poll_once(self) -> int:
        """Handle every pending instruction, oldest first; return how many were handled."""
        handled = 0
        for path in self.pending():
            if self.stopping:
                break
            self.handle(path)
            handled += 1
        return handled

    def run_forever(self, interval: float = 0.5) -> None:
        """Poll until :meth:`request_stop` (call :meth:`recover` first)."""
        while not self.stopping:
            try:
                self.poll_once()
            except Exception:  # one broken instruction must not end the steward
                log.exception("steward: poll failed")
            self._stopping.wait(interval)

    # -- one instruction ------------------------------------------------------------------------

    def handle(self, path: Path) -> dict[str, Any]:
        running = path.with_suffix(".running")
        try:
            os.replace(path, running)  # claim it: a second steward's rename fails, so one handles it
        except FileNotFoundError:
            return {"ok": False, "reason": "taken by another steward"}
        instruction_id = path.stem
        status = StatusLog(log_path(self.channel, instruction_id))
        try:
            try:
                instruction = Instruction.from_dict(json.loads(running.read_text(encoding="utf-8")))
            except (json.JSONDecodeError, InstructionError) as e:
                result = {"ok": False, "returncode": None, "reason": f"bad instruction: {e}"}
                status.write("finished", **result)
                self._finish(running, {"id": instruction_id}, result)
                return result
            result = self._run(instruction, running, status)
            self._finish(running, instruction.to_dict(), result)
            return result
        finally:
            status.close()

    def _run(self, ins: Instruction, running: Path, status: StatusLog) -> dict[str, Any]:
        started = time.monotonic()
        status.write("started", id=ins.id, persona=ins.persona, program=ins.program, origin=ins.origin,
                     script_path=ins.script_path)
        result: dict[str, Any] = {"ok": False, "returncode": None, "adapter_dir": None, "metrics": None}
        try:
            if ins.program == self.own_program:
                raise SupervisorError(f"refusing to stop {ins.program!r}: that is the steward itself")
            state = self.supervisor.stop(ins.program)
            status.write("stopped", program=ins.program, state=state)
            argv, env = self._training_command(ins, status)
            train = self._step("train", argv, ins, running, status, env=env)
            result["returncode"] = train.returncode
            adapter = Path(ins.output_dir)
            if train.returncode != 0:
                result["reason"] = train.reason or f"training script exited with {train.returncode}"
            elif not (adapter / "adapter_config.json").is_file():
                result["reason"] = f"training script exited 0 but wrote no adapter to {adapter}"
            elif problem := adapter_problem(adapter):
                result["reason"] = f"refused the adapter the training script wrote: {problem}"
            else:
                result["adapter_dir"] = str(adapter)
                result["ok"] = True
                if ins.evaluate:
                    ev = self._step("evaluate", [self.python, "-u", "-m", EVALUATION_MODULE, ins.config_path],
                                    ins, running, status)
                    result["metrics"] = _read_json(adapter / "metrics.json")
                    if ev.returncode != 0 or result["metrics"] is None:
                        result["ok"] = False
                        result["reason"] = ev.reason or "evaluation wrote no metrics.json"
        except SupervisorError as e:
            result["reason"] = f"could not stop {ins.program}: {e}; training not run"
        except ConfinementUnavailable as e:
            result["reason"] = str(e)
        except Exception as e:  # the program must be restarted whatever went wrong here
            log.exception("steward: run %s failed", ins.id)
            result["reason"] = f"{type(e).__name__}: {e}"
        finally:
            result.update(self._restart(ins.program, status))
            result["seconds"] = round(time.monotonic() - started, 1)
            if self.stopping and not result["ok"]:
                result["reason"] = "steward stopped during the run; " + str(result.get("reason", ""))
            status.write("finished", **result)
        return result

    def _restart(self, program: str, status: StatusLog) -> dict[str, Any]:
        if program == self.own_program:
            return {"restarted": False}
        try:
            state = self.supervisor.start(program)
            status.write("restarted", program=program, state=state)
            return {"restarted": state == "RUNNING", "program_state": state}
        except SupervisorError as e:
            status.write("restart_failed", program=program, reason=str(e))
            return {"restarted": False, "restart_error": str(e)}

    def _training_command(self, ins: Instruction, status: StatusLog) -> tuple[list[str], dict[str, str] | None]:
        """The training step's argv and environment: confined unless confinement is off; a generated script
        is never run unconfined (the template, our own code, may be, with a warning)."""
        argv = [self.python, "-u", ins.script_path, ins.config_path]
        if not self.confine_training:
            return argv, None
        why = confine.available()
        if why:
            if ins.origin != "template":
                raise ConfinementUnavailable(f"no confinement on this host ({why}): the generated training "
                                             "script was not run")
            log.warning("steward: %s; running the template training script unconfined", why)
            status.write("stage", stage="train", unconfined=why)
            return argv, None
        output = Path(ins.output_dir)
        scratch = Path(ins.config_path).parent / "scratch"
        for path in (output, scratch):
            path.mkdir(parents=True, exist_ok=True)
        env = {**confine.confined_env(scratch, self._env()), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
        return confine.confined_argv(argv, writable=[output, scratch], hidden=self.hidden), env

    @staticmethod
    def _env() -> dict[str, str]:
        return {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}

    def _step(self, stage: str, argv: list[str], ins: Instruction, running: Path, status: StatusLog,
              env: dict[str, str] | None = None) -> StepResult:
        """Run one child, relaying its stdout+stderr line by line; JSON lines become status events."""
        if self.stopping:
            return StepResult(-1, [], "steward stopping")
        env = env if env is not None else self._env()
        status.write("stage", stage=stage, argv=argv)
        with self._lock:
            # A new session: the child and its own children form a group we can kill as one.
            self._child = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True,
                                           errors="replace")
            child = self._child
        _write_json(running, {**ins.to_dict(), "child_pid": child.pid, "stage": stage})
        timed_out = threading.Event()
        timer = threading.Timer(ins.timeout_s, lambda: (timed_out.set(), self._kill_child()))
        timer.start()
        tail: list[str] = []
        try:
            assert child.stdout is not None
            for line in child.stdout:
                _relay(line.rstrip("\n"), stage, status, tail)
            returncode = child.wait()
        finally:
            timer.cancel()
            if child.poll() is None:  # we are leaving on an exception: never leave a training run behind
                self._kill_child()
                child.wait()
            with self._lock:
                self._child = None
        reason = ""
        if returncode != 0:
            why = f"timed out after {ins.timeout_s:.0f} s" if timed_out.is_set() else "failed"
            reason = f"{stage} {why} (exit {returncode}): " + " | ".join(tail[-5:])
        status.write("stage_done", stage=stage, returncode=returncode)
        return StepResult(returncode, tail, reason)

    def _kill_child(self) -> None:
        with self._lock:
            child = self._child
        if child is not None and child.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGKILL)

    def _finish(self, running: Path, instruction: dict[str, Any], result: dict[str, Any]) -> None:
        done = self.channel / "done" / f"{running.stem}.json"
        _write_json(done, {**{k: v for k, v in instruction.items() if k not in ("child_pid", "stage")},
                           "result": result})
        running.unlink(missing_ok=True)

    # -- crash recovery ---------------------------------------------------------------------------

    def recover(self) -> list[str]:
        """Close out runs a previous steward left in progress (see the module docstring for why no retry)."""
        recovered = []
        for running in sorted(self.channel.glob("*.running")):
            raw = _read_json(running) or {}
            pid = raw.get("child_pid")
            killed = _kill_orphan(pid, str(raw.get("script_path", ""))) if isinstance(pid, int) else False
            status = StatusLog(log_path(self.channel, running.stem))
            try:
                program = str(raw.get("program") or "forge")
                result = {"ok": False, "returncode": None, "adapter_dir": None, "metrics": None,
                          "reason": "the steward stopped while handling this instruction (crash or restart); "
                                    f"not retried{'; orphaned training process killed' if killed else ''}"}
                result.update(self._restart(program, status))
                status.write("finished", **result)
            finally:
                status.close()
            self._finish(running, raw or {"id": running.stem}, result)
            recovered.append(running.stem)
        return recovered


def _relay(line: str, stage: str, status: StatusLog, tail: list[str]) -> None:
    """One line of a child's output -> one status line: its JSON object (the steward's own fields win), or text."""
    tail.append(line)
    del tail[:-OUTPUT_TAIL_LINES]
    obj = None
    if line.startswith("{"):
        with contextlib.suppress(json.JSONDecodeError):
            obj = json.loads(line)
    if isinstance(obj, dict):
        event = str(obj.pop("event", "progress" if "step" in obj else "output"))
        if event in STEWARD_EVENTS:
            event = f"script_{event}"  # a script cannot forge the steward's own lifecycle lines
        obj.pop("ts", None)
        obj.setdefault("stage", stage)
        status.write(event, **{str(k): v for k, v in obj.items()})
    elif line.strip():
        status.write("output", stage=stage, text=line[:2000])


def _kill_orphan(pid: int, script_path: str) -> bool:
    """Kill a training group left by a dead steward, if that pid still runs the same script (pid reuse)."""
    cmdline = ""
    for _ in range(10):  # a process caught mid-exec shows an empty cmdline for a moment
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            return False
        if cmdline:
            break
        time.sleep(0.05)
    if script_path and script_path not in cmdline:
        return False
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
    os.replace(tmp, path)
