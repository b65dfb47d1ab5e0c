"""Run a method's source in a confined process: namespaces + chroot + rlimits + a throwaway uid.

    run_method(source, selector, slots, args, kwargs, *, timeout_s, memory_mb, ...) -> SandboxResult

Synchronous; the kernel calls it from a thread (req.run_blocking). Each call starts

    unshare --mount --net --pid --ipc --uts --fork --kill-child --mount-proc  <python> -I -S sandbox_runner.py

in a new session with a clean environment. The runner (see its docstring and SANDBOX.md) forks the
method into an empty read-only root with a private 16 MiB /tmp, no network, rlimits on CPU, address
space, processes, file size and descriptors, as a fresh unprivileged uid with no capabilities.
Input travels as JSON on stdin; the result comes back through a dedicated descriptor, so nothing
the method prints can be mistaken for it. Stdout, stderr and result are unnamed temporary files
(O_TMPFILE): nothing appears on the host's file system, and RLIMIT_FSIZE bounds their size.

Where namespaces cannot be created the sandbox is unavailable and run_method raises
SandboxUnavailable: generated code is never run unconfined. The check is a probe run once per
process (cached); `probe_sandbox(force=True)` repeats it.

Slots: the method sees a JSON copy of the receiver's slots as attributes of `self` (mappings ->
dicts, sequences/sets -> lists, other values -> their repr string). `self.x = v` and in-place
mutations come back as `slot_updates` {name: JSON value}; `del self.x` as `deleted_slots`. The
sandbox persists nothing: the kernel decides whether to write them back (a slot whose value was
passed as a repr string should not be overwritten blindly with the method's version of it).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypedDict

from batos.uvm import RESERVED_NAMES
from services.kernel.code_policy import ALLOWED_MODULES, PolicyViolation, validate_method_source
from services.kernel.sandbox_result import RESULT_MAX_BYTES, MalformedResult, WireResult, decode_result
from services.kernel.sandbox_runner import to_jsonable

RUNNER = Path(__file__).with_name("sandbox_runner.py")
UNSHARE_ARGS = ("--mount", "--net", "--pid", "--ipc", "--uts", "--fork", "--kill-child", "--mount-proc")
CLEAN_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}  # nothing inherited: no keys, no tokens
STARTUP_GRACE_S = 5.0  # interpreter start + preload + teardown, on top of the method's own timeout
OUTPUT_MAX_CHARS = 64_000  # of stdout and of stderr each, kept in the result
FSIZE_MB = 4  # RLIMIT_FSIZE: any single file the method writes, its stdout/stderr included
TMP_MB = 16  # the method's private /tmp (tmpfs memory is outside RLIMIT_AS, so it is capped here)
MAX_PROCESSES = 1  # RLIMIT_NPROC for the method's own fresh uid: no fork, no threads
MIN_MEMORY_MB = 64  # the preloaded interpreter itself needs ~30 MiB of address space
SANDBOX_UID_RANGE = (1_000_000, 1_000_000_000)  # a fresh uid per run: no files, no peers to signal
PROBE_TIMEOUT_S = 15.0

# error_kind values: policy | exception | timeout | cpu | memory | output | crash | cancelled


class SandboxUnavailable(RuntimeError):
    """Isolation is missing or broken here; the method was not run."""


@dataclass(frozen=True)
class SandboxResult:
    ok: bool
    value: Any = None  # JSON-compatible (see to_jsonable); None when not ok
    error: str | None = None  # precise reason, e.g. "ZeroDivisionError: division by zero"
    error_kind: str | None = None  # see the list above
    killed_by: str | None = None  # "timeout" | "cpu" | "memory" | "signal:SIGSEGV" ...; None if it ended itself
    stdout: str = ""
    stderr: str = ""
    elapsed_s: float = 0.0  # wall time of the whole sandboxed run, process start to teardown
    slot_updates: dict[str, Any] = field(default_factory=dict)
    deleted_slots: tuple[str, ...] = ()
    exc_type: str | None = None  # the exception class name when error_kind == "exception"
    traceback: str | None = None  # user frames only
    cpu_s: float | None = None  # CPU time of the method process
    max_rss_mb: float | None = None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["deleted_slots"] = list(self.deleted_slots)
        return data


# ----------------------------------------------------------------------------------------------------
# Availability probe (once per process)
# ----------------------------------------------------------------------------------------------------

_probe_lock = threading.Lock()
_probe_outcome: tuple[bool, str, dict] | None = None  # (available, reason, checks)


def probe_sandbox(force: bool = False) -> dict:
    """Run the confinement once with a self-check; return its findings or raise SandboxUnavailable."""
    global _probe_outcome
    with _probe_lock:
        if _probe_outcome is None or force:
            _probe_outcome = _probe()
        available, reason, checks = _probe_outcome
    if not available:
        raise SandboxUnavailable(reason)
    return checks


def sandbox_available() -> bool:
    try:
        probe_sandbox()
    except SandboxUnavailable:
        return False
    return True


def _probe() -> tuple[bool, str, dict]:
    try:
        run = _spawn(
            {"mode": "probe", "timeout_s": PROBE_TIMEOUT_S, "cpu_s": PROBE_TIMEOUT_S, "memory_mb": 256},
            PROBE_TIMEOUT_S,
            None,
        )
        if not run.report or "setup_error" in run.report or not run.report.get("confined"):
            return False, _runner_failure(run), {}
        checks = run.result.value if run.result is not None and isinstance(run.result.value, dict) else {}
    except (OSError, SandboxUnavailable) as exc:
        return False, f"cannot start the sandbox: {exc}", {}
    problems = []
    if not isinstance(checks.get("uid"), int) or checks["uid"] == 0:
        problems.append(f"method runs as uid {checks.get('uid')}")
    if checks.get("root_write") not in {"EROFS", "EACCES", "EPERM"}:
        problems.append(f"root file system writable ({checks.get('root_write')})")
    if checks.get("tmp_write") != "allowed":
        problems.append(f"private /tmp not writable ({checks.get('tmp_write')})")
    if checks.get("network") in {"connected", None}:
        problems.append(f"network reachable ({checks.get('network')})")
    if not isinstance(checks.get("pid"), int) or checks["pid"] > 10:
        problems.append(f"not in a fresh PID namespace (pid {checks.get('pid')})")
    if checks.get("root_entries") != ["tmp"]:
        problems.append(f"host files visible: {checks.get('root_entries')}")
    if problems:
        return False, "sandbox probe failed: " + "; ".join(problems), checks
    return True, "", checks


# ----------------------------------------------------------------------------------------------------
# Running a method
# ----------------------------------------------------------------------------------------------------


def run_method(
    source: str,
    selector: str,
    slots: Mapping[str, Any],
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    timeout_s: float = 10.0,
    memory_mb: int = 512,
    cpu_s: float | None = None,
    methods: Mapping[str, str] | None = None,
    cancel: threading.Event | None = None,
    skip_policy: bool = False,
) -> SandboxResult:
    """Validate `source` (unless skip_policy, a TEST-ONLY hook) and run `selector` on a slots copy.

    methods: sources of the receiver's other methods, so `self.other()` works inside (validated too).
    cpu_s: CPU-time limit (default: timeout_s). cancel: set it to kill the run early.
    Raises SandboxUnavailable (nothing ran) and ValueError for bad arguments; every failure of the
    method itself comes back as SandboxResult(ok=False, error=..., error_kind=...).
    """
    if timeout_s <= 0 or (cpu_s is not None and cpu_s <= 0):
        raise ValueError("timeout_s and cpu_s must be positive")
    if memory_mb < MIN_MEMORY_MB:
        raise ValueError(f"memory_mb must be at least {MIN_MEMORY_MB}")
    others = dict(methods or {})
    if not skip_policy:
        try:
            source = validate_method_source(source, selector).source
            others = {name: validate_method_source(text, name).source for name, text in others.items()}
        except PolicyViolation as exc:
            return SandboxResult(ok=False, error=f"policy violation: {exc}", error_kind="policy")
    probe_sandbox()
    kwargs = dict(kwargs or {})
    if not all(isinstance(key, str) for key in kwargs):
        raise ValueError("keyword argument names must be strings")
    request = {
        "mode": "run",
        "source": source,
        "selector": selector,
        "methods": others,
        "slots": {str(name): to_jsonable(value) for name, value in slots.items()},
        "args": [to_jsonable(a) for a in args],
        "kwargs": {key: to_jsonable(value) for key, value in kwargs.items()},
        "timeout_s": timeout_s,
        "cpu_s": cpu_s if cpu_s is not None else timeout_s,
        "memory_mb": memory_mb,
    }
    run = _spawn(request, timeout_s, cancel)
    return _interpret(run, request)


@dataclass
class _Run:
    report: dict | None
    result: WireResult | None  # decoded and checked (sandbox_result.py); None when absent or malformed
    malformed: str | None  # why the result was refused
    stdout: str
    stderr: str
    returncode: int | None
    elapsed_s: float
    host_killed: str | None  # "timeout" | "cancelled" when this side had to kill the process group


def _spawn(request: dict, timeout_s: float, cancel: threading.Event | None) -> _Run:
    unshare = shutil.which("unshare", path="/usr/bin:/bin:/usr/sbin:/sbin")
    if unshare is None:
        raise SandboxUnavailable("`unshare` (util-linux) is not installed")
    if not sys.executable:
        raise SandboxUnavailable("no Python interpreter path to run the sandbox with")
    files = [tempfile.TemporaryFile() for _ in range(5)]
    stdin, stdout, stderr, result_file, report_file = files
    try:
        request = {
            **request,
            "uid": SANDBOX_UID_RANGE[0] + secrets.randbelow(SANDBOX_UID_RANGE[1] - SANDBOX_UID_RANGE[0]),
            "preload": sorted(ALLOWED_MODULES),
            "result_fd": result_file.fileno(),
            "report_fd": report_file.fileno(),
            "max_processes": MAX_PROCESSES,
            "fsize_mb": FSIZE_MB,
            "tmp_mb": TMP_MB,
            "result_max_bytes": RESULT_MAX_BYTES,
        }
        stdin.write(json.dumps(request).encode())
        stdin.seek(0)
        cmd = [unshare, *UNSHARE_ARGS, sys.executable, "-I", "-S", str(RUNNER)]
        started = time.monotonic()
        proc = subprocess.Popen(
            cmd, stdin=stdin, stdout=stdout, stderr=stderr, pass_fds=(result_file.fileno(), report_file.fileno()),
            env=CLEAN_ENV, cwd="/", start_new_session=True,
        )  # fmt: skip
        host_killed = _wait(proc, timeout_s + STARTUP_GRACE_S, cancel)
        elapsed = time.monotonic() - started
        result, malformed = _read_result(result_file, frozenset(request.get("slots") or ()))
        return _Run(
            report=_read_json(report_file),
            result=result,
            malformed=malformed,
            stdout=_read_text(stdout),
            stderr=_read_text(stderr),
            returncode=proc.returncode,
            elapsed_s=round(elapsed, 4),
            host_killed=host_killed,
        )
    finally:
        for fh in files:
            fh.close()


def _wait(proc: subprocess.Popen, deadline_s: float, cancel: threading.Event | None) -> str | None:
    """Wait for the sandbox; on overrun or cancel kill its whole process group (and so its PID namespace)."""
    end = time.monotonic() + deadline_s
    reason = None
    while True:
        try:
            proc.wait(timeout=0.05 if cancel is not None else max(0.0, end - time.monotonic()))
            return reason
        except subprocess.TimeoutExpired:
            pass
        if cancel is not None and cancel.is_set():
            reason = "cancelled"
        elif time.monotonic() >= end:
            reason = "timeout"
        if reason is not None:
            # unshare dies -> --kill-child SIGKILLs the namespace's PID 1 -> the kernel kills the rest.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            return reason


def _read_json(fh: Any) -> dict | None:
    fh.seek(0)
    data = fh.read(1 << 16)  # the supervisor's own report: small, written before any user code could touch it
    try:
        value = json.loads(data) if data else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _read_result(fh: Any, slot_names: frozenset[str]) -> tuple[WireResult | None, str | None]:
    """The method's result, read as untrusted input: (decoded result, None) or (None, why it was refused)."""
    size = fh.seek(0, os.SEEK_END)
    if size == 0:
        return None, None
    if size > RESULT_MAX_BYTES:
        return None, f"result is {size} bytes (limit {RESULT_MAX_BYTES})"
    fh.seek(0)
    try:
        return decode_result(fh.read(RESULT_MAX_BYTES), slot_names, RESERVED_NAMES), None
    except MalformedResult as e:
        return None, str(e)


