"""Two real memory_weaver processes behind the broker, one runzeo: agreement, durability, windows."""

from __future__ import annotations

import asyncio
import random

import msgspec
import pytest

from batos.image import Image
from batos.outcome import Outcome
from proto.bodies import memory as M
from tests.unit.test_memory_history_index import fractal, history
from tests.unit.test_memory_weaver import file_payload
from tests.waiting import until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LONG = " ".join(f"def helper_{i}(value): return value * {i} + offset_table[{i}]" for i in range(60))


async def _hits(client, text: str, k: int = 10) -> list[str]:
    reply = await client.call("memory", "search", {"text": text, "k": k}, timeout=60, idempotent=True)
    return [h["oid"] for h in reply["hits"]]


async def test_two_workers_agree_and_survive_restarts(system, client):
    zeo = system.start_zeo()
    system.start_service("memory", BATOS_VECTOR_SHARD_ROWS="16")
    system.start_service("memory", BATOS_VECTOR_SHARD_ROWS="16")
    await system.wait_registered(client, {"memory": 2}, timeout=180)

    payload = file_payload("/src/a.py")
    payload["chunks"][0]["source_text"] = LONG  # beyond 256 word-pieces: windows, not truncation
    r = (await client.call("memory", "replace_files", {"files": [payload]}, timeout=120))["files"][0]
    assert r["chunks"] == 2
    hit = (await client.call("memory", "search", {"text": LONG, "k": 1, "level": "chunks"}))["hits"][0]
    assert hit["oid"] == r["oids"][1] and hit["metadata"]["embed_windows"] > 1

    # whichever worker answers, every search sees the commit (the broker spreads requests)
    answers = await asyncio.gather(*(_hits(client, "helper value offset table") for _ in range(8)))
    assert all(a == answers[0] for a in answers) and r["oids"][1] in answers[0]

    # ZEO restarts: the workers reconnect and the image is intact
    zeo.stop()
    zeo = system.start_zeo()
    async def searched() -> list[str] | None:
        try:
            return await _hits(client, "helper value offset table")
        except Exception:  # the workers are reconnecting
            return None

    after = await until(searched, what="a search after the ZEO restart", timeout=60, poll=0.5)
    assert after == answers[0]

    # a worker killed outright loses nothing: a fresh one cold-loads the same matrix
    victim = next(p for p in system.procs if p.name == "memory" and p.alive())
    victim.kill()

    async def dropped() -> bool:  # past the broker's heartbeat liveness: only the survivor is alive
        table = await client.call("broker", "workers", timeout=5)
        return len([w for w in table["services"].get("memory", []) if w["alive"]]) == 1

    await until(dropped, what="the broker dropping the killed worker", timeout=60)
    system.start_service("memory", BATOS_VECTOR_SHARD_ROWS="16")
    await system.wait_registered(client, {"memory": 2}, timeout=180)
    again = await asyncio.gather(*(_hits(client, "helper value offset table") for _ in range(6)))
    assert all(a == answers[0] for a in again)
    stats = await client.call("memory", "stats", {})
    assert stats["counts"] == {"contextual_summary": 1, "memory_chunk": 2}


HISTORY_CYCLES = 100  # ~500 events: enough for many pages and every kind of filter, quick to embed


async def _all(client, query: M.QueryFractals) -> tuple[list[str], int]:
    """Every event id ``query`` answers and the requests it took (pages)."""
    seen: list[str] = []
    pages = 0
    after = None
    while True:
        reply = await client.request(msgspec.structs.replace(query, after=after), timeout=120)
        pages += 1
        seen += [f.event_id for f in reply.fractals]
        if reply.next is None:
            return seen, pages
        after = reply.next


def _scan(everything: list[M.Fractal], q: M.QueryFractals) -> list[str]:
    """The answer by scanning every fractal client-side (with the outcome the kernel's events give each cycle)."""
    outcome: dict[str, Outcome] = {}
    for f in everything:
        m = f.meta
        cid = m.get("cycle_id") or ""
        outcome[cid] = outcome.get(cid, Outcome()).add((m["timestamp"], f.event_id), m.get("event_type"),
                                                       m.get("psm_state"), m.get("status"))
    out = []
    for f in everything:
        m = f.meta
        if any(getattr(q, k) is not None and m.get(k) != getattr(q, k)
               for k in ("cycle_id", "persona", "status", "mission_type", "event_type")):
            continue
        if q.event_types is not None and m.get("event_type") not in q.event_types:
            continue
        if q.cycle_status is not None and outcome[m.get("cycle_id") or ""].status != q.cycle_status:
            continue
        if (q.since and m["timestamp"] < q.since) or (q.until and m["timestamp"] > q.until):
            continue
        out.append(f.event_id)
    return out


async def test_history_queries_answer_by_index_like_a_scan_across_restarts(system, client):
    """Real ZEO and memory processes: each query equals a scan of the whole history, in one request; after the
    worker restarts; and after an image written before the indexes (they are built at start, once)."""
    system.start_zeo()
    worker = system.start_service("memory")
    await system.wait_registered(client, {"memory": 1}, timeout=180)
    events = history(random.Random(2026), HISTORY_CYCLES)
    for i in range(0, len(events), 500):
        await client.request(M.CreateFractals(events=[msgspec.convert(fractal(e), M.FractalEvent)
                                                      for e in events[i:i + 500]]), timeout=300)
    everything = (await client.request(M.QueryFractals(limit=10_000), timeout=120)).fractals
    assert len(everything) == len(events)
    brick = sorted({e.cycle_id for e in events})[3]
    queries = [M.QueryFractals(cycle_id=brick, limit=10_000),
               M.QueryFractals(persona="BRICK", status="SUCCESS", event_types=["DNU_OUTCOME", "LLM_CALL"],
                               cycle_status="SUCCESS", limit=10_000),  # ALFRED's history audit
               M.QueryFractals(mission_type="ask", since=everything[len(everything) // 3].meta["timestamp"],
                               limit=10_000),
               M.QueryFractals(cycle_status="", event_type="CYCLE_START", limit=10_000)]
    want = [_scan(everything, q) for q in queries]
    assert all(want) and want[1] != want[2]

    async def check() -> None:
        for q, expected in zip(queries, want, strict=True):
            got, pages = await _all(client, q)
            assert got == expected, q
            assert pages == 1  # one query, one answer: no scan, no query per cycle

    await check()

    # an image from before the history indexes: the next start builds them, and the one after finds them
    worker.stop()  # graceful: the broker drops it at once
    image = await Image(system.settings).open()

    def forget(root, conn):
        del root["memory"].history

    await image.transact(forget)
    await image.close()
    for _ in range(2):
        system.start_service("memory")
        await system.wait_registered(client, {"memory": 1}, timeout=180)
        await check()
        assert (await client.request(M.Verify(), timeout=300)).ok
        system.procs[-1].stop()
