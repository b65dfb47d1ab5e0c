"""The process sandbox (services/kernel/sandbox.py): good methods run; hostile code that gets past the
AST policy (skip_policy=True, the test-only bypass) is contained by the process boundary, and each
containment is reported with its specific reason. Where namespaces are unavailable, run_method must
refuse (tested everywhere by breaking the unshare command)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

from services.kernel import sandbox
from services.kernel.sandbox import SandboxResult, SandboxUnavailable, run_method
from tests.waiting import until_sync

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def confined() -> dict:
    try:
        return sandbox.probe_sandbox()
    except SandboxUnavailable as exc:
        pytest.skip(f"no namespaces here, so the sandbox refuses to run (covered below): {exc}")


def hostile(source: str, **limits: object) -> SandboxResult:
    """Run code the policy would reject, as if the AST check had been fooled."""
    params = {"timeout_s": 5.0, "memory_mb": 128, **limits}
    return run_method(source, "m", {}, [], {}, skip_policy=True, **params)


def host_marker() -> Path:
    return Path("/tmp") / f"batos-sandbox-escape-{uuid.uuid4().hex}"


# ------------------------------------------------------------------------------------------------
# Good methods
# ------------------------------------------------------------------------------------------------


def test_probe_reports_the_confinement(confined: dict) -> None:
    assert confined["uid"] != 0
    assert confined["pid"] == 2  # PID 1 of the new namespace is the supervisor
    assert confined["root_write"] == "EROFS"
    assert confined["tmp_write"] == "allowed"
    assert confined["network"] == "ENETUNREACH"
    assert confined["root_entries"] == ["tmp"]


def test_good_method_returns_value_prints_and_slot_updates(confined: dict) -> None:
    source = (
        "def grow(self, by, *, note=''):\n"
        "    import math\n"
        "    print('growing', by)\n"
        "    self.radius = self.radius + by\n"
        "    self.history.append(note)\n"
        "    del self.scratch\n"
        "    return {'area': round(math.pi * self.radius ** 2, 3), 'tags': ('a', 'b')}\n"
    )
    slots = {"radius": 1, "history": ["start"], "scratch": 0, "name": "disc"}
    result = run_method(source, "grow", slots, [1], {"note": "x"}, timeout_s=5, memory_mb=128)
    assert result.ok, result.error
    assert result.value == {"area": 12.566, "tags": ["a", "b"]}  # tuples come back as lists
    assert result.stdout == "growing 1\n"
    assert result.slot_updates == {"radius": 2, "history": ["start", "x"]}  # in-place mutation seen
    assert result.deleted_slots == ("scratch",)
    assert slots == {"radius": 1, "history": ["start"], "scratch": 0, "name": "disc"}  # caller's copy untouched
    assert result.error is None and result.killed_by is None
    assert 0 < result.elapsed_s < 5 and result.cpu_s is not None


def test_non_json_slots_arrive_as_repr_and_other_methods_are_callable(confined: dict) -> None:
    class Opaque:
        def __repr__(self) -> str:
            return "<Opaque 7>"

    source = "def describe(self):\n    return [self.thing, self.double(self.n), sorted(self.tags)]\n"
    helper = "def double(self, x):\n    return 2 * x\n"
    result = run_method(
        source, "describe", {"thing": Opaque(), "n": 4, "tags": {"b", "a"}}, [], {},
        timeout_s=5, memory_mb=128, methods={"double": helper},
    )  # fmt: skip
    assert result.ok, result.error
    assert result.value == ["<Opaque 7>", 8, ["a", "b"]]
    assert result.slot_updates == {}


def test_exception_in_method_is_reported_with_user_traceback(confined: dict) -> None:
    result = run_method("def m(self, x):\n    y = 1\n    return y / x\n", "m", {}, [0], {}, timeout_s=5, memory_mb=128)
    assert not result.ok
    assert result.error_kind == "exception"
    assert result.exc_type == "ZeroDivisionError"
    assert result.error == "ZeroDivisionError: division by zero"
    assert 'File "<method m>", line 3, in m' in result.traceback
    assert "sandbox_runner" not in result.traceback  # only the method's own frames


def test_policy_violation_is_reported_without_starting_a_process(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_spawn(*args: object, **kwargs: object) -> None:
        raise AssertionError("a rejected method must not be run")

    monkeypatch.setattr(sandbox, "_spawn", no_spawn)
    result = run_method("def m(self):\n    return open('/etc/passwd').read()\n", "m", {}, [], {})
    assert not result.ok
    assert result.error_kind == "policy"
    assert result.error == "policy violation: line 2: `open` is not allowed in methods"


def test_bad_limits_are_rejected() -> None:
    with pytest.raises(ValueError, match="memory_mb must be at least"):
        run_method("def m(self):\n    return 1\n", "m", {}, [], {}, memory_mb=8)
    with pytest.raises(ValueError, match="must be positive"):
        run_method("def m(self):\n    return 1\n", "m", {}, [], {}, timeout_s=0)


# ------------------------------------------------------------------------------------------------
# Hostile code that fooled the policy: the process boundary holds
# ------------------------------------------------------------------------------------------------


def test_host_files_are_not_visible(confined: dict) -> None:
    result = hostile("def m(self):\n    return open('/etc/passwd').read()\n")
    assert result.error == "FileNotFoundError: [Errno 2] No such file or directory: '/etc/passwd'"
    before = os.stat("/etc/passwd").st_mtime_ns
    result = hostile("def m(self):\n    open('/etc/passwd', 'a').write('evil::0:0::/:/bin/sh\\n')\n")
    assert "No such file or directory" in result.error
    assert os.stat("/etc/passwd").st_mtime_ns == before


def test_writes_outside_the_private_tmp_fail_and_nothing_reaches_the_host(confined: dict) -> None:
    repo_marker = REPO / f"sandbox-escape-{uuid.uuid4().hex}"
    result = hostile(f"def m(self):\n    open({str(repo_marker)!r}, 'w').write('x')\n")
    assert result.exc_type == "FileNotFoundError"
    assert not repo_marker.exists()
    result = hostile("def m(self):\n    open('/escape', 'w').write('x')\n")
    assert result.error == "OSError: [Errno 30] Read-only file system: '/escape'"
    tmp_marker = host_marker()
    result = hostile(
        f"def m(self):\n    import os\n    open({str(tmp_marker)!r}, 'w').write('x')\n    return os.listdir('/tmp')\n"
    )
    assert result.ok and result.value == [tmp_marker.name]  # written to the sandbox's own /tmp ...
    assert not tmp_marker.exists()  # ... which the host never sees


def test_no_network(confined: dict) -> None:
    source = (
        "def m(self):\n    import socket\n    s = socket.socket()\n    s.settimeout(2)\n"
        "    s.connect(('127.0.0.1', 5555))\n    return 'connected'\n"
    )
    result = hostile(source)
    assert result.error == "OSError: [Errno 101] Network is unreachable"


def test_fork_bomb_is_stopped_by_nproc(confined: dict) -> None:
    result = hostile("def m(self):\n    import os\n    while True:\n        os.fork()\n")
    assert result.exc_type == "BlockingIOError"
    assert result.error == "BlockingIOError: [Errno 11] Resource temporarily unavailable"
    assert result.elapsed_s < 3


def test_memory_exhaustion_is_reported_as_memory(confined: dict) -> None:
    source = "def m(self):\n    hog = []\n    while True:\n        hog.append(bytearray(10_000_000))\n"
    result = hostile(source, memory_mb=128)
    assert (result.error_kind, result.killed_by) == ("memory", "memory")
    assert result.error == "MemoryError: the method exceeded its memory limit"
    assert result.max_rss_mb is not None and result.max_rss_mb <= 128


def test_infinite_loop_is_killed_at_the_wall_clock_limit(confined: dict) -> None:
    # Catching BaseException does not help: the supervisor kills the process from outside.
    source = """def m(self):
    while True:
        try:
            while True:
                pass
        except BaseException:
            pass
