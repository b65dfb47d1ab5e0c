"""Issue 3 item 10: memory survives `kill -9` in the middle of a large ingest, with real processes.

The whole system is up (`batos.ctl up`, supervisord, the repo's supervisord.conf). Two writers
drive `memory` through the broker the way ingestion does: one sends `create_chunks` batches
(marked idempotent, so the broker re-dispatches them when their worker dies), the other
`replace_files` batches (a file summary and its chunks per file; files are written again with new
versions; not idempotent, so a dead worker's request fails with `worker_lost`). memory_weaver is
SIGKILLed twice while both writers have a batch in flight, and supervisord restarts it. Then:

- a batch that got a reply is in memory in full; a reply never reports half a batch;
- a batch whose request failed is there entirely or not at all, as seen right after the restart
  and before it is re-sent, and re-sending it answers accordingly (unchanged vs replaced);
- the vector store agrees with the objects (live vectors == chunks + summaries + fractals, in the
  image and in the restarted worker's matrix) and a search by a chunk's exact text finds it first;
- after `down`, ZODB's `fstest` and `fsrefs` find nothing wrong with var/live_image.fs;
- after `down` and `up` again, memory is identical, object for object.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from batos.client import Client
from batos.errors import ServiceError
from proto import ErrorCode
from tests.integration.system_fixture import Installation, installation_fixture

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(420)]

WORDS = sorted(n for n in sys.stdlib_module_names if n.isalpha() and len(n) > 3)  # varied, reproducible
CREATE_BATCHES, CREATE_SIZE = 24, 20
REPLACE_BATCHES, FILES_PER_BATCH, FILE_POOL, CHUNKS_PER_FILE = 16, 3, 30, 6  # 48 writes of 30 files
KILL_AFTER = (10, 26)  # replies received (both writers together) before each SIGKILL
SHARD_ROWS = "100"  # small vector shards, so the batches cross shard boundaries and compactions
CALL_TIMEOUT = 180.0  # a batch waits out a restart; a timeout is a hang, not an expected outcome
RETRYABLE = {ErrorCode.WORKER_LOST, ErrorCode.UNAVAILABLE, ErrorCode.CONFLICT}
SEARCH_SAMPLE = 40
VECTOR_LEVELS = ("memory_chunk", "contextual_summary", "context_fractal")


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def make_chunk(rng: random.Random, path: str, index: int, summary_key: str | None = None) -> dict[str, Any]:
    """A function-sized chunk of synthetic code with Table 2 metadata, unlike every other chunk."""
    name = f"{rng.choice(WORDS)}_{rng.choice(WORDS)}_{index}"
    a, b = rng.sample(WORDS, 2)
    deps = rng.sample(WORDS, 3)
    doc = " ".join(rng.sample(WORDS, 8))
    text = (f'def {name}({a}, {b}):\n    """{doc.capitalize()}."""\n'
            f"    return {deps[0]}.{deps[1]}({a}, {b}) + {rng.randint(0, 10**6)}\n")
    start = 1 + 5 * index
    meta = {"file_path": path, "start_line": start, "end_line": start + 2, "node_type": "FunctionDef",
            "node_name": name, "parent_nodes": [f"{path}:module"], "dependencies": deps,
            "content_hash": sha(text), "token_count": len(text.split()), "flags": []}
    chunk = {"source_text": text, "metadata": meta}
    if summary_key is not None:
        chunk["summary_key"] = summary_key
    return chunk


@dataclass
class FileVersion:
    path: str
    version: int
    summary: str
    chunks: list[dict[str, Any]]

    @property
    def file_hash(self) -> str:
        return sha("\0".join([self.path, str(self.version), *(c["source_text"] for c in self.chunks)]))

    def payload(self) -> dict[str, Any]:
        return {"file_path": self.path, "file_hash": self.file_hash, "chunks": self.chunks,
                "summaries": [{"key": "file", "kind": "file", "summary_text": self.summary,
                               "metadata": {"file_path": self.path, "node_type": "Module", "node_name": self.path}}]}


@dataclass
class Batch:
    kind: str  # "create" | "replace"
    number: int
    chunks: list[dict[str, Any]] = field(default_factory=list)  # create
    versions: list[FileVersion] = field(default_factory=list)  # replace
    previous: list[FileVersion | None] = field(default_factory=list)  # replace: what each file held before
    replies: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    seen_after_failure: list[str] = field(default_factory=list)  # "all" | "none", before each re-send

    @property
    def paths(self) -> list[str]:
        return sorted({c["metadata"]["file_path"] for c in self.chunks} | {v.path for v in self.versions})


def make_batches(seed: int = 10) -> tuple[list[Batch], list[Batch]]:
    rng = random.Random(seed)
    creates = []
    for b in range(CREATE_BATCHES):
        path = f"/durability/create/b{b:02d}.py"
        creates.append(Batch("create", b, chunks=[make_chunk(rng, path, i) for i in range(CREATE_SIZE)]))
    latest: dict[str, FileVersion] = {}
    replaces = []
    for b in range(REPLACE_BATCHES):
        batch = Batch("replace", b)
        for j in range(FILES_PER_BATCH):
            path = f"/durability/replace/f{(b * FILES_PER_BATCH + j) % FILE_POOL:02d}.py"
            prev = latest.get(path)
            version = FileVersion(path, (prev.version + 1) if prev else 1,
                                  f"Module {path} version {(prev.version + 1) if prev else 1}: "
                                  + " ".join(rng.sample(WORDS, 10)),
                                  [make_chunk(rng, path, i, "file") for i in range(CHUNKS_PER_FILE)])
            batch.versions.append(version)
            batch.previous.append(prev)
            latest[path] = version
        replaces.append(batch)
    return creates, replaces


# -- reading memory back ---------------------------------------------------------------------


DIM = 384  # all-MiniLM-L6-v2; checked against memory's stats


async def file_objects(client: Client, path: str) -> dict[str, Any]:
    """Every live chunk and summary filed under ``path``: a filtered search returns them all. It
    searches by a vector, not text, so it never waits for the embedder the writers keep busy."""
    query = {"vector": [1.0] + [0.0] * (DIM - 1), "k": 1000, "level": "both", "filters": {"file_path": path}}
    reply = await client.call("memory", "search", query, timeout=60, idempotent=True)
    chunks = {h["text"]: {"oid": h["oid"], "metadata": h["metadata"], "summary_oid": h.get("summary_oid")}
              for h in reply["hits"] if h["level"] == "chunk"}
    summaries = {h["text"]: {"oid": h["oid"], "child_oids": sorted(h["child_oids"])}
                 for h in reply["hits"] if h["level"] == "summary"}
    assert len(chunks) + len(summaries) == len(reply["hits"]), f"duplicate objects under {path}"
    return {"chunks": chunks, "summaries": summaries}


async def memory_state(client: Client, paths: list[str]) -> dict[str, Any]:
    files = {p: await file_objects(client, p) for p in paths}
    # after the searches: a worker brings its matrix up to date when it searches, and `stats` shows it
    stats = await client.call("memory", "stats", {}, timeout=60, idempotent=True)
    assert stats["vectors"]["dim"] == DIM
    hashes = (await client.call("memory", "file_hashes", {"root": "/durability"}, timeout=60,
                                idempotent=True))["hashes"]
    return {"files": files, "stats": stats, "hashes": hashes}


def holds(objects: dict[str, Any], version: FileVersion | None) -> bool:
    """Whether a file's objects are exactly ``version`` (None: no objects at all)."""
    if version is None:
        return not objects["chunks"] and not objects["summaries"]
    return (set(objects["chunks"]) == {c["source_text"] for c in version.chunks}
            and list(objects["summaries"]) == [version.summary])


