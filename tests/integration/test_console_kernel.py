"""The console against the real kernel: broker, ZEO, kernel and memory processes, consoles as real
processes (``-c``, ``--json``, and a script piped on stdin). No LLM is needed: inspect, define, send
of a defined method, stats, trace and raw Table 1 objects run without one."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(240)]

PY = sys.executable


async def console(system, *args: str, stdin: str | None = None, timeout: float = 90) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        PY, "-m", "services.console", "--endpoint", system.endpoint, "--timeout", "60", *args,
        env=system.env(), stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode() if stdin is not None else None), timeout)
    return proc.returncode or 0, out.decode(), err.decode()


async def reply_of(system, command: str) -> dict:
    rc, out, err = await console(system, "--json", "-c", command)
    assert rc == 0, out + err
    last = json.loads(out.splitlines()[-1])
    assert last["kind"] == "reply"
    return last["body"]


def slot_oid(inspected: dict, slot: str) -> str:
    m = re.search(r"oid=([0-9a-f]+)", inspected["slots"][slot])
    assert m, inspected["slots"][slot]
    return m.group(1)


async def test_console_drives_the_real_kernel(system, client):
    system.start_zeo()
    system.start_service("kernel")
    system.start_service("memory")
    await system.wait_registered(client, {"kernel": 1, "memory": 1}, timeout=120)

    # find ALFRED through the image: root -> prototypes -> alfred
    root = await reply_of(system, "inspect 0")
    prototypes = await reply_of(system, f"inspect {slot_oid(root, 'prototypes')}")
    alfred = slot_oid(prototypes, "alfred")

    # a script on stdin: define a method from the following lines, then send it with literal arguments
    script = f"define {alfred} twice\ndef twice(self, x):\n    return [x, x]\n.\nsend {alfred} twice [1, 'a b']\n"
    rc, out, err = await console(system, stdin=script)
    assert rc == 0, out + err
    assert '→ [[1, "a b"], [1, "a b"]]' in out
    cycles = re.findall(r"cycle ([0-9a-f-]{36})", out)
    assert cycles, out

    rc, out, err = await console(system, "-c", f"trace {cycles[0]}")
    assert rc == 0, out + err
    assert re.search(r"\d+ events:", out) and "CYCLE_START" in out and "CYCLE_END" in out

    rc, out, err = await console(system, "-c", "stats")
    assert rc == 0 and "objects per prototype:" in out and "storage:" in out, out + err

    rc, out, err = await console(system, "-c", "status")
    assert rc == 0 and "services:" in out and re.search(r"memory\s+1/1 alive", out), out + err

    # a raw Table 1 object: refused here by the kernel's own rules (proto.bodies.kernel), never sent...
    bad = ('{"command": "initiate_cognitive_cycle", "target_oid": "0", "mission_brief": '
           '{"type": "nope", "selector": "x", "args": [], "kwargs": {}}}')
    rc, out, err = await console(system, "-c", bad)
    assert rc == 2 and "error [bad_args] initiate_cognitive_cycle: unknown mission_brief.type 'nope'" in out
    # ...and what only the kernel can know is its refusal, shown as it is
    unknown = ('{"command": "initiate_cognitive_cycle", "target_oid": "0xbeef99", "mission_brief": '
               '{"type": "query", "selector": "ask", "args": ["why?"], "kwargs": {}}}')
    rc, out, err = await console(system, "-c", unknown)
    assert rc == 1 and "error [not_found]" in out and "beef99" in out, out + err
    rc, out, err = await console(system, "-c", f"send {alfred} nothing_here_9 x=1 2")
    assert rc == 2 and "after keyword" in out  # never sent

    rc, out, err = await console(system, "-c", "trace 00000000")
    assert rc == 1 and "error [not_found]" in out
