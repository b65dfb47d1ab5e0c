"""Issue 8, done when: the audit trail becomes ContextFractals with the whole system up, exactly once, even when
the kernel is killed in the middle of an ingestion.

The system runs as `make up` runs it (`batos.ctl up`, supervisord, the repo's supervisord.conf) in a temp var
dir, with the autotelic loop off (``BATOS_AUTOTELIC_PERIOD=0``) so every ingestion is one this module asks for,
and a small rotation size so the seeded log spans rotated segments.

1. Cheap real cycles (no LLM): ``define`` of a method on a fresh object and ``send``s to it. The kernel's
   ``audit`` turns their events into fractals: ``query_fractals {cycle_id}`` returns each event of the cycle
   exactly once, its ``full_json`` the very line of the log, and ``search`` (level fractals, and all) finds a
   fractal by its summary.
2. The kernel is stopped through supervisord (it is the audit log's single writer: batos/audit.py's lock),
   thousands of valid Table 3 events are appended with :class:`batos.audit.AuditLog` (which takes that lock),
   the kernel is started, ``audit`` is called and the kernel SIGKILLed after a few committed batches;
   supervisord restarts it and ``audit`` runs again. Then every event_id of the log is in memory exactly once,
   memory's offset is the log's end, and the vector store agrees with the objects.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from batos.audit import AuditEvent, AuditLog, log_segments
from batos.client import Client
from batos.errors import ServiceError
from proto import ErrorCode
from tests.integration.system_fixture import Installation, installation_fixture

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

ENV = {
    "BATOS_AUTOTELIC_PERIOD": "0",  # no background ingestion: each run below is the one under test
    "BATOS_AUDIT_MAX_BYTES": str(256 * 1024),  # the seeded log rotates a few times
    "BATOS_SANDBOX_TIMEOUT": "5",
}
SEED_CYCLES, EVENTS_PER_CYCLE = 60, 50  # 3000 synthetic events: 15 create_fractals batches of 200
KILL_AFTER_BATCHES = 3
WORDS = sorted(n for n in sys.stdlib_module_names if n.isalpha() and len(n) > 3)
VECTOR_LEVELS = ("memory_chunk", "contextual_summary", "context_fractal")


@pytest.fixture(scope="module")
def installation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installation]:
    yield from installation_fixture(tmp_path_factory, "audit_live", **ENV)


class Stream:
    """A call's events; ``when`` wakes the test when one matching arrives."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._waiters: list[tuple[Any, asyncio.Event]] = []

    async def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        for match, flag in self._waiters:
            if match(self.events):
                flag.set()

    def when(self, match: Any) -> asyncio.Event:
        flag = asyncio.Event()
        self._waiters.append((match, flag))
        return flag


# -- the log as the test sees it ------------------------------------------------------------------------


def log_lines(inst: Installation) -> list[bytes]:
    """Every complete line of the audit log, rotated segments first."""
    out: list[bytes] = []
    for _, path in log_segments(inst.settings.audit_log):
        if path.exists():
            out += path.read_bytes().split(b"\n")[:-1]  # the last piece is "" or a line still being written
    return [line for line in out if line.strip()]


def log_end(inst: Installation) -> int:
    segments = log_segments(inst.settings.audit_log)
    start, active = segments[-1]
    return start + (active.stat().st_size if active.exists() else 0)


def valid_events(inst: Installation) -> dict[str, list[bytes]]:
    """event_id -> the raw lines carrying it (a valid log has one each)."""
    found: dict[str, list[bytes]] = {}
    for raw in log_lines(inst):
        try:
            event = AuditEvent.model_validate_json(raw)
        except ValueError:
            continue  # a torn or malformed line is skipped by the ingestor too
        found.setdefault(event.event_id, []).append(raw)
    return found


# -- memory ----------------------------------------------------------------------------------------------


async def fractals_of(client: Client, cycle_id: str) -> list[dict[str, Any]]:
    reply = await client.call("memory", "query_fractals", {"cycle_id": cycle_id, "limit": 1000}, timeout=60)
    return reply["fractals"]


async def counts(client: Client) -> dict[str, Any]:
    return await client.call("memory", "stats", {}, timeout=60)