def _read_text(fh: Any) -> str:
    size = fh.seek(0, os.SEEK_END)
    fh.seek(0)
    text = fh.read(OUTPUT_MAX_CHARS).decode("utf-8", errors="replace")
    if size > OUTPUT_MAX_CHARS:
        text += f"\n...[truncated: {size} bytes in all]"
    return text


def _runner_failure(run: _Run) -> str:
    if run.report and "setup_error" in run.report:
        return f"sandbox setup failed: {run.report['setup_error']}"
    if run.result is not None and run.result.error_kind == "sandbox":
        return str(run.result.error)
    tail = run.stderr.strip().splitlines()[-3:]
    return f"sandbox runner failed (exit status {run.returncode}): {' | '.join(tail) or 'no output'}"


_HOST_PREFIXES = sorted(
    {(str(RUNNER.parent.parent.parent), "<repo>"), (sys.prefix, "<python>"), (sys.base_prefix, "<python>"),
     (sys.exec_prefix, "<python>")},
    key=lambda pair: -len(pair[0]),
)
_FILE_LINE = re.compile(r'File "(/[^"]*)"')


def scrub_host_paths(text: str | None) -> str | None:
    """Tracebacks and stderr go to clients: no host paths (install layout, repo, home) in them."""
    if not text:
        return text
    text = _FILE_LINE.sub(lambda m: f'File "<lib>/{Path(m.group(1)).name}"', text)
    for prefix, label in _HOST_PREFIXES:
        if len(prefix) > 1:
            text = text.replace(prefix, label)
    return text