async def seen_state(client: Client, batch: Batch) -> str:
    """'all' or 'none' for a batch whose request failed; anything in between fails the test."""
    if batch.kind == "create":
        present = (await file_objects(client, batch.paths[0]))["chunks"]
        texts = {c["source_text"] for c in batch.chunks}
        assert set(present) <= texts
        assert len(present) in (0, len(texts)), f"create batch {batch.number}: {len(present)}/{len(texts)} chunks"
        return "all" if present else "none"
    states = []
    for version, prev in zip(batch.versions, batch.previous, strict=True):
        objects = await file_objects(client, version.path)
        state = "all" if holds(objects, version) else "none" if holds(objects, prev) else "mixed"
        states.append(state)
    assert len(set(states)) == 1 and states[0] != "mixed", f"replace batch {batch.number}: files {states}"
    return states[0]


# -- the ingest under fire ---------------------------------------------------------------------


@dataclass
class Crash:
    creates: list[Batch]
    replaces: list[Batch]
    kills: list[dict[str, Any]]
    seconds: float
    state: dict[str, Any]
    broker_stats: dict[str, int]

    @property
    def paths(self) -> list[str]:
        return sorted({p for b in [*self.creates, *self.replaces] for p in b.paths})


async def wait_memory(client: Client, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            await client.call("memory", "stats", {}, timeout=10, idempotent=True)
            return
        except ServiceError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def send(client: Client, batch: Batch) -> dict[str, Any]:
    if batch.kind == "create":  # a new file's chunks; sent again after its commit, memory finds it unchanged
        body = {"files": [{"file_path": batch.paths[0], "file_hash": f"create-{batch.number}", "chunks": batch.chunks}]}
        done = (await client.call("memory", "replace_files", body, timeout=CALL_TIMEOUT, idempotent=True))["files"][0]
        created = 0 if done["unchanged"] else done["chunks"]
        return {"created": created, "skipped": done["chunks"] - created, "oids": done["oids"]}
    # opted out of proto's retry-safety (the ingestor relies on it): this writer drives the worker_lost path
    return await client.call("memory", "replace_files", {"files": [v.payload() for v in batch.versions]},
                             timeout=CALL_TIMEOUT, idempotent=False)


async def writer(client: Client, batches: list[Batch], replied: asyncio.Event, counter: list[int]) -> None:
    for batch in batches:
        while True:
            try:
                reply = await send(client, batch)
            except ServiceError as e:
                if e.code not in RETRYABLE:
                    raise
                batch.failures.append(f"{e.code}: {e.message}")
                await wait_memory(client)
                batch.seen_after_failure.append(await seen_state(client, batch))
                continue
            batch.replies.append(reply)
            counter[0] += 1
            replied.set()
            break


async def acked_but_missing(client: Client, acked: list[Batch], versions: dict[str, list[FileVersion]]) -> list:
    """Batches answered before a kill that memory no longer holds after the restart. A file of a
    replace batch may hold a later version by now (the writers go on), never an earlier one."""
    missing: list[Any] = []
    for batch in acked:
        if batch.kind == "create":
            present = (await file_objects(client, batch.paths[0]))["chunks"]
            if set(present) != {c["source_text"] for c in batch.chunks}:
                missing.append(("create", batch.number, len(present)))
            continue
        for version in batch.versions:
            objects = await file_objects(client, version.path)
            held = [v.version for v in versions[version.path] if holds(objects, v)]
            if not held or held[0] < version.version:
                missing.append(("replace", batch.number, version.path, version.version, held))
    return missing


async def killer(inst: Installation, client: Client, batches: list[Batch], replied: asyncio.Event,
                 counter: list[int], kills: list[dict[str, Any]]) -> None:
    rng = random.Random(7)
    versions: dict[str, list[FileVersion]] = {}
    for batch in batches:
        for v in batch.versions:
            versions.setdefault(v.path, []).append(v)
    for threshold in KILL_AFTER:
        while counter[0] < threshold:
            replied.clear()
            await replied.wait()
        await asyncio.sleep(rng.uniform(0.05, 0.5))  # somewhere inside the batches now in flight
        old = inst.pid("memory_weaver")
        acked = [b for b in batches if b.replies]
        os.kill(old, signal.SIGKILL)
        t0 = time.monotonic()
        new = await asyncio.to_thread(inst.wait_restarted, "memory_weaver", old)
        await inst.wait_worker(client, "memory", new, timeout=180)
        kills.append({"after_replies": len(acked), "old_pid": old, "new_pid": new,
                      "back_in_s": round(time.monotonic() - t0, 1),
                      "acked_but_missing": await acked_but_missing(client, acked, versions)})


async def crash_ingest(inst: Installation) -> Crash:
    creates, replaces = make_batches()
    kills: list[dict[str, Any]] = []
    counter = [0]
    replied = asyncio.Event()
    t0 = time.monotonic()
    async with inst.client() as client:
        await wait_memory(client)
        await asyncio.gather(writer(client, creates, replied, counter), writer(client, replaces, replied, counter),
                             killer(inst, client, [*creates, *replaces], replied, counter, kills))
        seconds = time.monotonic() - t0
        state = await memory_state(client, sorted({p for b in [*creates, *replaces] for p in b.paths}))
        broker = (await client.call("broker", "workers", timeout=10))["broker"]["stats"]
    return Crash(creates, replaces, kills, seconds, state, broker)


@pytest.fixture(scope="module")
def installation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installation]:
    yield from installation_fixture(tmp_path_factory, "durability", BATOS_VECTOR_SHARD_ROWS=SHARD_ROWS)


