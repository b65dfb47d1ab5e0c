"""Issue 15 item 7: the memory and forge workers on another host, proved by running them as if they were.

tests/integration/two_hosts.py starts three "hosts" that share no files (with mount namespaces, each host's
processes see the other hosts' directories as empty):

- main: the broker on TCP with CurveZMQ (port 0, read back), ZEO on TCP (port 0, read back), the kernel and the
  ingestor, in their own working directory and var/;
- worker: memory_weaver, forge (the ``llm`` and ``forge`` services) and the steward under the worker host's own
  supervisord (the repository's program sections), holding only its service key (allow-listed for memory,
  llm, forge and steward by ``python -m batos.curve add``) and the broker's public key;
- console: the console key and the broker's public key, nothing else.

Through a real ``batos-console`` on the console host: ``ingest`` (the main host's ingestor feeds memory on the
worker host), ``ask`` (the kernel's cycle retrieves from that memory and the worker's llm answers), ``send`` of a
selector nobody defined (BRICK writes the method on the worker host, the main host's sandbox runs it), ``audit``
(the kernel's own log becomes fractals in remote memory). Then ``forge BRICK`` from a client with the console key:
the worker's forge curates from remote memory, the steward on the worker host restarts the forge program
through its own supervisord around a few training steps, the adapter travels to the image as a ZEO blob (over
TCP, each client with its own blob cache) and the restarted worker reads it back from there.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from batos.audit import AuditEvent
from batos.image import Image
from services.forge import lora_experts
from services.forge.incarnation import decide
from tests.integration.test_kernel_live import KERNEL_ENV as LIVE_KERNEL_ENV
from tests.integration.two_hosts import WORKER_KEY, Hosts

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

# cycles of seconds with the small model, as the kernel's own live test; nothing in the background: this test
# says when to audit and forge
KERNEL_ENV = {**LIVE_KERNEL_ENV, "BATOS_AUTOTELIC_PERIOD": "0", "BATOS_KERNEL_INSTANCE": "kernel-two-hosts"}
WORKER_ENV = {"BATOS_FORGE_TRAIN_TIMEOUT": "420"}
FORGE_OPTIONS = {"max_steps": 2, "logging_steps": 1, "generate_script": False, "format_prompts": 1}
FORGE_COMMAND = {"command": "forge", "target_oid": "0",
                 "mission_brief": {"type": "forge", "selector": "forge", "args": ["BRICK"], "kwargs": FORGE_OPTIONS}}
CYCLE_STATES = ["IDLE", "DECOMPOSING", "REASONING", "SYNTHESIZING", "VALIDATING", "COMPLETE"]
SEEDED_FACTORS = (2, 3, 4, 5, 6)  # BRICK methods `times_N` of earlier sessions, as the kernel logged them

FILES = {
    "geometry.py": '"""Shapes."""\nimport math\n\n\ndef area_of_circle(radius):\n'
                   '    """The area of a circle of the given radius."""\n    return math.pi * radius ** 2\n',
    "inventory.py": '"""Stock keeping."""\n\n\ndef restock(stock, item, count):\n'
                    '    """Add count units of item to the stock mapping."""\n'
                    '    stock[item] = stock.get(item, 0) + count\n    return stock\n',
}


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    # short paths: unix sockets in var/ must fit in 107 bytes
    hosts = Hosts(tmp_path_factory.mktemp("2h"))
    try:
        hosts.start_main(**KERNEL_ENV)
        hosts.start_worker_host(**WORKER_ENV)
        hosts.prepare_console_host()
        tree = hosts.main_root / "src"
        tree.mkdir()
        for name, text in FILES.items():
            (tree / name).write_text(text)
        asyncio.run(_registered(hosts))
        yield hosts
    finally:
        hosts.stop()


async def _registered(hosts: Hosts) -> None:
    async with hosts.client(hosts.console_root, "console", f"2h-wait-{uuid.uuid4().hex[:6]}") as client:
        await client.wait_for_broker(30)
        await hosts.wait_registered(client)


def console(hosts: Hosts, command: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``batos-console --json -c COMMAND`` on the console host: (the events' bodies, the reply's body)."""
    run = hosts.console(command)
    objects = [json.loads(line) for line in run.stdout.splitlines() if line.strip()]
    assert run.returncode == 0 and objects and objects[-1]["kind"] == "reply", \
        (command, run.returncode, run.stdout[-3000:], run.stderr[-3000:])
    return [o["body"] for o in objects if o["kind"] == "event"], objects[-1]["body"]


