"""Runs one method inside the sandbox. Started by sandbox.py as PID 1 of fresh namespaces:

    unshare --mount --net --pid --ipc --uts --fork --kill-child --mount-proc  python -I -S sandbox_runner.py

Standard library only (it runs with -I -S, before and after the file system disappears).

PID 1 (root, "supervisor"): preloads the allowed modules, reads the request (JSON on fd 0), mounts
an empty read-only tmpfs as the future root with a small private tmpfs /tmp inside it, forks one
child, enforces the wall-clock limit on it, and writes its own report (exit status, signal, CPU
time, peak memory, whether confinement completed) as JSON to the report fd.

The child: closes the report fd, chroots into the empty root, sets rlimits, drops to a fresh
unprivileged uid with no capabilities and no_new_privs, tells the supervisor it is confined, then
runs the method and writes the result as JSON to the result fd. User prints go to fds 1/2.
The child is not PID 1, so default signal actions (SIGXCPU) kill it normally. See SANDBOX.md.
"""

from __future__ import annotations

import builtins
import collections.abc
import ctypes
import errno
import importlib
import io
import json
import linecache
import math
import os
import resource
import select
import signal
import socket
import sys
import time
import traceback

# The host passes two files by descriptor number (in the request): "result_fd", child -> host, the
# method's result (user code can reach it, so it can only forge its own result); "report_fd",
# supervisor -> host, closed in the child before any user code runs.
NEW_ROOT = "/tmp"  # in our private mount namespace only: an empty tmpfs is mounted over it
WORK_DIR = "/tmp"  # inside the new root: the only writable place, cwd of the method
MAX_REPR_CHARS = 2_000
MAX_DEPTH = 40
# Modules loaded lazily by ordinary operations (str.encode("latin-1"), datetime.strptime, tracebacks);
# after the chroot nothing can be imported from disk, so they are loaded up front.
RUNNER_PRELOAD = (
    "encodings.latin_1", "encodings.ascii", "encodings.utf_16", "encodings.utf_32", "encodings.cp1252",
    "encodings.idna", "encodings.raw_unicode_escape", "encodings.unicode_escape", "_strptime", "unicodedata",
    "collections.abc", "json.decoder", "json.encoder", "json.scanner",
)  # fmt: skip

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_NO_NEW_PRIVS = 38


# ------------------------------------------------------------------------------------------------
# JSON conversion (also imported by sandbox.py for the slots copy)
# ------------------------------------------------------------------------------------------------