@pytest.fixture(scope="module")
def crash(installation: Installation) -> Crash:
    result = asyncio.run(crash_ingest(installation))
    failed = [(b.kind, b.number, b.failures, b.seen_after_failure) for b in [*result.creates, *result.replaces]
              if b.failures]
    print(f"\n{CREATE_BATCHES + REPLACE_BATCHES} batches in {result.seconds:.1f} s; kills: {result.kills}; "
          f"failed requests (then re-sent): {failed}; broker: {result.broker_stats}")
    return result


# -- the checks --------------------------------------------------------------------------------


def test_memory_was_killed_twice_mid_ingest_and_restarted(crash: Crash) -> None:
    assert len(crash.kills) == len(KILL_AFTER)
    for kill in crash.kills:
        assert kill["new_pid"] != kill["old_pid"]
        # right after each restart, before later writes could cover a loss: every answered batch is there
        assert kill["acked_but_missing"] == [], kill
    # each kill struck while batches were still to come, i.e. in the middle of the ingest
    assert crash.kills[-1]["after_replies"] < CREATE_BATCHES + REPLACE_BATCHES
    # and with requests in flight: the broker re-dispatched create_chunks (idempotent) to the
    # restarted worker, and failed replace_files (not idempotent) with worker_lost
    assert crash.broker_stats["redispatched"] >= 1 and crash.broker_stats["worker_lost"] >= 1, crash.broker_stats


