"""The sandbox's result is untrusted input (issue 13 item 3): real sandbox processes, hostile methods.

The method shares a process with the code that writes its result, so it can write its own "result" to the
result descriptor and exit. These methods do exactly that (``skip_policy=True``: the code policy would refuse
``os``; the point is that the host must hold without it). Whatever they write is decoded against a schema
with limits on size, depth, item count, slot names and error kinds; a result that breaks any of them is
refused whole, and a well-formed forgery is worth no more than a return value.
"""

from __future__ import annotations

import json

import pytest

from services.kernel import sandbox
from services.kernel.sandbox_result import MAX_NODES, RESULT_MAX_BYTES, MalformedResult, decode_result

pytestmark = pytest.mark.skipif(not sandbox.sandbox_available(), reason="no namespace sandbox on this host")

SLOTS = {"owner": "bob", "count": 1}


def forge(payload: bytes | str, exit_code: int = 0) -> str:
    """A method that overwrites the result descriptor (whichever fd it is) with ``payload`` and exits."""
    data = payload.encode() if isinstance(payload, str) else payload
    return (
        "def m(self):\n"
        "    import os\n"
        f"    data = {data!r}\n"
        "    for fd in range(3, 1024):  # the result fd keeps the host's number, whatever it is\n"
        "        try:\n"
        "            os.ftruncate(fd, 0)\n"
        "            os.lseek(fd, 0, 0)\n"
        "            os.write(fd, data)\n"
        "        except OSError:\n"
        "            pass\n"
        f"    os._exit({exit_code})\n"
    )


def run(source: str, **kw) -> sandbox.SandboxResult:
    return sandbox.run_method(source, "m", SLOTS, timeout_s=5, memory_mb=256, skip_policy=True, **kw)


def deep(n: int) -> str:
    return "[" * n + "]" * n


REFUSED = {
    "reserved slot": {"ok": True, "value": 1, "slot_updates": {"clone": 1}},
    "private slot": {"ok": True, "value": 1, "slot_updates": {"_p_jar": None}},
    "persistence slot": {"ok": True, "value": 1, "slot_updates": {"_methods": {}}},
    "dotted slot (another object)": {"ok": True, "value": 1, "slot_updates": {"parent.owner": "eve"}},
    "keyword slot": {"ok": True, "value": 1, "slot_updates": {"class": "x"}},
    "delete a slot it was not given": {"ok": True, "value": 1, "deleted_slots": ["description"]},
    "deleted_slots as a string": {"ok": True, "value": 1, "deleted_slots": "owner"},
    "slot_updates as a list": {"ok": True, "value": 1, "slot_updates": [["owner", "eve"]]},
    "ok as a string": {"ok": "yes", "value": 1},
    "unknown field": {"ok": True, "value": 1, "admin": True},
    "unknown error kind": {"ok": False, "error_kind": "rootkit", "error": "x"},
    "failure with slot changes": {"ok": False, "error_kind": "exception", "error": "x",
                                  "slot_updates": {"owner": "eve"}},
    "too many items": {"ok": True, "value": [0] * (MAX_NODES + 10)},
    "too many slot updates": {"ok": True, "value": 1, "slot_updates": {f"s{i}": i for i in range(300)}},
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_a_forged_malformed_result_is_refused_whole(name):
    result = run(forge(json.dumps(REFUSED[name])))
    assert not result.ok and result.error_kind == "output", result
    assert "malformed" in (result.error or "")
    assert result.slot_updates == {} and result.deleted_slots == () and result.value is None


@pytest.mark.parametrize("payload", [
    '{"ok": true, "value": ' + deep(100_000) + "}",  # RecursionError in a plain json.loads
    '{"ok": true, "value": ' + deep(200) + "}",
    '{"ok": true, "value": 1, "slot_updates": {"owner": ' + deep(500) + "}}",
    '{"ok": true, "value": "' + "x" * (RESULT_MAX_BYTES + 10) + '"}',
    '{"ok": true, "value": 1',  # truncated
    "\x00\xff\xfe garbage",
])
def test_deep_huge_or_broken_results_are_refused(payload):
    result = run(forge(payload))
    assert not result.ok and result.error_kind == "output", result


def test_a_wellformed_forgery_is_only_as_strong_as_a_return_value_and_needs_a_clean_exit():
    forged = json.dumps({"ok": True, "value": "forged", "slot_updates": {"owner": "eve"}})
    result = run(forge(forged))
    assert result.ok and result.value == "forged" and result.slot_updates == {"owner": "eve"}
    # ...which a plain `self.owner = "eve"; return "forged"` could have done. Dying after forging is not ok:
    died = run(forge(forged, exit_code=3))
    assert not died.ok and died.error_kind == "crash" and died.slot_updates == {}


def test_huge_and_deep_return_values_are_bounded_by_the_runner():
    big = run("def m(self):\n    return 'x' * (3 << 20)\n")
    assert not big.ok and big.error_kind == "output" and "too large" in big.error
    nested = run("def m(self):\n    v = []\n    for _ in range(5000):\n        v = [v]\n    return v\n")
    assert nested.ok  # the runner cuts nesting at its own depth limit
    text = json.dumps(nested.value)
    assert "too deep" in text and text.count("[") <= 48


def test_stdout_and_stderr_floods_come_back_truncated():
    result = run("def m(self):\n    import sys\n    for _ in range(200):\n        print('y' * 50_000)\n"
                 "        sys.stderr.write('z' * 50_000)\n    return 1\n")
    assert len(result.stdout) <= sandbox.OUTPUT_MAX_CHARS + 100 and "truncated" in result.stdout
    assert len(result.stderr) <= sandbox.OUTPUT_MAX_CHARS + 100


def test_decode_result_unit_limits():
    ok = decode_result(b'{"ok": true, "value": {"a": [1, 2.5, null, "s"]}, "deleted_slots": ["x"]}', {"x"})
    assert ok.value == {"a": [1, 2.5, None, "s"]} and ok.deleted_slots == ["x"]
    with pytest.raises(MalformedResult, match="deeper"):
        decode_result(('{"ok": true, "value": ' + deep(60) + "}").encode(), set())
    with pytest.raises(MalformedResult, match="not one of"):
        decode_result(b'{"ok": true, "deleted_slots": ["y"]}', {"x"})


@pytest.mark.parametrize("source", [
    "def m(self):\n    import json\n    return json.loads('{bad')\n",
    "def m(self):\n    import re\n    return re.compile('(')\n",
    "def m(self):\n    import statistics\n    return statistics.mean([])\n",
])
def test_tracebacks_and_stderr_show_no_host_paths(source):
    import sys
    from pathlib import Path

    result = sandbox.run_method(source, "m", SLOTS, timeout_s=5, memory_mb=256)
    assert not result.ok and result.error_kind == "exception" and '<method m>' in result.traceback
    shown = f"{result.traceback}\n{result.stderr}\n{result.error}"
    for host in {sys.prefix, sys.base_prefix, str(Path(sandbox.__file__).resolve().parents[2])}:
        assert host not in shown, shown
    assert 'File "/' not in shown