"""
    result = hostile(source, timeout_s=1.0, cpu_s=30.0)
    assert (result.error_kind, result.killed_by) == ("timeout", "timeout")
    assert result.error == "timed out after 1.0 s (wall clock)"
    assert 1.0 <= result.elapsed_s < 3.0


def test_sleeping_method_is_killed_at_the_wall_clock_limit(confined: dict) -> None:
    result = hostile("def m(self):\n    import time\n    time.sleep(60)\n", timeout_s=0.5)
    assert result.killed_by == "timeout"
    assert result.cpu_s is not None and result.cpu_s < 0.5


def test_busy_loop_is_killed_by_the_cpu_limit(confined: dict) -> None:
    result = hostile("def m(self):\n    while True:\n        pass\n", timeout_s=20.0, cpu_s=1.0)
    assert (result.error_kind, result.killed_by) == ("cpu", "cpu")
    assert result.error.startswith("CPU time limit exceeded")
    assert result.elapsed_s < 5


def test_subclasses_walk_to_builtins_open_is_contained(confined: dict) -> None:
    marker = host_marker()
    source = f"""def m(self):
    for cls in ().__class__.__base__.__subclasses__():
        init = cls.__init__
        if hasattr(init, "__globals__") and "__builtins__" in init.__globals__:
            b = init.__globals__["__builtins__"]
            b = b if isinstance(b, dict) else b.__dict__
            sneaky = b["op" + "en"]
            sneaky({str(REPO / "escaped")!r}, "w").write("x")
    return "walked"
