"""Issue 9 item 7 / issue 15 item 3: `forge BRICK` end to end on CPU with the embedded model, the whole system up.

The system runs as `make up` runs it (`batos.ctl up`, supervisord, the repo's supervisord.conf) in a temp var dir,
the autotelic loop off so nothing but this test writes memory or dispatches a forge. Then:

1. memory gets a little code (two files: summaries and chunks) and BRICK a history: SUCCESS cycles in which BRICK
   wrote a missing method, sent as Table 3 events to the kernel's ``audit_event`` (the audit log's single
   writer) in the shape services/kernel/dnu.py writes them, and turned into ContextFractals by ``audit``;
2. the kernel's ``forge`` (a raw Table 1 ``command``, for a tiny run: 2 optimizer steps, the canonical
   template, one format prompt): the forge service curates and replies with the steward's instruction, the
   kernel sends it to the steward service (``steward.upgrade`` over the broker), which stops the ``forge``
   program through supervisord, trains, evaluates, stores the adapter in the Living Image as a LoRA expert (a
   ZODB Blob through ZEO) and starts the program again; the kernel relays the steward's events until the
   restarted worker reads the expert back from the image and decides;
3. afterwards: the expert holds the adapter's files, an ADAPTER_INCARNATION audit event names it, and it is
   active for BRICK in the llm service exactly when its metrics say it beat the base model (either outcome is
   accepted, but it must agree with the metrics); memory is what it was, object for object; the kernel,
   memory_weaver, zeo, broker and steward kept their pids the whole time; nothing was written in var/ but the
   steward's own record and the forge's adapter cache;
4. the fault: kill -9 of the steward during a second run's training. The kernel's `forge` fails at once with a
   ``worker_lost`` error saying what happens next; supervisord brings the steward back, which kills the orphaned
   training, starts the forge program again and records the run as failed (its ``status``); memory verifies clean.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import time
import uuid
import xmlrpc.client
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from batos.audit import AuditEvent, render_messages
from batos.client import Client
from batos.errors import ServiceError
from batos.image import Image
from batos.programs import PROGRAMS
from services.forge import lora_experts
from services.forge.incarnation import decide
from tests.integration.system_fixture import Installation, installation_fixture

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

ENV = {
    "BATOS_AUTOTELIC_PERIOD": "0",  # no background ingestion or forge dispatch during the test
    "BATOS_FORGE_TRAIN_TIMEOUT": "480",  # the steward kills a runaway training run well inside the test timeout
}
FORGE_OPTIONS = {"max_steps": 2, "logging_steps": 1, "generate_script": False, "format_prompts": 1}
STAYING_UP = tuple(p for p in PROGRAMS if p != "forge")  # the steward restarts only forge
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


async def wait_audited(image: Image, name: str, timeout: float = 120.0) -> dict[str, Any]:
    """The expert once the restarted worker recorded its audit event (after the decision the steward reported)."""
    deadline = time.monotonic() + timeout
    expert: dict[str, Any] = {}
    while time.monotonic() < deadline:
        expert = await image.read(lora_experts.get, name) or {}
        if expert.get("audited"):
            return expert
        await asyncio.sleep(0.5)
    raise AssertionError(f"expert {name} not audited in {timeout} s: {expert}")


def var_files(inst: Installation) -> set[str]:
    return {str(p.relative_to(inst.var)) for p in inst.var.rglob("*") if p.is_file()}


# -- the tests --------------------------------------------------------------------------------------------

FORGE_COMMAND = {"command": "forge", "target_oid": "0",
                 "mission_brief": {"type": "forge", "selector": "forge", "args": ["BRICK"], "kwargs": FORGE_OPTIONS}}


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
        files_before = var_files(installation)

        # -- the forge: prepared by forge, run by the steward, relayed by the kernel ---------------------------
        events: list[dict[str, Any]] = []

        async def collect(event: dict[str, Any]) -> None:
            events.append({**event, "at": time.monotonic()})

        t0 = time.monotonic()
        watch = PidWatch(installation)
        with watch:
            reply = await client.call("kernel", "command", FORGE_COMMAND, on_event=collect, timeout=FORGE_TIMEOUT)
            timings["forge_s"] = time.monotonic() - t0
            await watch.stop()

        # -- the run itself ----------------------------------------------------------------------------------
        assert reply["ok"] and reply["restarted"], reply
        assert reply["script"]["origin"] == "template" and reply["counts"]["train"] == seeded["curated"]["train"]
        states = [e["state"] for e in events if e.get("event") == "state"]
        for state in ("STARTED", "WORKER_STOPPED", "TRAINING", "EVALUATING", "WORKER_RESTARTED", "FINISHED",
                      "INCARNATED"):
            assert state in states, (state, states)
        assert states.index("WORKER_STOPPED") < states.index("TRAINING") < states.index("WORKER_RESTARTED")
        assert states[-1] == "INCARNATED", states
        train = [e for e in events if e.get("event") == "progress" and e.get("stage") == "TRAINING"
                 and e.get("total") == FORGE_OPTIONS["max_steps"]]
        assert [e["done"] for e in train][-1] == FORGE_OPTIONS["max_steps"], train
        stored = next(e for e in events if e.get("event") == "log" and e["text"].startswith("stored: "))
        assert reply["expert"] in stored["text"]

        # the steward stopped the forge program through supervisord and started it again
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

        # -- the expert in the image: its files, its metrics, the decision that agrees with them ---------------
        image = await Image(installation.settings, pool_threads=1, do_awaken=False).open()
        try:
            expert = await wait_audited(image, reply["expert"])
            restored = Path(await image.read(lora_experts.extract, reply["expert"],
                                             str(installation.root / "restored")))
        finally:
            await image.close()
        metrics = expert["metrics"]
        assert metrics["eval_examples"] == seeded["curated"]["eval"] and metrics["format_kind"] == "python", metrics
        assert metrics["base"]["eval_loss"] is not None and metrics["adapter"]["eval_loss"] is not None
        assert expert["steps"] == FORGE_OPTIONS["max_steps"] and expert["persona"] == "BRICK"
        assert expert["instruction_id"] == reply["instruction_id"] and expert["oid"] == reply["expert_oid"]
        names = sorted(p.name for p in restored.iterdir())
        assert "adapter_config.json" in names and "adapter_model.safetensors" in names, names
        chosen, why = decide(metrics)
        assert expert["decision"] == ("activated" if chosen else "kept_previous"), (expert, metrics)
        assert expert["reason"] == why and reply["decision"] == expert["decision"]
        assert reply["activated"] is chosen
        assert reply["metrics"]["after"]["eval_loss"] == metrics["adapter"]["eval_loss"]
        assert reply["metrics"]["before"] == {"model": "base", **{k: metrics["base"][k]
                                                                  for k in ("eval_loss", "format_valid")}}

        await installation.wait_worker(client, "llm", new_forge, timeout=120)
        active = (await client.call("llm", "adapters", {}, timeout=30))["personas"].get("BRICK")
        if chosen:
            # the forge worker read it back from the image into its own cache: the same bytes
            assert active is not None and active["meta"]["expert"] == reply["expert"], active
            cached = Path(active["path"])
            assert all((cached / n).read_bytes() == (restored / n).read_bytes() for n in names)
        else:
            assert active is None, active  # the previous state (the base model) stays
        said = await client.call("llm", "generate", {"persona": "BRICK", "max_tokens": 4,
                                                     "messages": [{"role": "user", "content": "def add("}]},
                                 timeout=120)
        assert bool(said["adapter"]) is chosen, said

        logged = [json.loads(line) for line in installation.settings.audit_log.read_text().splitlines()
                  if '"ADAPTER_INCARNATION"' in line]
        assert [e["event_data"]["blob_oid"] for e in logged] == [expert["oid"]], logged
        assert logged[0]["event_data"]["decision"] == expert["decision"]

        # -- memory: what it was, object for object ----------------------------------------------------------
        after = await memory_snapshot(client, seeded["cycles"])
        assert after["counts"] == before["counts"]
        assert after["vectors"] == before["vectors"]
        assert after["chunks"] == before["chunks"]
        assert after["fractals"] == before["fractals"]

        # -- nothing went through files in var/: what is new is the steward's record and the forge's cache ------
        new = {f.split("/")[0] if not f.startswith("steward/") else f for f in var_files(installation) - files_before}
        allowed = {"steward/runs.jsonl", "lora_adapters", "blob_cache", "log", "live_image.fs.index",
                   "live_image.fs.tmp", "live_image.fs.lock", "blobs", "metacognition.jsonl"}
        assert new <= allowed, new - allowed

    status_run = [e for e in events if e.get("event") == "state"]
    t_start = status_run[0]["at"]
    timeline = ", ".join(f"{e['state']} +{e['at'] - t_start:.0f}s" for e in status_run)
    print(f"\n[forge_e2e] steward events: {timeline}")
    print(f"\n[forge_e2e] up {timings['up_s']:.0f} s, seed {timings['seed_s']:.1f} s, forge (kernel call) "
          f"{timings['forge_s']:.1f} s (steward: stop+train+evaluate+start {reply['seconds']} s); "
          f"decision {expert['decision']}: {expert['reason']}")


def not_a_zombie(proc: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return proc.status() != psutil.STATUS_ZOMBIE
    return False


def training_children(steward_pid: int) -> list[psutil.Process]:
    with contextlib.suppress(psutil.Error):
        return psutil.Process(steward_pid).children(recursive=True)
    return []


async def test_kill_9_of_the_steward_mid_training_is_reported_and_cleaned_up(installation: Installation) -> None:
    """The fault: the steward dies (SIGKILL) while training runs; the console hears why; the system recovers."""
    async with installation.client() as client:
        if not (await client.call("forge", "curate", {"persona": "BRICK"}, timeout=120))["counts"]["train"]:
            await seed(client)  # run on its own (-k): BRICK needs a history to forge from
        steward_pid = installation.pid("steward")
        forge_pid = installation.pid("forge")
        killed: dict[str, Any] = {}

        async def on_event(event: dict[str, Any]) -> None:
            # the first training progress comes from the script's own output: the child surely runs
            if event.get("event") == "progress" and event.get("stage") == "TRAINING" and not killed:
                killed["children"] = training_children(steward_pid)
                os.kill(steward_pid, signal.SIGKILL)
                killed["at"] = time.monotonic()

        with pytest.raises(ServiceError) as info:
            await client.call("kernel", "command", FORGE_COMMAND, on_event=on_event, timeout=FORGE_TIMEOUT)
        assert killed and killed["children"], "the steward was not killed during training"
        assert info.value.code == "worker_lost", info.value
        assert "the steward died during forge run" in info.value.message
        assert "records the run as failed" in info.value.message
        assert time.monotonic() - killed["at"] < 30  # at once, not after a timeout

        # supervisord brings the steward back; it closes the run out: training killed, forge started again
        new_steward = installation.wait_restarted("steward", steward_pid, timeout=120)
        await installation.wait_worker(client, "steward", new_steward, timeout=120)
        status = await client.call("steward", "status", {}, timeout=30)
        last = status["runs"][-1]
        assert last["ok"] is False and "not retried" in last["reason"], last
        assert status["busy"] == [] and status["current"] is None
        # the orphaned training (a GB-sized process takes a moment to exit after its SIGKILL) is gone
        _, alive = psutil.wait_procs(killed["children"], timeout=60)
        assert not [p for p in alive if not_a_zombie(p)], alive
        info_forge = installation.rpc().supervisor.getProcessInfo("forge")
        assert info_forge["statename"] == "RUNNING" and info_forge["pid"] != forge_pid
        await installation.wait_worker(client, "llm", int(info_forge["pid"]), timeout=120)

        # memory verifies clean, and no half-stored expert was left behind
        verified = await client.call("memory", "verify", {}, timeout=300)
        assert verified["ok"], verified
        image = await Image(installation.settings, pool_threads=1, do_awaken=False).open()
        try:
            experts = await image.read(lora_experts.listing)
        finally:
            await image.close()
        assert [e for e in experts if e.get("instruction_id") == info.value.details["instruction_id"]] == []
        assert all(e["audited"] for e in experts)  # the first test's, if it ran, is complete
