"""The Ship of Theseus steward (blueprint §5.3): stop the worker, run the forge, start the worker again.

The steward is the broker service ``steward`` (services/forge/steward_main.py). Its ``upgrade`` request
carries the whole instruction the forge service prepared (the training script's source, its config, the
curated dataset): the steward unpacks it into a private work directory, drives supervisord through
batos/supervisor_rpc.py (``stop`` → the training script → our own evaluation module, so the metrics that
decide activation never come from the generated code being judged → ``start`` in a ``finally``: the worker
is restarted whatever happened, unchanged when training failed) and streams what happens as events on that
request: started, stopped, stage, progress, output, stage_done, stored, restarted | restart_failed, finished,
incarnated. The reply is the run's result.

A trained and evaluated adapter is stored in the Living Image as a LoRA expert (a ZODB Blob through ZEO,
services/forge/lora_experts.py) before the worker is started again; the restarted worker judges it and
writes its decision there, which the steward waits for (``settings.forge_incarnation_grace``) and reports
as ``incarnated``.

Private state (``settings.steward_dir``, read and written by the steward only): ``runs.jsonl``, one line per
finished run (``status`` reports the last forge time per persona from it), ``current.json`` while a run is
in flight, and ``runs/<id>/``, the run's work directory (removed when the run ends).

Crash safety: a ``current.json`` found at start-up means a steward died mid-run (its ``upgrade`` request
was failed by the broker as ``worker_lost``: it is not idempotent). It is NOT retried: the likeliest killers
(the OOM killer during training, a hung device) would strike again and loop with the worker down. The
steward kills the orphaned training process group if it is still alive, records the run as failed, and
makes sure the program is running. ALFRED's next audit dispatches a new forge once enough new history has
accumulated.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from batos.supervisor_rpc import Supervisor, SupervisorError
from proto.bodies.steward import Instruction
from services.forge import confine

log = logging.getLogger("batos.steward")

REPO_ROOT = Path(__file__).resolve().parents[2]
EVALUATION_MODULE = "services.forge.evaluation"
OUTPUT_TAIL_LINES = 20  # the last lines of a failed step go into the reason
DECISION_POLL_S = 0.5  # how often the steward looks for the restarted worker's decision in the image
RECENT_RUNS = 20  # runs shown by `status`
STEWARD_EVENTS = frozenset({"started", "stopped", "stage", "stage_done", "restarted", "restart_failed", "finished",
                            "incarnated", "stored"})
DATASET_FILES = frozenset({"train.jsonl", "eval.jsonl"})


# What a training run may leave in its adapter directory is data, never code: the forge and the evaluation
# load it. Pickle-based weights (torch.load), code and links are refused.
UNSAFE_ADAPTER_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".py", ".pyc", ".so",
                                     ".npy", ".npz", ".joblib"})

Emit = Callable[..., None]  # emit(event, **data), called from the run's thread


class ConfinementUnavailable(RuntimeError):
    """The training script must run confined and cannot be here."""


class StewardBusy(RuntimeError):
    """Another upgrade is running: one at a time (each stops the worker)."""


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


def _now() -> str:
    return datetime.now(UTC).isoformat()


@dataclass
class StepResult:
    returncode: int
    tail: list[str]
    reason: str = ""


@dataclass
class ImageOps:
    """What the steward does in the Living Image (steward_main bridges them to ``batos.image.Image``)."""

    store: Callable[[str, str, dict[str, Any]], dict[str, Any]]  # (name, adapter_dir, info) -> expert summary
    extract: Callable[[str, str], str]  # (expert name, target dir) -> target
    get: Callable[[str], dict[str, Any] | None]  # expert name -> summary (with its decision), or None


class Steward:
    def __init__(self, state_dir: Path, supervisor: Supervisor, *, image: ImageOps | None = None,
                 python: str = sys.executable, own_program: str = "steward", confine_training: bool = True,
                 hidden: list[Path] | None = None, incarnation_grace: float = 300.0):
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.supervisor = supervisor
        self.image = image
        # Training scripts run confined (confine.py): no network, read-only world, writes only to the output
        # and a scratch dir, secrets hidden (default hidden: the var dir's keys).
        self.confine_training = confine_training
        self.hidden = list(hidden) if hidden is not None else [self.state_dir.parent / "keys"]
        self.python = python
        self.own_program = own_program  # never stop ourselves
        self.incarnation_grace = incarnation_grace
        self.current: Instruction | None = None
        self._child: subprocess.Popen[str] | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()

    # -- private state --------------------------------------------------------------------------

    @property
    def runs_file(self) -> Path:
        return self.state_dir / "runs.jsonl"

    @property
    def current_file(self) -> Path:
        return self.state_dir / "current.json"

    def runs(self) -> list[dict[str, Any]]:
        """Every finished run, oldest first (a partial last line, from a crash mid-write, is skipped)."""
        if not self.runs_file.exists():
            return []
        out = []
        for line in self.runs_file.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
        return out

    def _record_run(self, ins: dict[str, Any], result: dict[str, Any]) -> None:
        line = {**{k: ins.get(k) for k in ("id", "persona", "program", "origin", "created_at")},
                "finished_at": _now(), **{k: result.get(k) for k in ("ok", "reason", "expert", "decision",
                                                                      "seconds")}}
        with open(self.runs_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(line, default=str) + "\n")

    def status(self) -> dict[str, Any]:
        """runs (the last few), last_forge (persona -> time of its latest forge, failed ones too), busy."""
        runs = self.runs()
        last: dict[str, str] = {}
        for run in runs:
            persona = str(run.get("persona") or "").upper()
            if persona:
                last[persona] = max(last.get(persona, ""), str(run.get("created_at") or ""))
        current = self.current
        busy = [current.persona] if current is not None else []
        if current is not None:
            last[current.persona] = max(last.get(current.persona, ""), current.created_at)
        return {"runs": runs[-RECENT_RUNS:], "last_forge": last, "busy": busy,
                "current": _brief(current) if current is not None else None}

    # -- driving ---------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """SIGTERM/SIGINT: kill a running step (the program is still restarted by the finally clause)."""
        self._stopping.set()
        self._kill_child()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def run(self, ins: Instruction, emit: Emit) -> dict[str, Any]:
        """One upgrade, start to end, from a worker thread; raises :class:`StewardBusy` when one is running."""
        with self._lock:
            if self.current is not None:
                raise StewardBusy(f"the steward is running forge {self.current.id} ({self.current.persona}); "
                                  "one upgrade at a time")
            self.current = ins
        work = self.state_dir / "runs" / ins.id
        try:
            _write_json(self.current_file, {**_brief(ins), "work_dir": str(work)})
            result = self._run(ins, work, emit)
            self._record_run(msgspec.to_builtins(ins), result)
            return result
        finally:
            shutil.rmtree(work, ignore_errors=True)
            self.current_file.unlink(missing_ok=True)
            with self._lock:
                self.current = None

    def _unpack(self, ins: Instruction, work: Path, emit: Emit) -> dict[str, Any]:
        """The instruction's files in the work dir; the config's paths pointed at them."""
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        config = dict(ins.config)
        for name, text in ins.files.items():
            (work / name).write_text(text, encoding="utf-8")
            config[f"{name.split('.')[0]}_path"] = str(work / name)
        script = work / ("train_generated.py" if ins.origin == "generated" else "train_template.py")
        script.write_text(ins.script, encoding="utf-8")
        config.update(output_dir=str(work / "adapter"), script_path=str(script), instruction_id=ins.id,
                      previous_adapter=None)
        if ins.previous_expert and self.image is not None:
            try:
                config["previous_adapter"] = self.image.extract(ins.previous_expert, str(work / "previous"))
            except Exception as e:  # the evaluation then compares with the base model only
                emit("output", stage="prepare", text=f"previous adapter {ins.previous_expert} not read: {e}")
        (work / "config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
        return config

    def _run(self, ins: Instruction, work: Path, emit: Emit) -> dict[str, Any]:
        started = time.monotonic()
        emit("started", id=ins.id, persona=ins.persona, program=ins.program, origin=ins.origin)
        result: dict[str, Any] = {"ok": False, "returncode": None, "metrics": None, "expert": None}
        try:
            if ins.program == self.own_program:
                raise SupervisorError(f"refusing to stop {ins.program!r}: that is the steward itself")
            config = self._unpack(ins, work, emit)
            state = self.supervisor.stop(ins.program)
            emit("stopped", program=ins.program, state=state)
            argv, env = self._training_command(ins, config, emit)
            train = self._step("train", argv, ins, emit, env=env)
            result["returncode"] = train.returncode
            adapter = Path(config["output_dir"])
            if train.returncode != 0:
                result["reason"] = train.reason or f"training script exited with {train.returncode}"
            elif not (adapter / "adapter_config.json").is_file():
                result["reason"] = "training script exited 0 but wrote no adapter"
            elif problem := adapter_problem(adapter):
                result["reason"] = f"refused the adapter the training script wrote: {problem}"
            else:
                result["ok"] = True
                if ins.evaluate:
                    ev = self._step("evaluate", [self.python, "-u", "-m", EVALUATION_MODULE,
                                                 str(work / "config.json")], ins, emit)
                    result["metrics"] = _read_json(adapter / "metrics.json")
                    if ev.returncode != 0 or result["metrics"] is None:
                        result["ok"] = False
                        result["reason"] = ev.reason or "evaluation wrote no metrics.json"
                if result["ok"]:
                    result.update(self._store(ins, adapter, result["metrics"], emit))
        except SupervisorError as e:
            result["reason"] = f"could not stop {ins.program}: {e}; training not run"
        except ConfinementUnavailable as e:
            result["reason"] = str(e)
        except Exception as e:  # the program must be restarted whatever went wrong here
            log.exception("steward: run %s failed", ins.id)
            result["reason"] = f"{type(e).__name__}: {e}"
        finally:
            result.update(self._restart(ins.program, emit))
            result["seconds"] = round(time.monotonic() - started, 1)
            if self.stopping and not result["ok"]:
                result["reason"] = "steward stopped during the run; " + str(result.get("reason", ""))
            emit("finished", **result)
        if result["ok"] and result.get("expert"):
            result.update(self._await_decision(str(result["expert"]), emit))
        return result

    def _store(self, ins: Instruction, adapter: Path, metrics: Any, emit: Emit) -> dict[str, Any]:
        """The adapter into the image as an undecided LoRA expert, before the worker starts again."""
        if self.image is None:
            return {}
        meta = _read_json(adapter / "training_meta.json") or {}
        name = f"{ins.persona.lower()}_{ins.id}"
        info = {"persona": ins.persona, "instruction_id": ins.id, "metrics": metrics, "origin": ins.origin,
                "dataset_sha256": meta.get("dataset_sha256") or ins.config.get("dataset_sha256"),
                "train_ids": meta.get("train_ids", []), "eval_ids": meta.get("eval_ids", []),
                "base_model": meta.get("base_model"), "lora": meta.get("lora"), "training": meta.get("training"),
                "steps": meta.get("steps"), "cycle_id": ins.config.get("cycle_id")}
        expert = self.image.store(name, str(adapter), _plain(info))
        emit("stored", expert=name, oid=expert.get("oid"), size=expert.get("size"))
        return {"expert": name, "expert_oid": expert.get("oid"), "training_meta": meta}

    def _await_decision(self, name: str, emit: Emit) -> dict[str, Any]:
        """The restarted worker's decision on the expert (``incarnated``), or a note after the grace period."""
        assert self.image is not None
        deadline = time.monotonic() + self.incarnation_grace
        while not self.stopping:
            expert = self.image.get(name) or {}
            if expert.get("decision") is not None:
                outcome = {"expert": name, "decision": expert["decision"], "reason": expert.get("reason"),
                           "persona": expert.get("persona"), "metrics": expert.get("metrics")}
                emit("incarnated", **outcome)
                return {"decision": expert["decision"], "decision_reason": expert.get("reason")}
            if time.monotonic() > deadline:
                break
            self._stopping.wait(DECISION_POLL_S)
        return {"decision": None, "decision_reason": f"the restarted worker did not judge {name} within "
                                                     f"{self.incarnation_grace:g} s; see the forge worker's log"}

    def _restart(self, program: str, emit: Emit) -> dict[str, Any]:
        if program == self.own_program:
            return {"restarted": False}
        try:
            state = self.supervisor.start(program)
            emit("restarted", program=program, state=state)
            return {"restarted": state == "RUNNING", "program_state": state}
        except SupervisorError as e:
            emit("restart_failed", program=program, reason=str(e))
            return {"restarted": False, "restart_error": str(e)}

    def _training_command(self, ins: Instruction, config: dict[str, Any],
                          emit: Emit) -> tuple[list[str], dict[str, str] | None]:
        """The training step's argv and environment: confined unless confinement is off; a generated script
        is never run unconfined (the template, our own code, may be, with a warning)."""
        argv = [self.python, "-u", config["script_path"], str(Path(config["output_dir"]).parent / "config.json")]
        if not self.confine_training:
            return argv, None
        why = confine.available()
        if why:
            if ins.origin != "template":
                raise ConfinementUnavailable(f"no confinement on this host ({why}): the generated training "
                                             "script was not run")
            log.warning("steward: %s; running the template training script unconfined", why)
            emit("stage", stage="train", unconfined=why)
            return argv, None
        output = Path(config["output_dir"])
        scratch = output.parent / "scratch"
        for path in (output, scratch):
            path.mkdir(parents=True, exist_ok=True)
        env = {**confine.confined_env(scratch, self._env()), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
        return confine.confined_argv(argv, writable=[output, scratch], hidden=self.hidden), env

    @staticmethod
    def _env() -> dict[str, str]:
        return {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}

    def _step(self, stage: str, argv: list[str], ins: Instruction, emit: Emit,
              env: dict[str, str] | None = None) -> StepResult:
        """Run one child, relaying its stdout+stderr line by line; JSON lines become events."""
        if self.stopping:
            return StepResult(-1, [], "steward stopping")
        env = env if env is not None else self._env()
        emit("stage", stage=stage, argv=argv)
        with self._lock:
            # A new session: the child and its own children form a group we can kill as one.
            self._child = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True,
                                           errors="replace")
            child = self._child
        # the pid and what it runs, for the next steward to kill it if this one dies (recover)
        _write_json(self.current_file, {**_brief(ins), "child_pid": child.pid, "stage": stage,
                                        "argv": argv[-2:]})
        timed_out = threading.Event()

        def time_out() -> None:
            timed_out.set()
            self._kill_child()

        timer = threading.Timer(ins.timeout_s, time_out)
        timer.start()
        tail: list[str] = []
        try:
            for line in child.stdout or ():
                _relay(line.rstrip("\n"), stage, emit, tail)
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
        emit("stage_done", stage=stage, returncode=returncode)
        return StepResult(returncode, tail, reason)

    def _kill_child(self) -> None:
        with self._lock:
            child = self._child
        if child is not None and child.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGKILL)

    # -- crash recovery ---------------------------------------------------------------------------

    def recover(self) -> dict[str, Any] | None:
        """Close out the run a previous steward left in progress (see the module docstring for why no retry)."""
        raw = _read_json(self.current_file)
        if raw is None:
            return None
        pid = raw.get("child_pid")
        marker = " ".join(map(str, raw.get("argv") or []))
        killed = _kill_orphan(pid, marker) if isinstance(pid, int) else False
        program = str(raw.get("program") or "forge")
        result = {"ok": False, "reason": "the steward stopped while handling this instruction (crash or restart); "
                                         f"not retried{'; orphaned training process killed' if killed else ''}"}
        result.update(self._restart(program, lambda *a, **k: None))
        self._record_run(raw, result)
        shutil.rmtree(raw.get("work_dir") or self.state_dir / "runs" / str(raw.get("id")), ignore_errors=True)
        self.current_file.unlink(missing_ok=True)
        return {"id": raw.get("id"), "persona": raw.get("persona"), **result}