class _Measures(TypedDict):
    """What every SandboxResult carries, however the run ended."""

    stdout: str
    stderr: str
    elapsed_s: float
    cpu_s: float | None
    max_rss_mb: float | None


class _Killed(TypedDict):
    error: str
    error_kind: str
    killed_by: str


def _interpret(run: _Run, request: dict) -> SandboxResult:
    report = run.report or {}
    common: _Measures = {
        "stdout": run.stdout,
        "stderr": scrub_host_paths(run.stderr) or "",
        "elapsed_s": run.elapsed_s,
        "cpu_s": report.get("cpu_s"),
        "max_rss_mb": round(report["max_rss_kb"] / 1024, 2) if report.get("max_rss_kb") else None,
    }
    if run.host_killed == "cancelled":
        return SandboxResult(ok=False, error="cancelled by the requester", error_kind="cancelled", **common)
    if run.host_killed == "timeout" or report.get("timed_out"):
        error = f"timed out after {request['timeout_s']} s (wall clock)"
        return SandboxResult(ok=False, error=error, error_kind="timeout", killed_by="timeout", **common)
    if not report or "setup_error" in report or not report.get("confined"):
        # The method never ran: confinement could not be completed. Refuse, loudly.
        raise SandboxUnavailable(_runner_failure(run))
    killed = _killed_by_signal(report, request)
    if killed is not None:
        return SandboxResult(ok=False, **killed, **common)
    if run.malformed is not None:
        error = f"the sandbox's result was refused as malformed: {run.malformed}"
        return SandboxResult(ok=False, error=error, error_kind="output", **common)
    result = run.result
    if result is None:
        if "MemoryError" in run.stderr:
            error = "MemoryError: the method exceeded its memory limit"
            return SandboxResult(ok=False, error=error, error_kind="memory", killed_by="memory", **common)
        error = f"the method process exited (status {report.get('exit_code')}) without a result"
        return SandboxResult(ok=False, error=error, error_kind="crash", **common)
    if result.ok and report.get("exit_code") == 0:
        return SandboxResult(
            ok=True,
            value=result.value,
            slot_updates=dict(result.slot_updates),
            deleted_slots=tuple(result.deleted_slots),
            **common,
        )
    if result.ok:  # the runner exits 0 right after writing: anything else wrote this and then died
        error = f"the method process exited (status {report.get('exit_code')}) after an unconfirmed result"
        return SandboxResult(ok=False, error=error, error_kind="crash", **common)
    kind = str(result.error_kind or "exception")
    return SandboxResult(
        ok=False,
        error=scrub_host_paths(result.error) or "unknown failure",
        error_kind=kind,
        killed_by="memory" if kind == "memory" else None,
        exc_type=result.exc_type,
        traceback=scrub_host_paths(result.traceback),
        **common,
    )


def _killed_by_signal(report: dict, request: dict) -> _Killed | None:
    signum = report.get("signal")
    if not signum:
        return None
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = str(signum)
    cpu_limit = float(request["cpu_s"])
    if signum == signal.SIGXCPU or (signum == signal.SIGKILL and (report.get("cpu_s") or 0) >= cpu_limit - 0.05):
        error = f"CPU time limit exceeded ({report.get('cpu_s')} s used, limit {cpu_limit} s)"
        return {"error": error, "error_kind": "cpu", "killed_by": "cpu"}
    return {"error": f"the method process was killed by {name}", "error_kind": "crash", "killed_by": f"signal:{name}"}