def to_jsonable(value: object, _depth: int = 0, _seen: frozenset[int] = frozenset()) -> object:
    """A JSON-compatible copy: mappings -> dicts, sequences, sets and dict views -> lists, anything else -> repr."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if _depth >= MAX_DEPTH or id(value) in _seen:
        return "<recursive or too deep>"
    seen = _seen | {id(value)}
    if isinstance(value, collections.abc.Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                key = json.dumps(key) if key is None or isinstance(key, bool | int | float) else _short_repr(key)
            out[key] = to_jsonable(item, _depth + 1, seen)
        return out
    if isinstance(value, list | tuple | set | frozenset | collections.abc.Set | collections.abc.ValuesView) or (
        isinstance(value, collections.abc.Sequence) and not isinstance(value, bytes | bytearray | memoryview)
    ):  # Set covers dict.keys() / dict.items() views: finite, already in memory
        return [to_jsonable(item, _depth + 1, seen) for item in value]
    return _short_repr(value)


def _short_repr(value: object) -> str:
    try:
        text = repr(value)
    except Exception as exc:
        text = f"<unrepresentable {type(value).__name__}: {exc}>"
    return text if len(text) <= MAX_REPR_CHARS else text[:MAX_REPR_CHARS] + "...<truncated>"


# ------------------------------------------------------------------------------------------------
# Supervisor (PID 1, root inside the namespaces)
# ------------------------------------------------------------------------------------------------


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: s.encode() if s is not None else None
    if _libc().mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype or source} on {target}: {os.strerror(err)}")


def _preload(names: list[str]) -> None:
    for name in [*names, *RUNNER_PRELOAD]:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            print(f"sandbox runner: could not preload {name}: {exc}", file=sys.stderr)


def _prepare_root(uid: int, tmp_mb: int) -> None:
    """Private propagation, then an empty read-only root with a private tmpfs /tmp inside."""
    if os.getpid() != 1 or os.geteuid() != 0:
        where = f"pid={os.getpid()}, euid={os.geteuid()}"
        raise RuntimeError(f"runner must be PID 1 and root in fresh namespaces ({where})")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount may propagate to the host
    _mount("sandbox-root", NEW_ROOT, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=16,mode=0755")
    work = NEW_ROOT + WORK_DIR
    os.mkdir(work, 0o700)
    opts = f"size={tmp_mb}m,nr_inodes=1024,mode=0700,uid={uid},gid={uid}"
    _mount("sandbox-tmp", work, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, opts)
    _mount(None, NEW_ROOT, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _supervise(request: dict) -> int:
    uid = int(request["uid"])
    _preload(list(request.get("preload", [])))
    _prepare_root(uid, int(request.get("tmp_mb", 16)))
    confined_r, confined_w = os.pipe()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(request["report_fd"])
            os.close(confined_r)
            _child(request, uid, confined_w)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(70)  # _child exits by itself; reaching this line means the runner failed
    os.close(confined_w)
    report = _wait_child(pid, float(request["timeout_s"]), started)
    report["confined"] = os.read(confined_r, 1) == b"1"  # every writer is gone: never blocks
    os.write(request["report_fd"], json.dumps(report).encode())
    return 0


def _wait_child(pid: int, timeout_s: float, started: float) -> dict:
    pidfd = os.pidfd_open(pid)
    ready, _, _ = select.select([pidfd], [], [], timeout_s)
    timed_out = not ready
    if timed_out:
        os.kill(pid, signal.SIGKILL)
    _, status, usage = os.wait4(pid, 0)
    os.close(pidfd)
    return {
        "timed_out": timed_out,
        "exit_code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 4),
        "max_rss_kb": usage.ru_maxrss,
        "wall_s": round(time.monotonic() - started, 4),
    }


# ------------------------------------------------------------------------------------------------
# Child: confine, then run
# ------------------------------------------------------------------------------------------------


def _confine(request: dict, uid: int) -> None:
    os.chdir(NEW_ROOT)
    os.chroot(NEW_ROOT)
    os.chdir(WORK_DIR)
    mib = 1024 * 1024
    cpu = max(1, math.ceil(float(request["cpu_s"])))
    limits = {
        resource.RLIMIT_CPU: (cpu, cpu + 1),  # soft: SIGXCPU (kills), hard: SIGKILL
        resource.RLIMIT_AS: (int(request["memory_mb"]) * mib,) * 2,
        resource.RLIMIT_NPROC: (int(request.get("max_processes", 1)),) * 2,  # per uid; the uid is fresh
        resource.RLIMIT_FSIZE: (int(request.get("fsize_mb", 4)) * mib,) * 2,
        resource.RLIMIT_NOFILE: (16, 16),
        resource.RLIMIT_CORE: (0, 0),
        resource.RLIMIT_MEMLOCK: (0, 0),
        resource.RLIMIT_MSGQUEUE: (0, 0),
    }
    for which, (soft, hard) in limits.items():
        resource.setrlimit(which, (soft, hard))
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)  # from root to non-root: permitted/effective capabilities are cleared
    if _libc().prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    # Verify rather than trust: a root-equivalent child must never run user code.
    if os.getuid() == 0 or os.geteuid() == 0:
        raise RuntimeError("privileges were not dropped")
    try:
        os.chroot("/")
    except PermissionError:
        pass
    else:
        raise RuntimeError("CAP_SYS_CHROOT still held after dropping privileges")
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # oversize writes raise OSError(EFBIG) instead of killing
    os.environ.clear()
    if isinstance(sys.stdout, io.TextIOWrapper):  # always, as the host spawns it; the stub says TextIO
        sys.stdout.reconfigure(line_buffering=True)


def _child(request: dict, uid: int, confined_w: int) -> None:
    result_fd = request["result_fd"]
    try:
        _confine(request, uid)
    except BaseException as exc:
        _write_result(result_fd, {"ok": False, "error_kind": "sandbox", "error": f"sandbox setup failed: {exc!r}"})
        os._exit(71)
    os.write(confined_w, b"1")
    os.close(confined_w)
    result = _self_check() if request.get("mode") == "probe" else _run_method(request)
    sys.stdout.flush()
    sys.stderr.flush()
    _write_result(result_fd, result, int(request.get("result_max_bytes", 1 << 20)))
    os._exit(0)


def _write_result(result_fd: int, result: dict, max_bytes: int = 1 << 20) -> None:
    try:
        data = json.dumps(result).encode()
    except (TypeError, ValueError) as exc:
        data = json.dumps({"ok": False, "error_kind": "exception", "error": f"result not serialisable: {exc}"}).encode()
    if len(data) > max_bytes:
        error = f"result too large: {len(data)} bytes of JSON (limit {max_bytes})"
        data = json.dumps({"ok": False, "error_kind": "output", "error": error}).encode()
    # User code may have scribbled on fd 3: start it over so the last word is ours.
    os.ftruncate(result_fd, 0)
    os.lseek(result_fd, 0, os.SEEK_SET)
    view = memoryview(data)
    while view:
        view = view[os.write(result_fd, view) :]


class SandboxSelf:
    """The receiver as the method sees it: a copy of its slots as attributes, plus its other methods."""

    def __repr__(self) -> str:
        return f"<sandboxed receiver with slots {sorted(vars(self))}>"


def _receiver_class(sources: dict[str, str]) -> type:
    """The receiver's class. Its other methods are defined on first use only: defining one evaluates its
    default and decorator expressions, and a sibling the call never touches must not cost (or break) it."""

    class Receiver(SandboxSelf):
        def __getattr__(self, name: str) -> object:
            source = sources.pop(name, None)
            if source is None:
                raise AttributeError(f"the receiver has no slot or method {name!r}")
            setattr(Receiver, name, _define(source, name, {"__name__": "batos_method", "__builtins__": builtins}))
            return getattr(self, name)

    return Receiver


def _define(source: str, selector: str, namespace: dict) -> collections.abc.Callable[..., object]:
    filename = f"<method {selector}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)  # tracebacks show lines
    exec(compile(source, filename, "exec"), namespace)
    return namespace[selector]


def _run_method(request: dict) -> dict:
    selector = request["selector"]
    slots = request.get("slots", {})
    before = {name: json.dumps(value, sort_keys=True) for name, value in slots.items()}
    try:
        cls = _receiver_class(dict(request.get("methods") or {}))
        func = _define(request["source"], selector, {"__name__": "batos_method", "__builtins__": builtins})
        setattr(cls, selector, func)
        receiver = cls()
        receiver.__dict__.update(slots)
        value = func(receiver, *request.get("args", []), **request.get("kwargs", {}))
        value = to_jsonable(value)
        updates, deleted = _slot_changes(receiver.__dict__, before)
    except MemoryError:
        return {"ok": False, "error_kind": "memory", "error": "MemoryError: the method exceeded its memory limit"}
    except BaseException as exc:
        return {
            "ok": False,
            "error_kind": "exception",
            "exc_type": type(exc).__name__,
            "error": _short_repr_exc(exc),
            "traceback": _user_traceback(exc),
        }
    return {"ok": True, "value": value, "slot_updates": updates, "deleted_slots": deleted}


def _slot_changes(current: dict, before: dict[str, str]) -> tuple[dict, list[str]]:
    updates = {}
    for name, value in current.items():
        converted = to_jsonable(value)
        if before.get(name) != json.dumps(converted, sort_keys=True):
            updates[name] = converted
    return updates, sorted(set(before) - set(current))


def _short_repr_exc(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text[:MAX_REPR_CHARS]


def _user_traceback(exc: BaseException) -> str:
    tb = exc.__traceback__
    while tb is not None and not tb.tb_frame.f_code.co_filename.startswith("<method "):
        tb = tb.tb_next  # drop the runner's own frames
    lines = traceback.format_exception(type(exc), exc, tb)
    return "".join(lines)[-8_000:]


def _self_check() -> dict:
    """Probe mode: evidence that the confinement is in place (checked by sandbox.probe)."""
    checks: dict[str, object] = {"uid": os.getuid(), "pid": os.getpid(), "cwd": os.getcwd()}
    try:
        with open("/probe-root-write", "w") as fh:
            fh.write("x")
        checks["root_write"] = "allowed"
    except OSError as exc:
        checks["root_write"] = errno.errorcode.get(exc.errno or 0, str(exc))
    try:
        with open(os.path.join(WORK_DIR, "probe"), "w") as fh:
            fh.write("x")
        checks["tmp_write"] = "allowed"
    except OSError as exc:
        checks["tmp_write"] = errno.errorcode.get(exc.errno or 0, str(exc))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(1.0)
    try:
        sock.connect(("127.0.0.1", 9))
        checks["network"] = "connected"
    except OSError as exc:
        checks["network"] = errno.errorcode.get(exc.errno or 0, str(exc))
    finally:
        sock.close()
    checks["root_entries"] = sorted(os.listdir("/"))
    return {"ok": True, "value": checks}


def main() -> int:
    try:
        request = json.load(sys.stdin)
    except ValueError as exc:
        print(f"sandbox runner: bad request: {exc}", file=sys.stderr)
        return 2
    try:
        return _supervise(request)
    except Exception as exc:  # setup failed: no user code has run; tell the host why
        os.write(request["report_fd"], json.dumps({"setup_error": f"{type(exc).__name__}: {exc}"}).encode())
        return 3


if __name__ == "__main__":
    sys.exit(main())