def _relay(line: str, stage: str, emit: Emit, tail: list[str]) -> None:
    """One line of a child's output -> one event: its JSON object (the steward's own fields win), or text."""
    tail.append(line)
    del tail[:-OUTPUT_TAIL_LINES]
    obj = None
    if line.startswith("{"):
        with contextlib.suppress(json.JSONDecodeError):
            obj = json.loads(line)
    if isinstance(obj, dict):
        event = str(obj.pop("event", "progress" if "step" in obj else "output"))
        if event in STEWARD_EVENTS:
            event = f"script_{event}"  # a script cannot forge the steward's own lifecycle events
        obj.pop("ts", None)
        obj.setdefault("stage", stage)
        emit(event, **{str(k): v for k, v in obj.items()})
    elif line.strip():
        emit("output", stage=stage, text=line[:2000])


def _kill_orphan(pid: int, marker: str) -> bool:
    """Kill a training group left by a dead steward, if that pid still runs the same command (pid reuse)."""
    cmdline = ""
    for _ in range(10):  # a process caught mid-exec shows an empty cmdline for a moment
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            return False
        if cmdline:
            break
        time.sleep(0.05)
    if marker and not all(part in cmdline for part in marker.split()):
        return False
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _brief(ins: Instruction) -> dict[str, Any]:
    """id, persona, program, origin, created_at: what current.json, runs.jsonl and ``status`` say of a run."""
    out: dict[str, Any] = msgspec.to_builtins(ins.describe())
    return out


def _plain(value: Any) -> Any:
    """JSON's view of a value (what the image stores: plain dicts, lists, strings, numbers)."""
    return json.loads(json.dumps(value, default=str))


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