def test_every_batch_that_got_a_reply_is_present_in_full(crash: Crash) -> None:
    files = crash.state["files"]
    for batch in crash.creates:
        assert len(batch.replies) == 1
        reply = batch.replies[0]
        # a reply reports the whole batch: created now, or (re-dispatched after a commit) skipped
        assert reply["created"] in (0, CREATE_SIZE) and reply["created"] + reply["skipped"] == CREATE_SIZE, reply
        stored = files[batch.paths[0]]["chunks"]
        assert set(stored) == {c["source_text"] for c in batch.chunks}, f"create batch {batch.number}"
        assert reply["oids"] == [stored[c["source_text"]]["oid"] for c in batch.chunks]
        for c in batch.chunks:  # Table 2 metadata as sent; memory adds embed_windows
            assert {k: v for k, v in stored[c["source_text"]]["metadata"].items() if k != "embed_windows"} \
                == c["metadata"]
    latest: dict[str, FileVersion] = {}
    for batch in crash.replaces:
        assert len(batch.replies) == 1
        for version, result in zip(batch.versions, batch.replies[0]["files"], strict=True):
            assert result["file_path"] == version.path
            assert (result["chunks"], result["summaries"]) == (CHUNKS_PER_FILE, 1), result
            latest[version.path] = version
    for path, version in latest.items():
        assert holds(files[path], version), f"{path} does not hold version {version.version}"
        summary = files[path]["summaries"][version.summary]
        chunk_oids = sorted(c["oid"] for c in files[path]["chunks"].values())
        assert summary["child_oids"] == chunk_oids
        assert {c["summary_oid"] for c in files[path]["chunks"].values()} == {summary["oid"]}
        assert crash.state["hashes"][path] == version.file_hash