async def fresh_object(client: Client) -> str:
    """A new memory chunk to send messages to (cheap: one embedding, no LLM)."""
    text = f"def scratch_{uuid.uuid4().hex[:8]}(value):\n    return value\n"
    meta = {"file_path": f"/audit_live/{uuid.uuid4().hex}.py", "start_line": 1, "end_line": 2,
            "node_type": "FunctionDef", "node_name": "scratch", "parent_nodes": [], "dependencies": [],
            "content_hash": uuid.uuid4().hex, "token_count": 12, "flags": []}
    body = {"files": [{"file_path": meta["file_path"], "file_hash": meta["content_hash"],
                       "chunks": [{"source_text": text, "metadata": meta}]}]}
    reply = (await client.call("memory", "replace_files", body, timeout=120))["files"][0]
    assert reply["chunks"] == 1, reply
    return reply["oids"][0]


# -- synthetic history -----------------------------------------------------------------------------------


def synthetic_events(rng: random.Random) -> list[AuditEvent]:
    """Valid Table 3 events of SEED_CYCLES cycles, of every kind the kernel writes, each unlike the others."""
    events = []
    for _ in range(SEED_CYCLES):
        cycle = str(uuid.uuid4())
        mission = rng.choice(["query", "message", "define_method"])
        persona = rng.choice(["ROBIN", "BRICK", "BABS", "ALFRED"])
        events.append(AuditEvent.cycle_start(cycle, persona=persona, mission_type=mission,
                                             input=" ".join(rng.sample(WORDS, 6))))
        for i in range(EVENTS_PER_CYCLE - 2):
            words = " ".join(rng.sample(WORDS, 5))
            match i % 4:
                case 0:
                    events.append(AuditEvent.transition(cycle, "REASONING", "REASONING", persona=persona,
                                                        mission_type=mission, note=words))
                case 1:
                    events.append(AuditEvent.llm_call(cycle, "REASONING", persona=persona, mission_type=mission,
                                                      prompt=[{"role": "user", "content": f"explain {words}"}],
                                                      response=f"{words} {rng.randint(0, 10**9)}"))
                case 2:
                    events.append(AuditEvent.retrieval(cycle, "REASONING", persona=persona, mission_type=mission,
                                                       query=words, chunk_ids=[f"{rng.randint(1, 10**6):x}"]))
                case _:
                    events.append(AuditEvent.prompt_budget(cycle, "SYNTHESIZING", persona=persona,
                                                           mission_type=mission, budget_tokens=1200,
                                                           used_tokens=rng.randint(100, 1200), note=words))
        events.append(AuditEvent.cycle_end(cycle, persona=persona, status="SUCCESS", mission_type=mission,
                                           output=" ".join(rng.sample(WORDS, 8))))
    return events


async def append_while_stopped(inst: Installation, events: list[AuditEvent]) -> None:
    """Append through AuditLog, which takes the single-writer lock: only possible while the kernel is down."""
    async with AuditLog(inst.settings.audit_log, max_bytes=int(ENV["BATOS_AUDIT_MAX_BYTES"])) as audit:
        for event in events:
            await audit.log(event)
        await audit.flush()


# -- 1. real cycles -> fractals -----------------------------------------------------------------------------