def states(events: list[dict[str, Any]], cycle_id: str) -> list[str]:
    return [e["state"] for e in events if e.get("event") == "state" and e.get("cycle_id") == cycle_id]


# -- ingest, ask, send: console host -> main host's kernel -> worker host's memory and llm --------------------


def test_ingest_ask_and_send_from_a_console_on_a_third_host(hosts: Hosts) -> None:
    tree = hosts.main_root / "src"
    _, ingested = console(hosts, f"ingest {tree}")
    assert ingested["files"] == 2 and ingested["errors"] == [], ingested

    events, answer = console(hosts, "ask what does area_of_circle compute?")
    assert states(events, answer["cycle_id"]) == CYCLE_STATES
    assert any(e.get("event") == "token" for e in events)  # streamed from the worker host's llm
    assert answer["status"] in ("SUCCESS", "SUCCESS_DEGRADED") and answer["citations"], answer
    for cite in answer["citations"]:  # chunks that remote memory holds, of files on the main host
        assert Path(cite["file_path"]).parent == tree and Path(cite["file_path"]).name in FILES
        _, chunk = console(hosts, f"inspect {cite['oid']}")
        assert chunk["prototype"] == "memory_chunk"

    _, found = console(hosts, "search restock stock item count")
    target = next(h["oid"] for h in found["hits"] if h["level"] == "chunk" and "restock" in h["text"])
    run = hosts.console(f"send {target} word_count")
    objects = [json.loads(line) for line in run.stdout.splitlines() if line.strip()]
    final = objects[-1]
    _, obj = console(hosts, f"inspect {target}")
    if final["kind"] == "reply":  # BRICK's method ran in the main host's sandbox: persisted on the object
        sent = final["body"]
        assert run.returncode == 0 and sent["generated"] is True and "def word_count(self" in sent["method_source"]
        assert "word_count" in obj["methods"]
    else:  # a 135M BRICK may write a method that fails: a clear FAILURE, nothing persisted
        assert final["kind"] == "error" and final["code"] in ("rejected", "sandbox"), final
        assert "FAILED in" in final["message"] and "word_count" not in obj["methods"]
    cycle = final.get("body", final.get("details", {}))["cycle_id"]
    _, trace = console(hosts, f"trace {cycle}")
    assert "DNU_OUTCOME" in [e["event_type"] for e in trace["events"]]


# -- forge: the worker host's forge and steward, the adapter through ZEO --------------------------------------


async def seed_brick_history(hosts: Hosts, receiver: str) -> int:
    """Successful `send`s of earlier sessions, as the kernel logs them (its ``audit_event``, a service command:
    sent with the main host's own service key), then ``audit`` turns the log into fractals in remote memory."""
    async with hosts.client(hosts.main_root, "services", f"2h-seed-{uuid.uuid4().hex[:6]}") as client:
        await client.wait_for_broker(30)
        for n in SEEDED_FACTORS:
            cycle, selector, mission = str(uuid.uuid4()), f"times_{n}", "message"
            source = f"def {selector}(self, x):\n    return x * {n}\n"
            prompt = [{"role": "user", "content": f"Write the method {selector}(7) for object {receiver}."}]
            brief = {"type": mission, "selector": selector, "args": [7], "kwargs": {}}
            for event in (
                AuditEvent.cycle_start(cycle, persona="BRICK", mission_type=mission, input=brief, oid=receiver),
                AuditEvent.llm_call(cycle, "SYNTHESIZING", persona="BRICK", prompt=prompt, response=source,
                                    mission_type=mission),
                AuditEvent.dnu_outcome(cycle, "VALIDATING", persona="BRICK", receiver_oid=receiver,
                                       selector=selector, status="SUCCESS", source=source, mission_type=mission,
                                       llm_prompt=prompt[0]["content"], mission_brief=brief),
                AuditEvent.transition(cycle, "VALIDATING", "COMPLETE", persona="BRICK", status="SUCCESS",
                                      mission_type=mission),
                AuditEvent.cycle_end(cycle, persona="BRICK", status="SUCCESS", output=None, mission_type=mission),
            ):
                reply = await client.call("kernel", "audit_event", {"event": event.model_dump(mode="json")},
                                          timeout=30)
                assert reply["logged"], reply
    return len(SEEDED_FACTORS)