def test_a_failed_batch_was_all_or_nothing_and_its_resend_agreed(crash: Crash) -> None:
    for batch in [*crash.creates, *crash.replaces]:
        assert set(batch.seen_after_failure) <= {"all", "none"}  # seen_state asserted it, batch by batch
        if not batch.seen_after_failure:
            continue
        seen = batch.seen_after_failure[-1]  # the state the re-send that got the reply found
        reply = batch.replies[0]
        if batch.kind == "create":
            assert reply["created"] == (0 if seen == "all" else CREATE_SIZE), (batch.number, seen, reply)
        else:
            assert {f["unchanged"] for f in reply["files"]} == {seen == "all"}, (batch.number, seen, reply)
    # replace_files is not idempotent: a SIGKILL that struck one in flight reaches the writer
    assert any(b.failures for b in crash.replaces), "no replace_files request was in flight at a kill"


def test_vectors_agree_with_objects(crash: Crash) -> None:
    stats = crash.state["stats"]
    counts = stats["counts"]
    chunks = CREATE_BATCHES * CREATE_SIZE + FILE_POOL * CHUNKS_PER_FILE
    assert counts["memory_chunk"] == chunks
    assert counts["contextual_summary"] == FILE_POOL
    live = sum(counts.get(k, 0) for k in VECTOR_LEVELS)
    assert stats["vectors"]["live"] == live
    assert stats["index"]["live"] == live  # the restarted worker's in-memory matrix
    assert stats["vectors"]["rows"] == stats["index"]["rows"]
    stored = sum(len(f["chunks"]) for f in crash.state["files"].values())
    assert stored == chunks


async def test_searching_a_chunks_exact_text_finds_it_first(installation: Installation, crash: Crash) -> None:
    await check_exact_search(installation, crash.state, random.Random(3))


async def check_exact_search(inst: Installation, state: dict[str, Any], rng: random.Random) -> None:
    everything = [(text, c["oid"]) for f in state["files"].values() for text, c in f["chunks"].items()]
    async with inst.client() as client:
        for text, oid in rng.sample(everything, SEARCH_SAMPLE):
            hits = (await client.call("memory", "search", {"text": text, "k": 1, "level": "chunks"},
                                      timeout=60, idempotent=True))["hits"]
            assert hits and hits[0]["oid"] == oid and hits[0]["text"] == text, (oid, hits[:1])


def run_zodb_script(inst: Installation, script: str, *opts: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"ZODB.scripts.{script}", *opts, str(inst.var / "live_image.fs")],
                          capture_output=True, text=True, timeout=120, env=inst.env)


async def test_image_is_sound_after_down_and_identical_after_up(installation: Installation, crash: Crash) -> None:
    down = installation.down()
    assert down.returncode == 0, down.stdout + down.stderr
    assert installation.leftovers() == []
    fstest = run_zodb_script(installation, "fstest", "-v")  # -v: a line per transaction, then the verdict
    assert fstest.returncode == 0 and not fstest.stderr.strip(), fstest
    lines = fstest.stdout.strip().splitlines()
    assert lines[-1].strip() == "no errors detected", fstest.stdout[-2000:]
    assert len(lines) - 1 >= CREATE_BATCHES + REPLACE_BATCHES  # it read every batch's transaction
    fsrefs = run_zodb_script(installation, "fsrefs")  # every current object loads; no dangling reference
    assert fsrefs.returncode == 0 and not fsrefs.stdout.strip() and not fsrefs.stderr.strip(), fsrefs

    installation.up()
    async with installation.client() as client:
        await wait_memory(client)
        after = await memory_state(client, crash.paths)
    assert after["files"] == crash.state["files"]
    assert after["hashes"] == crash.state["hashes"]
    assert after["stats"]["counts"] == crash.state["stats"]["counts"]
    assert after["stats"]["vectors"] == crash.state["stats"]["vectors"]
    assert after["stats"]["index"]["live"] == crash.state["stats"]["vectors"]["live"]
    await check_exact_search(installation, after, random.Random(4))