"""
    # The policy stops it at the first dunder ...
    assert run_method(source, "m", {}, [], {}).error_kind == "policy"
    # ... and if it had not, the boundary does.
    result = hostile(source)
    assert result.exc_type == "FileNotFoundError"
    assert not (REPO / "escaped").exists()
    shell = f"""def m(self):
    for cls in ().__class__.__base__.__subclasses__():
        if cls.__name__ == "_wrap_close":
            return cls.__init__.__globals__["system"]("touch {marker}")
"""
    result = hostile(shell)
    assert result.ok and result.value in (-1, 127 << 8)  # os.system reached, but no shell and no fork
    assert not marker.exists()


def test_ctypes_cannot_regain_privileges(confined: dict) -> None:
    source = """def m(self):
    import ctypes, os
    libc = ctypes.CDLL(None, use_errno=True)
    out = {}
    for name, call in [("remount_rw", lambda: libc.mount(None, b"/", None, 32, None)),
                       ("setuid0", lambda: libc.setuid(0)),
                       ("new_user_ns", lambda: libc.unshare(0x10000000)),
                       ("chroot", lambda: libc.chroot(b"/tmp"))]:
        rc = call()
        out[name] = (rc, os.strerror(ctypes.get_errno()))
    return out
"""
    result = hostile(source)
    assert result.ok, result.error
    assert result.value == {
        name: [-1, "Operation not permitted"] for name in ("remount_rw", "setuid0", "new_user_ns", "chroot")
    }


def test_ctypes_crash_is_reported_as_a_signal(confined: dict) -> None:
    result = hostile("def m(self):\n    import ctypes\n    return ctypes.string_at(0)\n")
    assert (result.error_kind, result.killed_by) == ("crash", "signal:SIGSEGV")


def test_environment_is_empty_and_namespace_pid_1_is_out_of_reach(confined: dict) -> None:
    result = hostile("def m(self):\n    import os\n    return dict(os.environ)\n")
    assert result.ok and result.value == {}
    result = hostile("def m(self):\n    import os, signal\n    os.kill(1, signal.SIGKILL)\n")
    assert result.error == "PermissionError: [Errno 1] Operation not permitted"


def test_output_is_bounded_and_a_forged_result_is_overwritten(confined: dict) -> None:
    result = hostile("def m(self):\n    print('x' * 10_000_000)\n")
    assert result.error == "OSError: [Errno 27] File too large"  # RLIMIT_FSIZE on its stdout
    assert len(result.stdout) < sandbox.OUTPUT_MAX_CHARS + 100 and "truncated" in result.stdout
    forge = """def m(self):
    import os
    for fd in range(3, 64):
        try:
            os.write(fd, b'{"ok": true, "value": "forged"}')
        except OSError:
            pass
    return "real"
