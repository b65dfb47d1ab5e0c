"""ALFRED's history audit and a cycle's trace over 10,000 audit events: memory's history index against the scan
it replaces (issue 15 item 4), both against a real `runzeo` server, in one run.

- new: ``query_fractals`` answered from ``root["memory"].history`` (services/memory_weaver/history_index.py);
  the audit is ONE query (services/forge/history_audit.count_new_successes), the trace one query by cycle.
- old: the code before the index, kept here verbatim: a query walked ``fractals_by_time`` loading every fractal
  to test its meta (the cycle query walked ``fractals_by_cycle`` and sorted by loading each); the audit asked one
  query per persona and golden event type, then one per candidate cycle to learn how it ended. The old indexes
  are built in the same image (``root["bench_old"]``) from the same fractals.

Each is timed cold (a fresh client: an empty object cache, as after a restart) and warm (median of repeats);
both must give the same answer. Last, `trace` of a cycle the kernel wrote after the last ingestion (``--pending``
log lines): now memory's indexed events plus the log's tail, before the whole pending log ingested first.
Embedding is a seeded random embedder (it is not what changed; the real one makes "before" slower still).

    .venv/bin/python bench/history_query.py [--events 11000] [--pending 1000] [--threshold 5] [--repeats 5]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from BTrees.OOBTree import OOBTree, OOTreeSet

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from batos.audit import AuditEvent, normalized_timestamp  # noqa: E402
from batos.image import Image  # noqa: E402
from batos.outcome import Outcome  # noqa: E402
from bench.memory import start_zeo  # noqa: E402  (a real runzeo on a unix socket)
from proto import contract  # noqa: E402
from proto.bodies.memory import AuditOffset  # noqa: E402
from services.forge import history_audit  # noqa: E402
from services.forge.curation import GOLDEN_EVENT_TYPES, SUCCESS, parse_event  # noqa: E402
from services.kernel import history  # noqa: E402
from services.kernel.audit_ingest import cycle_events_after, ingest_audit_log  # noqa: E402
from services.memory_weaver import handlers, store  # noqa: E402
from services.memory_weaver.weaver import MemoryWeaver  # noqa: E402
from tests.unit.audit_fractals import fractal  # noqa: E402  (the kernel's fractal_of on the logged line)

DIM = 384
PERSONAS = ("ALFRED", "BABS", "BRICK", "ROBIN")
T0 = datetime(2026, 12, 1, tzinfo=UTC)


class RandomEmbedder:
    dim = DIM

    def embed(self, texts: list[str], cancelled: Any = None) -> tuple[np.ndarray, list[int]]:
        out = np.stack([np.random.default_rng(int(hashlib.md5(t.encode()).hexdigest()[:8], 16)).standard_normal(DIM)
                        for t in texts]).astype(np.float32) if texts else np.zeros((0, DIM), np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True) if len(out) else out, [1] * len(texts)


def events(n: int, rng: random.Random) -> list[AuditEvent]:
    """``n`` events in cycles of five, as the kernel logs a `send` whose method BRICK wrote: start, transition,
    LLM call, DNU outcome, and COMPLETE (4 in 5) or FAILED, spread over five days."""
    out: list[AuditEvent] = []
    for c in range(n // 5):
        cid = f"00000000-0000-4000-8000-{c:012d}"
        persona = rng.choice(PERSONAS)
        ok = rng.random() < 0.8
        t = T0 + timedelta(seconds=c * 200)
        evs = [AuditEvent.cycle_start(cid, persona="ALFRED", mission_type="_jit_compile_method_", input="m(2)"),
               AuditEvent.transition(cid, "IDLE", "SYNTHESIZING", persona=persona, mission_type="_jit_compile_method_"),
               AuditEvent.llm_call(cid, "SYNTHESIZING", persona=persona, prompt=f"[user] write m{c}",
                                   response=f"def m{c}(self, x):\n    return x\n", mission_type="_jit_compile_method_"),
               AuditEvent.dnu_outcome(cid, "VALIDATING", persona=persona, receiver_oid="1a", selector=f"m{c}",
                                      status="SUCCESS" if ok else "FAILURE", source=f"def m{c}(self, x): ...",
                                      mission_type="_jit_compile_method_", llm_prompt=f"write m{c}"),
               AuditEvent.transition(cid, "VALIDATING", "COMPLETE" if ok else "FAILED", persona="ALFRED",
                                     status="SUCCESS" if ok else "FAILURE", mission_type="_jit_compile_method_")]
        out += [e.model_copy(update={"timestamp": t + timedelta(seconds=i)}) for i, e in enumerate(evs)]
    return out


# -- the old code, verbatim but for taking its two indexes as arguments --------------------------------------


def build_old_indexes(root: Any, conn: Any) -> int:
    mem = store.memory(root)
    by_time, by_cycle = OOBTree(), OOTreeSet()
    for f in mem.fractals_by_event.values():
        meta = f.get_slot("meta") or {}
        by_time[(meta.get("timestamp") or "", f.get_slot("event_id"))] = f
        if meta.get("cycle_id"):
            by_cycle.insert((meta["cycle_id"], store.oid_int(f)))
    root["bench_old"] = {"by_time": by_time, "by_cycle": by_cycle}
    return len(by_time)


def old_fractals_matching(root: Any, q: dict[str, Any]) -> Iterable[dict[str, Any]]:
    mem = store.memory(root)
    old = root["bench_old"]
    if q.get("cycle_id") is not None:
        found = store.members(old["by_cycle"], q["cycle_id"])
        objs: Iterable[Any] = sorted((mem.objects[o] for o in found if o in mem.objects),
                                     key=lambda f: ((f.get_slot("meta") or {}).get("timestamp") or "",
                                                    f.get_slot("event_id")))
    else:
        lo = (q["since"],) if q.get("since") else None
        objs = old["by_time"].values(min=lo, max=None)
    wanted = {k: q[k] for k in ("mission_type", "persona", "status", "event_type") if q.get(k)}
    for f in objs:
        meta = f.get_slot("meta") or {}
        ts = meta.get("timestamp") or ""
        if q.get("since") and ts < q["since"]:
            continue
        if any(meta.get(k) != v for k, v in wanted.items()):
            continue
        yield {"oid": format(store.oid_int(f), "x"), "summary": f.get_slot("summary"),
               "full_json": store.read_blob(f.get_slot("full_content_blob")).decode("utf-8"), "meta": dict(meta),
               "event_id": f.get_slot("event_id")}


async def old_audit(query: Any, since: dict[str, str], threshold: int) -> dict[str, int]:
    """count_new_successes before the index: a query per persona and golden type, then one per cycle."""
    sem = asyncio.Semaphore(8)

    async def succeeded(cycle_id: str) -> bool:
        async with sem:
            reply = await query({"cycle_id": cycle_id, "limit": 1000})
        return Outcome.of(parse_event(f) for f in reply).status == SUCCESS

    fractals: list[dict[str, Any]] = []
    for persona in PERSONAS:
        for event_type in GOLDEN_EVENT_TYPES:
            body: dict[str, Any] = {"persona": persona, "status": SUCCESS, "event_type": event_type, "limit": 10_000}
            if since.get(persona):
                body["since"] = since[persona]
            fractals += await query(body)
    candidates = history_audit.golden_candidates(fractals, since)
    counts: dict[str, int] = {}
    for persona in PERSONAS:
        counts[persona] = 0
        cycles = candidates.get(persona, [])
        for start in range(0, len(cycles), threshold):
            ok = await asyncio.gather(*(succeeded(c) for c in cycles[start:start + threshold]))
            counts[persona] += sum(ok)
            if counts[persona] >= threshold:
                counts[persona] = threshold
                break
    return counts


# -- running ---------------------------------------------------------------------------------------------------


class Session:
    """A fresh client (cold object cache) with both ways in, counting the requests each makes."""

    def __init__(self, settings: Any):
        self.image = Image(settings)
        self.weaver = MemoryWeaver(self.image, RandomEmbedder(), settings.vector_shard_rows)
        self.requests = 0

    async def __aenter__(self) -> Session:
        await self.image.open()
        await self.weaver.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.weaver.close()
        await self.image.close()

    async def call(self, service: str, command: str, body: dict[str, Any]) -> dict[str, Any]:
        """The worker boundary (decode, handler, encode), as a broker request would reach it."""
        assert service == "memory"
        self.requests += 1
        s = contract.spec("memory", command)
        assert s is not None
        req = SimpleNamespace(ctx=SimpleNamespace(state={"weaver": self.weaver}, settings=self.image.settings),
                              cancelled=threading.Event())
        handler = handlers.HANDLERS[command]
        return contract.encode_reply(s, await handler(req, contract.decode_request(s, body)))  # type: ignore[arg-type]

    async def old_query(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        self.requests += 1
        limit = body.get("limit", 100)
        return await self.image.read(lambda root, conn: list(_take(old_fractals_matching(root, body), limit)))


def _take(items: Iterable[Any], n: int) -> Iterable[Any]:
    for i, item in enumerate(items):
        if i >= n:
            return
        yield item


async def timed(settings: Any, run: Any, repeats: int) -> tuple[float, float, int, Any]:
    """(cold seconds, warm median seconds, requests per run, result)."""
    async with Session(settings) as s:
        t0 = time.perf_counter()
        result = await run(s)
        cold = time.perf_counter() - t0
        requests = s.requests
        warm = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            again = await run(s)
            warm.append(time.perf_counter() - t0)
            assert again == result
    return cold, statistics.median(warm), requests, result


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=11_000, help="events in all: the pending ones, then stored")
    ap.add_argument("--threshold", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--pending", type=int, default=1000, help="log lines the kernel wrote since the last ingestion")
    args = ap.parse_args()
    rng = random.Random(15)
    evs = events(args.events, rng)
    with tempfile.TemporaryDirectory() as tmp:
        settings, zeo = start_zeo(Path(tmp))
        try:
            stored, pending = evs[:len(evs) - args.pending], evs[len(evs) - args.pending:]
            async with Session(settings) as s:
                t0 = time.perf_counter()
                for i in range(0, len(stored), 1000):
                    batch = [fractal(e, f"{e.event_type} by {e.active_persona} in {e.cycle_id[-6:]}")
                             for e in stored[i:i + 1000]]
                    await s.call("memory", "create_fractals", {"events": batch})
                write_s = time.perf_counter() - t0
                assert await s.image.transact(build_old_indexes) == len(stored)
            # BRICK was forged two days in: its count starts there; the others count from the beginning
            since = {"BRICK": normalized_timestamp(T0 + timedelta(days=2))}
            cycle = stored[len(stored) // 2].cycle_id

            async def new_audit(s: Session) -> dict[str, int]:
                return await history_audit.count_new_successes(s.call, since, args.threshold, PERSONAS)

            async def old_audit_run(s: Session) -> dict[str, int]:
                return await old_audit(s.old_query, since, args.threshold)

            async def new_trace(s: Session) -> list[str]:
                return [e.event_id for e in await history.trace_cycle(history_audit.memory_of(s.call), cycle)]

            async def old_trace(s: Session) -> list[str]:  # the same boundary and parsing as the kernel's
                found = await s.old_query({"cycle_id": cycle, "limit": 10_000})
                return [AuditEvent.model_validate_json(f["full_json"]).event_id for f in found]

            rows = []
            for name, new, old in (("history audit", new_audit, old_audit_run), ("trace", new_trace, old_trace)):
                n = await timed(settings, new, args.repeats)
                o = await timed(settings, old, args.repeats)
                assert n[3] == o[3], (name, n[3], o[3])
                rows.append((name, n, o))
            log = Path(tmp) / "metacognition.jsonl"
            log.write_text("".join(e.to_line() + "\n" for e in pending))
            late = pending[len(pending) // 2].cycle_id  # a cycle the kernel wrote after the last ingestion
            async with Session(settings) as s:
                memory = history_audit.memory_of(s.call)
                t0 = time.perf_counter()  # now: memory's events of the cycle, and its lines in the log's tail
                offset = (await memory(AuditOffset(path=str(log)))).value
                known = await history.trace_cycle(memory, late)
                tail = await asyncio.to_thread(cycle_events_after, log, offset, late)
                now_ids = sorted({e.event_id for e in [*known, *tail]})
                now_s = time.perf_counter() - t0
                t0 = time.perf_counter()  # before: ingest the whole pending log, then query
                await ingest_audit_log(log, memory)
                before_ids = sorted(e.event_id for e in await history.trace_cycle(memory, late))
                before_s = time.perf_counter() - t0
                assert now_ids == before_ids and len(now_ids) == 5
        finally:
            zeo.terminate()
            zeo.wait(10)
    print(f"{len(stored)} events written in {write_s:.1f} s ({len(stored) / write_s:.0f}/s, random embeddings)")
    print(f"{'':14} {'index cold':>11} {'scan cold':>10} {'ratio':>6}   {'index warm':>11} {'scan warm':>10} "
          f"{'ratio':>6}   requests (index / scan)")
    for name, (nc, nw, nr, _), (oc, ow, orq, _) in rows:
        print(f"{name:14} {nc * 1000:9.1f}ms {oc * 1000:8.1f}ms {oc / nc:5.1f}x   {nw * 1000:9.1f}ms "
              f"{ow * 1000:8.1f}ms {ow / nw:5.1f}x   {nr} / {orq}")
    print("audit counts (both):", json.dumps(rows[0][1][3]))
    print(f"trace of a cycle with {len(pending)} log lines not yet ingested: {now_s * 1000:.1f} ms reading the log's "
          f"tail, {before_s * 1000:.1f} ms ingesting them first ({before_s / now_s:.0f}x; random embeddings, so the "
          "real embedder only widens it)")


if __name__ == "__main__":
    asyncio.run(main())