def var_files(root: Path) -> set[str]:
    return {str(p.relative_to(root / "var")) for p in (root / "var").rglob("*") if p.is_file()}


def test_forge_runs_on_the_worker_host_and_the_adapter_travels_through_zeo(hosts: Hosts) -> None:
    asyncio.run(_forge(hosts))


async def _forge(hosts: Hosts) -> None:
    seeded = await seed_brick_history(hosts, "1a")
    _, audited = console(hosts, "audit")
    assert audited["ingest"]["malformed"] == 0, audited
    kernel_pid = next(p.pid for p in hosts.main.procs if p.name == "kernel")
    forge_pid, steward_pid = hosts.worker_pid("forge"), hosts.worker_pid("steward")

    events: list[dict[str, Any]] = []

    async def collect(event: dict[str, Any]) -> None:
        events.append({**event, "at": time.monotonic()})

    started = time.monotonic()
    async with hosts.client(hosts.console_root, "console", f"2h-forge-{uuid.uuid4().hex[:6]}") as client:
        await client.wait_for_broker(30)
        reply = await client.call("kernel", "command", FORGE_COMMAND, on_event=collect, timeout=540)
        seconds = time.monotonic() - started

        # the run: curated from remote memory, trained and evaluated by the worker host's steward
        assert reply["ok"] and reply["restarted"], reply
        assert reply["counts"]["train"] + reply["counts"]["eval"] >= seeded, reply["counts"]
        run_states = [e["state"] for e in events if e.get("event") == "state"]
        for state in ("WORKER_STOPPED", "TRAINING", "EVALUATING", "WORKER_RESTARTED", "FINISHED", "INCARNATED"):
            assert state in run_states, (state, run_states)
        assert run_states[-1] == "INCARNATED", run_states

        # the steward restarted forge through the worker host's supervisord; nothing else moved
        new_forge = hosts.worker_pid("forge")
        assert new_forge not in (0, forge_pid) and hosts.worker_pid("steward") == steward_pid
        assert all(p.alive() for p in hosts.main.procs) and kernel_pid in [p.pid for p in hosts.main.procs]

        # the expert is in the image (ZEO on the main host), read here through this client's own blob cache
        image = await Image(hosts.settings(hosts.main_root), pool_threads=1, do_awaken=False).open()
        try:
            expert = await _audited(image, reply["expert"])
        finally:
            await image.close()
        chosen, why = decide(expert["metrics"])
        assert expert["decision"] == ("activated" if chosen else "kept_previous") and expert["reason"] == why
        assert reply["decision"] == expert["decision"]

        # the restarted worker read it back from the image (not from the steward's files) when it activated it
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            services = (await client.call("broker", "workers", timeout=5))["services"]
            if any(w["alive"] and w["pid"] == new_forge for w in services.get("llm", [])):
                break
            await asyncio.sleep(0.5)
    async with hosts.client(hosts.worker_root, WORKER_KEY, f"2h-llm-{uuid.uuid4().hex[:6]}") as worker:
        await worker.wait_for_broker(30)
        active = (await worker.call("llm", "adapters", {}, timeout=60))["personas"].get("BRICK")
    if chosen:
        assert active is not None and active["meta"]["expert"] == reply["expert"], active
        assert Path(active["path"]).is_relative_to(hosts.worker_root / "var" / "lora_adapters")
    else:
        assert active is None, active

    # each host wrote only its own things: the image and the audit log stay on main, adapters on the worker
    main_files, worker_files = var_files(hosts.main_root), var_files(hosts.worker_root)
    assert not any(f.startswith(("lora_adapters", "steward/")) for f in main_files), main_files
    assert not any(f.startswith(("live_image", "metacognition", "blobs/")) for f in worker_files), worker_files
    assert "steward/runs.jsonl" in worker_files
    timeline = ", ".join(f"{e['state']} +{e['at'] - started:.0f}s" for e in events if e.get("event") == "state")
    print(f"\n[two_hosts] forge {seconds:.0f} s (steward {reply['seconds']} s): {timeline}; decision "
          f"{expert['decision']}; isolated by mount namespaces: {hosts.isolated}")


async def _audited(image: Image, name: str, timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    expert: dict[str, Any] = {}
    while time.monotonic() < deadline:
        expert = await image.read(lora_experts.get, name) or {}
        if expert.get("audited"):
            return expert
        await asyncio.sleep(0.5)
    raise AssertionError(f"expert {name} not audited within {timeout} s: {expert}")
