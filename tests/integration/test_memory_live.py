"""Two real memory_weaver processes behind the broker, one runzeo: agreement, durability, windows."""

from __future__ import annotations

import asyncio

import pytest

from tests.unit.test_memory_weaver import file_payload

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
    r = await client.call("memory", "replace_file", payload, timeout=120)
    assert r["chunks"] == 2
    hit = (await client.call("memory", "search", {"text": LONG, "k": 1, "level": "chunks"}))["hits"][0]
    assert hit["oid"] == r["oids"][1] and hit["metadata"]["embed_windows"] > 1

    # whichever worker answers, every search sees the commit (the broker spreads requests)
    answers = await asyncio.gather(*(_hits(client, "helper value offset table") for _ in range(8)))
    assert all(a == answers[0] for a in answers) and r["oids"][1] in answers[0]

    # ZEO restarts: the workers reconnect and the image is intact
    zeo.stop()
    zeo = system.start_zeo()
    for _ in range(60):
        try:
            after = await _hits(client, "helper value offset table")
            break
        except Exception:
            await asyncio.sleep(0.5)
    assert after == answers[0]

    # a worker killed outright loses nothing: a fresh one cold-loads the same matrix
    victim = next(p for p in system.procs if p.name == "memory" and p.alive())
    victim.kill()
    await asyncio.sleep(4)  # past the broker's heartbeat liveness, so the dead worker is dropped
    system.start_service("memory", BATOS_VECTOR_SHARD_ROWS="16")
    await system.wait_registered(client, {"memory": 2}, timeout=180)
    again = await asyncio.gather(*(_hits(client, "helper value offset table") for _ in range(6)))
    assert all(a == answers[0] for a in again)
    stats = await client.call("memory", "stats", {})
    assert stats["counts"] == {"contextual_summary": 1, "memory_chunk": 2}
