"""Issue 9 item 7: `forge BRICK` end to end on CPU with the embedded model, the whole system up.

The system runs as `make up` runs it (`batos.ctl up`, supervisord, the repo's supervisord.conf) in a temp var dir,
the autotelic loop off so nothing but this test writes memory or dispatches a forge. Then:

1. memory gets a little code (two files: summaries and chunks) and BRICK a history: SUCCESS cycles in which BRICK
   wrote a missing method, sent as Table 3 events to the kernel's ``audit_event`` (the audit log's single
   writer) in the shape services/kernel/dnu.py writes them, and turned into ContextFractals by ``audit``;
2. the kernel's ``forge`` (a raw Table 1 ``command``, for a tiny run: 2 optimizer steps, the canonical
   template, one format prompt) curates, and the steward stops the ``forge`` program through supervisord, trains,
   evaluates, and starts it again; the kernel follows the steward's log until the restarted worker reports the
   adapter's incarnation;
3. afterwards: the adapter is incarnated (a blob in memory holding its files, an ADAPTER_INCARNATION audit
   event) and active for BRICK in the llm service exactly when its metrics.json says it beat the base model
   (either outcome is accepted, but it must agree with the metrics); memory is what it was, object for object
   (plus that blob); the kernel, memory_weaver, zeo and broker kept their pids the whole time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import tarfile
import time
import uuid
import xmlrpc.client
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from batos.audit import AuditEvent, render_messages
from batos.client import Client
from services.forge.incarnation import MARKER, decide
from services.forge.steward import read_log
from tests.integration.system_fixture import Installation, installation_fixture

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

ENV = {
    "BATOS_AUTOTELIC_PERIOD": "0",  # no background ingestion or forge dispatch during the test
    "BATOS_FORGE_TRAIN_TIMEOUT": "480",  # the steward kills a runaway training run well inside the test timeout
}
FORGE_OPTIONS = {"max_steps": 2, "logging_steps": 1, "generate_script": False, "format_prompts": 1}
STAYING_UP = ("zeo", "broker", "memory_weaver", "ingestor", "kernel", "steward")
FORGE_TIMEOUT = 480.0

FILES = {
    "/forge_e2e/geometry.py": [
        ("area_of_circle", "def area_of_circle(radius):\n    return 3.14159 * radius ** 2\n"),
        ("perimeter", "def perimeter(width, height):\n    return 2 * (width + height)\n"),
        ("diagonal", "def diagonal(width, height):\n    return (width ** 2 + height ** 2) ** 0.5\n"),
    ],
    "/forge_e2e/inventory.py": [
        ("restock", "def restock(stock, item, count):\n    stock[item] = stock.get(item, 0) + count\n"
                    "    return stock\n"),
        ("sell", "def sell(stock, item):\n    stock[item] -= 1\n    return stock[item]\n"),
    ],
}
# BRICK's successful methods: (selector, args, source) -- short, so evaluation's greedy outputs stay short
METHODS = [
    ("twice", [21], "def twice(self, x):\n    return [x, x]\n"),
    ("word_count", [], "def word_count(self):\n    return len(self.get_slot('source_text').split())\n"),
    ("line_count", [], "def line_count(self):\n    return len(self.get_slot('source_text').splitlines())\n"),
    ("shout", ["hi"], "def shout(self, text):\n    return text.upper() + '!'\n"),
    ("add", [2, 3], "def add(self, a, b):\n    return a + b\n"),
    ("is_long", [], "def is_long(self):\n    return len(self.get_slot('source_text')) > 80\n"),
    ("first_line", [], "def first_line(self):\n    return self.get_slot('source_text').splitlines()[0]\n"),
    ("square", [7], "def square(self, n):\n    return n * n\n"),
    ("greet", ["Ada"], "def greet(self, name):\n    return f'Hello, {name}'\n"),
    ("node_kind", [], "def node_kind(self):\n    return self.get_slot('metadata')['node_type']\n"),
]


@pytest.fixture(scope="module")
def installation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installation]:
    yield from installation_fixture(tmp_path_factory, "forge_e2e", **ENV)


# -- seeding ----------------------------------------------------------------------------------------------


def file_payload(path: str, functions: list[tuple[str, str]]) -> dict[str, Any]:
    chunks, line = [], 1
    for name, text in functions:
        end = line + len(text.splitlines()) - 1
        meta = {"file_path": path, "start_line": line, "end_line": end, "node_type": "FunctionDef",
                "node_name": name, "parent_nodes": [f"{path}:module"], "dependencies": [],
                "content_hash": hashlib.sha256(text.encode()).hexdigest(), "token_count": len(text.split()),
                "flags": []}
        chunks.append({"source_text": text, "metadata": meta, "summary_key": "file"})
        line = end + 2
    summary = {"key": "file", "kind": "file", "summary_text": f"{path}: " + ", ".join(n for n, _ in functions),
               "metadata": {"file_path": path, "node_type": "Module", "node_name": path}}
    file_hash = hashlib.sha256("".join(t for _, t in functions).encode()).hexdigest()
    return {"file_path": path, "file_hash": file_hash, "summaries": [summary], "chunks": chunks}


def brick_cycle(selector: str, args: list[Any], source: str, receiver: str) -> list[AuditEvent]:
    """A successful `send` whose method BRICK wrote: the events services/kernel/run.py and dnu.py log."""
    cycle = str(uuid.uuid4())
    mission = {"command": "initiate_cognitive_cycle", "target_oid": receiver,
               "mission_brief": {"type": "message", "selector": selector, "args": args, "kwargs": {}},
               "schema_version": 1}
    call = f"{selector}({', '.join(map(repr, args))})"
    prompt = render_messages([
        {"role": "system", "content": "You are BRICK. Write one Python method."},
        {"role": "user", "content": f"Write the method {call} for object {receiver} (memory_chunk). "
                                    f"Define `def {selector}(self, ...)`; reply with the code only."}])
    kw = {"mission_type": "message"}
    states = ["IDLE", "DECOMPOSING", "REASONING", "SYNTHESIZING", "VALIDATING"]
    events = [AuditEvent.cycle_start(cycle, persona="BRICK", input=mission, oid=receiver, **kw)]
    events += [AuditEvent.transition(cycle, a, b, persona="BRICK", **kw)
               for a, b in zip([None, *states[:-1]], states, strict=True)]
    events.append(AuditEvent.llm_call(cycle, "SYNTHESIZING", persona="BRICK", prompt=prompt, response=source, **kw))
    events.append(AuditEvent.dnu_outcome(cycle, "VALIDATING", persona="BRICK", receiver_oid=receiver,
                                         selector=selector, status="SUCCESS", source=source, method_source=source,
                                         llm_prompt=prompt, mission_brief=mission, result=None, **kw))
    events.append(AuditEvent.transition(cycle, "VALIDATING", "COMPLETE", persona="BRICK", status="SUCCESS", **kw))
    events.append(AuditEvent.cycle_end(cycle, persona="BRICK", status="SUCCESS", output=None, **kw))
    return events


async def seed(client: Client) -> dict[str, Any]:
    for path, functions in FILES.items():
        await client.call("memory", "replace_file", file_payload(path, functions), timeout=120)
    receiver = "1a"
    cycles: list[str] = []
    for selector, args, source in METHODS:
        events = brick_cycle(selector, args, source, receiver)
        for event in events:
            reply = await client.call("kernel", "audit_event", {"event": event.model_dump(mode="json")}, timeout=30)
            assert reply["logged"] and reply["event_id"] == event.event_id, reply
        cycles.append(events[0].cycle_id)
    audit = (await client.call("kernel", "audit", {}, timeout=300))["ingest"]
    assert audit["malformed"] == 0 and audit["created"] >= len(cycles) * 10, audit
    curated = await client.call("forge", "curate", {"persona": "BRICK"}, timeout=120)
    counts = curated["counts"]
    assert counts["cycles_successful"] == len(METHODS) and counts["examples"] == len(METHODS), counts
    assert counts["train"] >= 2 and counts["eval"] >= 1, counts
    return {"cycles": cycles, "curated": counts}


# -- what must not change ---------------------------------------------------------------------------------


async def memory_snapshot(client: Client, cycles: list[str]) -> dict[str, Any]:
    """Counts per prototype, the vector store's size, and for every chunk: its nearest neighbours by its own text
    (oids and scores: a changed vector changes the scores) and the object as inspect renders it."""
    stats = await client.call("memory", "stats", {}, timeout=60)
    chunks: dict[str, Any] = {}
    for functions in FILES.values():
        for _, text in functions:
            hits = (await client.call("memory", "search", {"text": text, "k": 4, "level": "all"}, timeout=60))["hits"]
            chunks[text] = [(h["oid"], h["level"], h["score"]) for h in hits]
            top = hits[0]
            assert top["level"] == "chunk" and top["text"] == text, (text, top)
            chunks[top["oid"]] = await client.call("memory", "inspect", {"oid": top["oid"]}, timeout=60)
    fractals = {c: sorted((f["oid"], f["summary"], f["full_json"]) for f in
                          (await client.call("memory", "query_fractals", {"cycle_id": c, "limit": 100}))["fractals"])
                for c in cycles}
    return {"counts": stats["counts"], "vectors": {k: stats["vectors"][k] for k in ("rows", "live", "dim")},
            "chunks": chunks, "fractals": fractals}


class PidWatch:
    """Polls supervisord while the forge runs: every pid and state each program was seen with."""

    def __init__(self, inst: Installation):
        self.inst = inst
        self.seen: dict[str, set[tuple[int, str]]] = {}
        self._stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def _poll(self) -> None:
        with contextlib.suppress(OSError, xmlrpc.client.Fault):
            for p in self.inst.rpc().supervisor.getAllProcessInfo():
                self.seen.setdefault(p["name"], set()).add((int(p["pid"]), p["statename"]))

    async def _run(self) -> None:
        while not self._stop.is_set():
            await asyncio.to_thread(self._poll)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 0.5)

    def __enter__(self) -> PidWatch:
        self.task = asyncio.create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    async def stop(self) -> None:
        self._stop.set()
        if self.task is not None:
            await self.task
        self._poll()


async def wait_incarnated(adapter_dir: Path, timeout: float = 120.0) -> dict[str, Any]:
    """The marker once the blob is stored and the audit event recorded (both follow the `incarnated` line)."""
    deadline = time.monotonic() + timeout
    marker: dict[str, Any] = {}
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            marker = json.loads((adapter_dir / MARKER).read_text())
            if marker.get("blob_oid") and marker.get("audited"):
                return marker
        await asyncio.sleep(0.5)
    raise AssertionError(f"adapter {adapter_dir} not fully incarnated in {timeout} s: {marker}")


# -- the test ---------------------------------------------------------------------------------------------


async def test_forge_brick_end_to_end(installation: Installation) -> None:
    timings: dict[str, float] = {"up_s": installation.up_seconds}
    async with installation.client() as client:
        t0 = time.monotonic()
        seeded = await seed(client)
        timings["seed_s"] = time.monotonic() - t0
        before = await memory_snapshot(client, seeded["cycles"])
        assert (await client.call("llm", "adapters", {}, timeout=30))["personas"].get("BRICK") is None
        pids = {name: int(p["pid"]) for name, p in installation.programs().items()}
        started = {name: p["start"] for name, p in installation.programs().items()}

        # -- the forge, followed by the kernel --------------------------------------------------------------
        events: list[dict[str, Any]] = []

        async def collect(event: dict[str, Any]) -> None:
            events.append(event)

        command = {"command": "forge", "target_oid": "0",
                   "mission_brief": {"type": "forge", "selector": "forge", "args": ["BRICK"],
                                     "kwargs": FORGE_OPTIONS}}
        t0 = time.monotonic()
        watch = PidWatch(installation)
        with watch:
            reply = await client.call("kernel", "command", command, on_event=collect, timeout=FORGE_TIMEOUT)
            timings["forge_s"] = time.monotonic() - t0
            await watch.stop()

        # -- the run itself ----------------------------------------------------------------------------------
        assert reply["ok"] and reply["restarted"], reply
        assert reply["script"]["origin"] == "template" and reply["counts"]["train"] == seeded["curated"]["train"]
        adapter_dir = Path(reply["adapter_dir"])
        assert adapter_dir.parent == installation.settings.lora_dir and (adapter_dir / "adapter_config.json").is_file()
        meta = json.loads((adapter_dir / "training_meta.json").read_text())
        assert meta["steps"] == FORGE_OPTIONS["max_steps"] and meta["persona"] == "BRICK", meta
        assert meta["instruction_id"] == reply["instruction_id"]
        states = [e["state"] for e in events if e.get("event") == "state"]
        for state in ("STARTED", "WORKER_STOPPED", "TRAINING", "EVALUATING", "FINISHED", "WORKER_RESTARTED",
                      "INCARNATED"):
            assert state in states, (state, states)
        assert states[-1] == "INCARNATED", states
        train = [e for e in events if e.get("event") == "progress" and e.get("stage") == "TRAINING"
                 and e.get("total") == FORGE_OPTIONS["max_steps"]]
        assert [e["done"] for e in train][-1] == FORGE_OPTIONS["max_steps"], train

        # the steward stopped the forge program through supervisord and started it again
        log = read_log(installation.settings.upgrade_channel, reply["instruction_id"])
        kinds = [line["event"] for line in log]
        stopped = next(line for line in log if line["event"] == "stopped")
        restarted = next(line for line in log if line["event"] == "restarted")
        assert stopped["program"] == "forge" and stopped["state"] == "STOPPED", stopped
        assert restarted["state"] == "RUNNING", restarted
        assert kinds.index("stopped") < kinds.index("stage") < kinds.index("finished") < kinds.index("incarnated")
        forge_seen = watch.seen["forge"]
        assert any(state != "RUNNING" for _, state in forge_seen), forge_seen
        new_forge = installation.pid("forge")
        assert new_forge != pids["forge"]

        # -- the others never went down -----------------------------------------------------------------------
        for name in STAYING_UP:
            assert watch.seen[name] == {(pids[name], "RUNNING")}, (name, watch.seen[name])
        now = installation.programs()
        assert {n: (now[n]["pid"], now[n]["start"]) for n in STAYING_UP} == \
            {n: (pids[n], started[n]) for n in STAYING_UP}

        # -- the decision agrees with metrics.json ----------------------------------------------------------
        metrics = json.loads((adapter_dir / "metrics.json").read_text())
        assert metrics["eval_examples"] == seeded["curated"]["eval"] and metrics["format_kind"] == "python", metrics
        assert metrics["base"]["eval_loss"] is not None and metrics["adapter"]["eval_loss"] is not None
        marker = await wait_incarnated(adapter_dir)
        chosen, why = decide(metrics)
        assert marker["decision"] == ("activated" if chosen else "kept_previous"), (marker, metrics)
        assert marker["reason"] == why and reply["decision"] == marker["decision"]
        assert reply["activated"] is chosen
        assert reply["metrics"]["after"]["eval_loss"] == metrics["adapter"]["eval_loss"]
        assert reply["metrics"]["before"] == {"model": "base", **{k: metrics["base"][k]
                                                                  for k in ("eval_loss", "format_valid")}}

        await installation.wait_worker(client, "llm", new_forge, timeout=120)
        active = (await client.call("llm", "adapters", {}, timeout=30))["personas"].get("BRICK")
        if chosen:
            assert active is not None and Path(active["path"]) == adapter_dir, active
        else:
            assert active is None, active  # the previous state (the base model) stays
        said = await client.call("llm", "generate", {"persona": "BRICK", "max_tokens": 4,
                                                     "messages": [{"role": "user", "content": "def add("}]},
                                 timeout=120)
        assert bool(said["adapter"]) is chosen, said

        # -- incarnated: the blob holds the adapter's files; the audit log says so -----------------------------
        blob = await client.call("memory", "blob_get", {"oid": marker["blob_oid"]}, timeout=60)
        assert blob["meta"]["persona"] == "BRICK" and blob["meta"]["decision"] == marker["decision"]
        assert blob["meta"]["dataset_sha256"] == meta["dataset_sha256"]
        with tarfile.open(fileobj=io.BytesIO(blob["data"])) as tar:
            stored = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]
        on_disk = {str(p.relative_to(adapter_dir)): p.read_bytes() for p in adapter_dir.rglob("*")
                   if p.is_file() and p.name != MARKER and not p.name.startswith(".")}
        assert stored == on_disk and "adapter_model.safetensors" in stored
        logged = [json.loads(line) for line in installation.settings.audit_log.read_text().splitlines()
                  if '"ADAPTER_INCARNATION"' in line]
        assert [e["event_data"]["blob_oid"] for e in logged] == [marker["blob_oid"]], logged
        assert logged[0]["event_data"]["decision"] == marker["decision"]

        # -- memory: what it was, plus the adapter's blob ----------------------------------------------------
        after = await memory_snapshot(client, seeded["cycles"])
        grown = {k: after["counts"].get(k, 0) - before["counts"].get(k, 0) for k in after["counts"] | before["counts"]}
        assert {k: v for k, v in grown.items() if v} == {"blob": 1}, (before["counts"], after["counts"])
        assert after["vectors"] == before["vectors"]
        assert after["chunks"] == before["chunks"]
        assert after["fractals"] == before["fractals"]

    finished = next(line for line in log if line["event"] == "finished")
    t_start = datetime.fromisoformat(log[0]["ts"])
    timeline = ", ".join(f"{line['event']}{'/' + line['stage'] if line['event'] == 'stage' else ''} "
                         f"+{(datetime.fromisoformat(line['ts']) - t_start).total_seconds():.0f}s"
                         for line in log if line["event"] not in ("progress", "output"))
    print(f"\n[forge_e2e] steward log: {timeline}")
    print(f"\n[forge_e2e] up {timings['up_s']:.0f} s, seed {timings['seed_s']:.1f} s, forge (kernel call) "
          f"{timings['forge_s']:.1f} s (steward: stop+train+evaluate+start {finished['seconds']} s); "
          f"decision {marker['decision']}: {marker['reason']}")