"""
    result = hostile(forge)
    assert result.ok and result.value == "real"


def test_private_tmp_and_result_size_are_bounded(confined: dict) -> None:
    fill = """def m(self):
    for i in range(100):
        with open(f"/tmp/f{i}", "wb") as f:
            f.write(b"x" * 4_000_000)
"""
    result = hostile(fill)
    assert result.error == "OSError: [Errno 28] No space left on device"  # TMP_MB tmpfs, not host disk
    result = hostile("def m(self):\n    return 'x' * 2_000_000\n")
    assert result.error_kind == "output"
    assert result.error.startswith("result too large")


def test_method_that_exits_early_is_a_crash(confined: dict) -> None:
    result = hostile("def m(self):\n    import os\n    os._exit(0)\n")
    assert result.error_kind == "crash"
    assert result.error == "the method process exited (status 0) without a result"


def test_cancel_kills_the_whole_namespace(confined: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    uid_offset = 424_242
    monkeypatch.setattr(sandbox.secrets, "randbelow", lambda n: uid_offset)
    uid = sandbox.SANDBOX_UID_RANGE[0] + uid_offset
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()
    result = hostile("def m(self):\n    import time\n    time.sleep(60)\n", timeout_s=30.0, cancel=cancel)
    assert result.error_kind == "cancelled"
    assert result.elapsed_s < 3
    until_sync(lambda: uid not in _host_process_uids(), what="every sandboxed process gone after the cancel",
               timeout=2.0)


def _host_process_uids() -> set[int]:
    uids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            uids.add(int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1]))
    return uids


# ------------------------------------------------------------------------------------------------
# Refusal where isolation is missing
# ------------------------------------------------------------------------------------------------


def test_unavailable_namespaces_mean_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    saved = sandbox._probe_outcome
    monkeypatch.setattr(sandbox, "UNSHARE_ARGS", ("--no-such-namespace-flag",))
    try:
        with pytest.raises(SandboxUnavailable, match="sandbox runner failed"):
            sandbox.probe_sandbox(force=True)
        assert sandbox.sandbox_available() is False  # cached
        with pytest.raises(SandboxUnavailable):
            run_method("def m(self):\n    return 1\n", "m", {}, [], {})
    finally:
        sandbox._probe_outcome = saved


def test_probe_runs_once_and_is_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    saved = sandbox._probe_outcome
    monkeypatch.setattr(sandbox, "_probe", lambda: calls.append(1) or (True, "", {"uid": 5}))
    try:
        sandbox._probe_outcome = None
        assert sandbox.probe_sandbox() == {"uid": 5}
        assert sandbox.sandbox_available()
        assert calls == [1]
    finally:
        sandbox._probe_outcome = saved


def test_runner_outside_namespaces_refuses_before_any_user_code(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    request = tmp_path / "request.json"
    with open(tmp_path / "result", "w+b") as result_file, open(tmp_path / "report", "w+b") as report_file:
        request.write_text(json.dumps({
            "mode": "run", "uid": 1_234_567, "source": f"def m(self):\n    open({str(marker)!r}, 'w')\n",
            "selector": "m", "timeout_s": 2, "cpu_s": 2, "memory_mb": 128,
            "result_fd": result_file.fileno(), "report_fd": report_file.fileno(),
        }))  # fmt: skip
        with open(request, "rb") as stdin:
            proc = subprocess.run(
                [sys.executable, "-I", "-S", str(sandbox.RUNNER)], stdin=stdin, capture_output=True, timeout=30,
                pass_fds=(result_file.fileno(), report_file.fileno()),
            )  # fmt: skip
        report_file.seek(0)
        report = json.loads(report_file.read())
    assert proc.returncode == 3
    assert report["setup_error"].startswith("RuntimeError: runner must be PID 1 and root in fresh namespaces")
    assert not marker.exists()


def test_dict_views_come_back_as_lists():
    from services.kernel.sandbox_runner import to_jsonable

    d = {"a": 1, "b": 2}
    assert to_jsonable(d.keys()) == ["a", "b"] and to_jsonable(d.values()) == [1, 2]
    assert to_jsonable(d.items()) == [["a", 1], ["b", 2]]
