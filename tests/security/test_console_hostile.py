"""Issue 13 item 10, the console's part: hostile results and hostile input never take over the terminal or
the console.

A real broker, a stand-in kernel that answers with terminal control sequences (this module run as a program:
the production worker runtime), and real console processes: text output carries no raw ESC/BEL/CR (they are
shown escaped), a 5,000-deep JSON line is a clear ``bad_args`` without a traceback, and deep arguments are
refused before they reach the wire. The kernel refuses deep Table 1 arguments as ``bad_args`` for every command.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import msgspec
import pytest

from proto import ErrorCode
from proto.bodies import kernel as K
from proto.bodies import memory
from services.console.formats import safe_text
from services.kernel import commands

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

PY = sys.executable
HOSTILE = "\x1b]0;owned\x07\x1b[2J\x1b[31mred\rover\x9b1m\u202egnp.exe"


async def _ask(req, body: K.Ask) -> K.AnswerReply:
    await req.emit("token", text=HOSTILE)
    await req.emit("thought", cycle_id="c", step=1, text=HOSTILE)
    return K.AnswerReply(answer=HOSTILE, cycle_id="c", status=K.Status.SUCCESS, citations=[
        K.Citation(oid="1", file_path=HOSTILE, start_line=1, end_line=2)], also_retrieved=[], notes=[HOSTILE],
        evidence=[], validation=[], rewritten=False, model_text=HOSTILE, steps=1, thoughts=0, stop=HOSTILE,
        fallback=None, persona="ROBIN", query_morph="", prompt_budget={})


async def _search(req, body: K.Search) -> memory.SearchReply:
    return memory.SearchReply(hits=[memory.Hit(oid="2a", level="chunk", score=0.5, text=HOSTILE, token_count=1,
                                                metadata={"file_path": HOSTILE, "start_line": 1, "end_line": 2,
                                                          "node_name": HOSTILE})])


async def _fail(req, body: K.Stats) -> K.StatsReply:
    from batos.errors import ServiceError

    raise ServiceError(ErrorCode.BAD_ARGS, f"refused {HOSTILE}")


@pytest.fixture
async def hostile_kernel(system, client):
    system.spawn("hostile-kernel", [PY, "-m", "tests.security.test_console_hostile"])
    await system.wait_registered(client, {"kernel": 1})
    return system


async def console(system, tmp_path, *args: str, stdin: bytes = b"") -> tuple[int, str, str]:
    env = system.env(HOME=str(tmp_path), TERM="xterm-256color")
    proc = await asyncio.create_subprocess_exec(PY, "-m", "services.console", "--endpoint", system.endpoint, *args,
                                                env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    return proc.returncode or 0, out.decode(), err.decode()


def assert_inert(text: str) -> None:
    for ch in ("\x1b", "\x07", "\r", "\x9b", "\u202e"):
        assert ch not in text, f"raw {ch!r} reached the terminal: {text!r}"


@pytest.mark.parametrize("line", ["ask hello", "search anything", "stats"])
async def test_text_mode_shows_control_characters_escaped(hostile_kernel, tmp_path, line):
    rc, out, err = await console(hostile_kernel, tmp_path, "-c", line)
    assert_inert(out)
    assert_inert(err)
    if line != "stats":
        assert rc == 0, err
        assert "\\x1b]0;owned\\x07" in out  # shown, escaped: the user sees what the result held
    else:  # the error message carries the payload too
        assert rc == 1 and "\\x1b[2J" in err + out


async def test_json_mode_is_inert_and_lossless(hostile_kernel, tmp_path):
    rc, out, err = await console(hostile_kernel, tmp_path, "--json", "-c", "search anything")
    assert rc == 0, err
    assert_inert(out)
    reply = [json.loads(line) for line in out.splitlines()][-1]
    assert reply["body"]["hits"][0]["text"] == HOSTILE  # escaped as JSON, the same string once parsed


async def test_a_5000_deep_json_line_is_a_clear_error(hostile_kernel, tmp_path):
    deep = '{"command": "stats", "target_oid": "0", "mission_brief": {"type": "stats", "selector": "stats", ' \
           '"args": [' + "[" * 5000 + "]" * 5000 + '], "kwargs": {}}}\n'
    for args in ((), ("--json",)):
        rc, out, err = await console(hostile_kernel, tmp_path, *args, stdin=deep.encode())
        assert rc == 2, (out, err)
        assert "Traceback" not in out + err and "nested too deep" in out + err


@pytest.mark.parametrize("depth", [60, 300])
async def test_deep_send_arguments_are_refused_in_the_console(hostile_kernel, tmp_path, depth):
    rc, out, err = await console(hostile_kernel, tmp_path, "-c", "send 0 f " + "[" * depth + "]" * depth)
    assert "Traceback" not in out + err
    if depth == 60:  # a literal the console reads: refused before the wire, in plain words
        assert rc == 2 and "nest deeper than" in err + out
    # 300 deep is not a literal the console can read: it is sent as a string, which is harmless


@pytest.mark.parametrize("command,kind", [("initiate_cognitive_cycle", "message"), ("search", "search"),
                                          ("trace", "trace"), ("ingest", "ingest")])
async def test_kernel_refuses_deep_table1_arguments_as_bad_args(command, kind):
    from batos.errors import ServiceError

    deep: list = []
    for _ in range(40):
        deep = [deep]
    brief = {"type": kind, "selector": "f", "args": [deep], "kwargs": {"k": deep}}
    cmd = msgspec.convert({"command": command, "target_oid": "0", "mission_brief": brief}, K.Table1Command)
    with pytest.raises(ServiceError) as e:
        await commands.dispatch(None, None, cmd)  # refused before any handler needs a kernel
    assert e.value.code == ErrorCode.BAD_ARGS and "nest deeper" in e.value.message
    assert msgspec.to_builtins(cmd)  # the command itself was well formed


def test_safe_text_keeps_newlines_and_tabs_and_escapes_the_rest():
    assert safe_text("a\tb\nc") == "a\tb\nc"
    assert safe_text("\x1b[31m\x07\x00\x7f") == "\\x1b[31m\\x07\\x00\\x7f"


def test_ingest_reply_lists_what_was_refused():
    from services.console.formats import format_ingest, plain

    body = {"files": 1, "chunks": 1, "skipped": 0, "unchanged": 0, "removed": 0, "errors": [], "seconds": 0.1,
            "refused": [{"file_path": "/home/a/vault.py", "reason": "symlink leaving the root (to /etc/shadow)"},
                        {"file_path": "/home/a/p.py", "reason": "special file (fifo)"}]}
    text = "\n".join(plain(line) for line in format_ingest(body))
    assert "refused /home/a/vault.py: symlink leaving the root (to /etc/shadow)" in text
    assert "refused /home/a/p.py: special file (fifo)" in text


if __name__ == "__main__":
    from batos.worker import run_service

    run_service("kernel", {"ask": _ask, "search": _search, "stats": _fail}, capacity=4)