async def test_cycles_become_fractals_that_search_and_query_find(installation: Installation) -> None:
    started = time.monotonic()
    async with installation.client() as client:
        await installation.wait_worker(client, "kernel", installation.pid("kernel"))
        target = await fresh_object(client)
        source = "def twice(self, x):\n    return [x, x]\n"
        defined = await client.call("kernel", "define", {"oid": target, "selector": "twice", "source": source},
                                    timeout=120)
        assert defined["status"] == "SUCCESS", defined
        cycles = [defined["cycle_id"]]
        sent = await client.call("kernel", "send", {"oid": target, "selector": "slot_names"}, timeout=120)
        assert sent["status"] == "SUCCESS" and sent["kind"] == "builtin", sent
        cycles.append(sent["cycle_id"])
        status = await client.call("kernel", "status", {}, timeout=30)
        if status["kernel"].get("sandbox_available"):  # a method send runs in the sandbox (SANDBOX.md)
            ran = await client.call("kernel", "send", {"oid": target, "selector": "twice", "args": [21]}, timeout=120)
            assert ran["result"] == [21, 21], ran
            cycles.append(ran["cycle_id"])

        stream = Stream()
        audit = await client.call("kernel", "audit", {}, on_event=stream, timeout=300)
        report = audit["ingest"]
        assert report["malformed"] == 0, report
        assert report["end_offset"] == log_end(installation)
        assert any(e.get("event") == "progress" and e.get("stage") == "AUDIT_INGEST" for e in stream.events)

        logged = valid_events(installation)
        by_cycle: dict[str, dict[str, bytes]] = {}
        for event_id, lines in logged.items():
            assert len(lines) == 1, (event_id, lines)
            by_cycle.setdefault(json.loads(lines[0])["cycle_id"], {})[event_id] = lines[0]
        assert report["created"] == len(logged), (report, len(logged))  # a fresh system: this run holds them all

        for cycle in cycles:
            expected = by_cycle.get(cycle, {})
            assert len(expected) >= 3, (cycle, expected)  # at least start, a transition, the end
            fractals = await fractals_of(client, cycle)
            ids = Counter(json.loads(f["full_json"])["event_id"] for f in fractals)
            assert ids == Counter(expected.keys()), (cycle, ids, list(expected))  # each event once, none foreign
            for f in fractals:
                event = json.loads(f["full_json"])
                assert f["full_json"].encode() == expected[event["event_id"]]  # the exact line
                assert f["meta"]["cycle_id"] == cycle and f["meta"]["event_type"] == event["event_type"]
                assert f["meta"]["persona"] == event["active_persona"] and f["meta"]["status"] == event["status"]

        # search finds a fractal by its summary: memory directly (level fractals / all) and the kernel's relay
        end = next(f for f in await fractals_of(client, cycles[0]) if json.loads(f["full_json"])["event_type"]
                   == "CYCLE_END")
        for level in ("fractals", "all"):
            hits = (await client.call("memory", "search", {"text": end["summary"], "k": 5, "level": level},
                                      timeout=60))["hits"]
            assert hits and hits[0]["oid"] == end["oid"] and hits[0]["level"] == "fractal", (level, hits[:2])
        relayed = await client.call("kernel", "search", {"text": end["summary"], "k": 3, "level": "fractals"},
                                    timeout=60)
        assert relayed["hits"][0]["oid"] == end["oid"]
        assert {h["level"] for h in relayed["hits"]} == {"fractal"}

        # again: nothing new, nothing repeated
        again = (await client.call("kernel", "audit", {}, timeout=300))["ingest"]
        assert again["created"] == 0 and again["end_offset"] == log_end(installation), again
        for cycle in cycles:
            assert len(await fractals_of(client, cycle)) == len(by_cycle[cycle])
    print(f"\n[audit_live] real cycles -> fractals: {time.monotonic() - started:.1f} s "
          f"({len(logged)} events, ingestion {report['seconds']:.2f} s)")


# -- 2. kill -9 during a large ingestion ------------------------------------------------------------------------


async def test_kill_9_during_ingestion_loses_and_repeats_nothing(installation: Installation) -> None:
    settings = installation.settings
    rpc = installation.rpc()
    timings: dict[str, float] = {}
    async with installation.client() as client:
        await installation.wait_worker(client, "kernel", installation.pid("kernel"))
        await client.call("kernel", "audit", {}, timeout=300)  # caught up: what follows is the seeded log
        before = await counts(client)
        offset_before = (await client.call("memory", "audit_offset", {"path": str(settings.audit_log)}))["value"]
        assert offset_before == log_end(installation)

        rpc.supervisor.stopProcess("kernel", True)
        assert rpc.supervisor.getProcessInfo("kernel")["statename"] == "STOPPED"
        seeded = synthetic_events(random.Random(8))
        t0 = time.monotonic()
        await append_while_stopped(installation, seeded)
        timings["append_s"] = time.monotonic() - t0
        assert len(log_segments(settings.audit_log)) > 2, "the seeded log should span rotated segments"
        seeded_end = log_end(installation)

        rpc.supervisor.startProcess("kernel", True)
        pid = installation.pid("kernel")
        installation.remember_processes()
        await installation.wait_worker(client, "kernel", pid, timeout=180)

        # audit, and SIGKILL the kernel once KILL_AFTER_BATCHES batches are committed
        stream = Stream()
        batches = stream.when(lambda evs: sum(e.get("stage") == "AUDIT_INGEST" for e in evs) >= KILL_AFTER_BATCHES)
        t0 = time.monotonic()
        # `audit` is retry-safe (the broker would run it again on the restarted kernel); opting out makes the
        # dead kernel's run end here, so what it committed before dying can be checked on its own
        task = asyncio.create_task(client.call("kernel", "audit", {}, on_event=stream, timeout=600,
                                               idempotent=False))
        done, _ = await asyncio.wait({task, asyncio.create_task(batches.wait())}, timeout=300,
                                     return_when=asyncio.FIRST_COMPLETED)
        assert task not in done, "the ingestion finished before the kill: seed more events"
        assert batches.is_set(), f"no {KILL_AFTER_BATCHES} batches in 300 s: {stream.events[-3:]}"
        os.kill(pid, signal.SIGKILL)
        timings["first_run_s"] = time.monotonic() - t0
        with pytest.raises(ServiceError) as lost:
            await task  # the requester learns that its worker died
        assert lost.value.code == ErrorCode.WORKER_LOST, lost.value
        last = [e for e in stream.events if e.get("stage") == "AUDIT_INGEST"][-1]

        new_pid = installation.wait_restarted("kernel", pid, timeout=120)
        await installation.wait_worker(client, "kernel", new_pid, timeout=180)
        committed = (await client.call("memory", "audit_offset", {"path": str(settings.audit_log)}))["value"]
        assert offset_before < committed < seeded_end, (offset_before, committed, seeded_end)  # killed mid-way
        assert committed >= offset_before + last["done"]  # what was reported committed, stayed committed
        mid = await counts(client)
        in_memory = mid["counts"]["context_fractal"] - before["counts"]["context_fractal"]
        assert 0 < in_memory < len(seeded), in_memory

        t0 = time.monotonic()
        report = (await client.call("kernel", "audit", {}, timeout=600))["ingest"]
        timings["second_run_s"] = time.monotonic() - t0
        # memory may still commit the dead kernel's last batch (with its offset) after `committed` was read
        assert committed <= report["start_offset"] < seeded_end and report["reset"] is None, report
        assert report["malformed"] == 0 and report["end_offset"] == log_end(installation), report

        # every event of the log, exactly once: by cycle for the seeded ones, by count for all of them
        logged = valid_events(installation)
        assert all(len(lines) == 1 for lines in logged.values())
        for cycle in sorted({e.cycle_id for e in seeded}):
            fractals = await fractals_of(client, cycle)
            ids = Counter(json.loads(f["full_json"])["event_id"] for f in fractals)
            want = Counter(e.event_id for e in seeded if e.cycle_id == cycle)
            assert ids == want, (cycle, ids - want, want - ids)
        after = await counts(client)
        assert after["counts"]["context_fractal"] == len(logged), (after["counts"], len(logged))
        assert report["lines"] == report["created"] + report["skipped"]
        live_objects = sum(after["counts"].get(name, 0) for name in VECTOR_LEVELS)
        assert after["vectors"]["live"] == live_objects, (after["vectors"], after["counts"])

        # a seeded event's fractal is found by its summary
        probe = (await fractals_of(client, seeded[len(seeded) // 2].cycle_id))[7]
        hits = (await client.call("memory", "search", {"text": probe["summary"], "k": 3, "level": "fractals"},
                                  timeout=60))["hits"]
        assert hits[0]["oid"] == probe["oid"] or hits[0]["text"] == probe["summary"], (probe, hits[:2])
    print(f"\n[audit_live] {len(seeded)} events: append {timings['append_s']:.1f} s, killed after "
          f"{timings['first_run_s']:.1f} s ({in_memory} in memory), second run {timings['second_run_s']:.1f} s "
          f"(created {report['created']}, skipped {report['skipped']})")


def test_down_is_clean(installation: Installation) -> None:
    down = installation.down()
    assert down.returncode == 0 and "no process left behind" in down.stdout, down.stdout + down.stderr
    assert installation.leftovers() == []

