"""Benchmark the Metacognitive Audit Trail: logging's cost to the event loop, and ingestion throughput.

1. Event-loop lag: a 1 ms ticker measures how late the loop wakes it while a producer writes a burst of
   AuditEvents through AuditLog (and waits for them to reach the disk), beside the same producer loop with
   logging off, in alternating rounds (medians reported: the machine is shared). p50/p99/max lag, the ratio,
   and events/s to disk.
2. Ingestion: a synthetic audit log of --size-mb (default 1024) is generated in a temp dir and read by
   (a) ``json.loads`` per line, (b) a bare ``msgspec.json.decode`` per line, (c) the ingestor's LogReader
   (decode + validate against the generated Struct, offsets, malformed accounting), (d) the whole
   ``ingest_audit_log`` with a memory service that discards fractals (adds summaries and fractal dicts).
   Each runs in a fresh process so its peak RSS is its own; (c) also samples RSS as it goes, to show memory
   stays flat whatever the file size.

    .venv/bin/python bench/audit.py --size-mb 200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec

from batos.audit import AuditEvent, AuditLog, new_id

TICK_S = 0.001
MALFORMED_EVERY = 997  # one garbled line in ~1000, so the malformed path is exercised at scale


# -- 1. event-loop lag -------------------------------------------------------------------------------------------

def _burst_event(i: int, cycle_id: str, prompt: str) -> AuditEvent:
    if i % 4 == 0:
        return AuditEvent.llm_call(cycle_id, "REASONING", persona="BABS", mission_type="ask", prompt=prompt,
                                   response=f"Thought {i}: search the summaries", prompt_tokens=512)
    return AuditEvent.transition(cycle_id, "DECOMPOSING", "REASONING", persona="ALFRED", mission_type="ask", step=i)


class _StepTimer:
    """CPU time of every event-loop step (one callback or task step): what the loop itself spent, free of the
    preemption by other processes that inflates wall-clock lag on a shared machine."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self._orig = asyncio.events.Handle._run

    def __enter__(self) -> _StepTimer:
        orig, steps, clock = self._orig, self.steps, time.thread_time_ns

        def timed(handle: asyncio.events.Handle) -> None:
            t = clock()
            orig(handle)
            steps.append(clock() - t)

        asyncio.events.Handle._run = timed
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.events.Handle._run = self._orig


async def _lag_run(events: int, logging_on: bool, directory: Path) -> dict[str, float]:
    with _StepTimer() as timer:
        result = await _lag_burst(events, logging_on, directory, timer)
    return result


async def _lag_burst(events: int, logging_on: bool, directory: Path, timer: _StepTimer) -> dict[str, float]:
    lags: list[float] = []
    running = True

    async def ticker() -> None:
        while running:
            t = time.perf_counter()
            await asyncio.sleep(TICK_S)
            lags.append(time.perf_counter() - t - TICK_S)

    audit = AuditLog(directory / f"lag-{uuid.uuid4().hex}.jsonl") if logging_on else None
    if audit:
        await audit.open()
    prompt = "[system] You are BABS, the knowledge weaver.\n[user] " + "why is the sky blue? " * 100
    cycle_id = new_id()
    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)
    lags.clear()
    timer.steps.clear()
    started = time.perf_counter()
    for i in range(events):
        event = _burst_event(i, cycle_id, prompt)
        if audit:
            await audit.log(event)
        await asyncio.sleep(0)  # a producer that lets others run, as a cognitive cycle does between steps
    produced = time.perf_counter() - started
    if audit:
        await audit.flush()
    total = time.perf_counter() - started
    running = False
    await tick
    if audit:
        assert audit.stats["written"] == events and audit.stats["failed"] == 0, audit.stats
        await audit.close()
    lags_ms = sorted(x * 1000 for x in lags)
    steps_ms = sorted(x / 1e6 for x in timer.steps)
    return {"p50_ms": statistics.median(lags_ms), "p99_ms": _p99(lags_ms), "max_ms": lags_ms[-1],
            "ticks": len(lags_ms), "step_p99_ms": _p99(steps_ms), "step_max_ms": steps_ms[-1],
            "steps": len(steps_ms), "loop_cpu_s": sum(steps_ms) / 1000, "produce_s": produced, "total_s": total,
            "events_per_s": events / total}


def _p99(sorted_values: list[float]) -> float:
    return sorted_values[int(0.99 * (len(sorted_values) - 1))]


def bench_lag(events: int, directory: Path, rounds: int) -> dict[str, dict[str, float]]:
    """Alternate off/on rounds (a shared machine's noise hits both alike); report each mode's median round."""
    runs: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    for _ in range(rounds):
        runs["off"].append(asyncio.run(_lag_run(events, False, directory)))
        runs["on"].append(asyncio.run(_lag_run(events, True, directory)))
    out = {}
    for mode, results in runs.items():
        median = {k: statistics.median(r[k] for r in results) for k in results[0]}
        median["p99_ms_rounds"] = [round(r["p99_ms"], 3) for r in results]
        out[mode] = median
    return out


# -- 2. ingestion ---------------------------------------------------------------------------------------------

def generate(path: Path, size_mb: int, seed: int = 7) -> tuple[int, int]:
    """A realistic log: cycles of ~8 events, prompts of 0.5-4 KB, a garbled line now and then."""
    rng = random.Random(seed)
    words = ("memory chunk summary persona BRICK method prototype slot transaction oid retrieval cycle answer "
             "token budget synthesis zeo image fractal query morph reasoning observation thought action").split()
    texts = [" ".join(rng.choices(words, k=rng.randint(60, 600))) for _ in range(64)]
    encoder = msgspec.json.Encoder()
    target = size_mb * 1024 * 1024
    lines = malformed = 0
    stamp = time.time()
    with open(path, "wb", buffering=4 * 1024 * 1024) as f:
        size = 0
        while size < target:
            cycle_id = str(uuid.uuid4())
            for step in range(8):
                stamp += 0.01
                ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(stamp)) + f".{int(stamp % 1 * 1e6):06d}Z"
                data: dict = {"from": "REASONING", "to": "SYNTHESIZING"} if step % 2 else {
                    "llm_prompt": rng.choice(texts), "llm_response_raw": rng.choice(texts)[:800], "prompt_tokens": 700}
                if step == 3:
                    ids = [f"{rng.getrandbits(32):x}" for _ in range(8)]
                    data = {"query": "persistence", "retrieved_chunk_ids": ids}
                event = {"event_id": str(uuid.uuid4()), "cycle_id": cycle_id, "timestamp": ts,
                         "psm_state": "REASONING", "active_persona": rng.choice(("ALFRED", "BABS", "BRICK", "ROBIN")),
                         "event_type": ("LLM_CALL", "STATE_TRANSITION", "LLM_CALL", "RETRIEVAL_ACTION")[step % 4]
                         if step != 3 else "RETRIEVAL_ACTION", "event_data": data,
                         "status": "SUCCESS" if step % 2 == 0 else "IN_PROGRESS", "mission_type": "ask"}
                line = encoder.encode(event) + b"\n"
                lines += 1
                if lines % MALFORMED_EVERY == 0:
                    line = line[: len(line) // 2] + b"\n"
                    malformed += 1
                f.write(line)
                size += len(line)
    return lines, malformed


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def phase(name: str, path: Path) -> dict:
    """Run one reader over the file in this (fresh) process; returns counts, time and memory."""
    size = path.stat().st_size
    base_rss = _rss_mb()
    samples: list[float] = []
    started = time.perf_counter()
    lines = bad = 0
    if name == "json.loads":
        with open(path, "rb") as f:
            for line in f:
                try:
                    json.loads(line)
                    lines += 1
                except ValueError:
                    bad += 1
    elif name == "msgspec_bare":
        decode = msgspec.json.decode
        with open(path, "rb") as f:
            for line in f:
                try:
                    decode(line)
                    lines += 1
                except msgspec.DecodeError:
                    bad += 1
    elif name == "reader_validate":
        from services.kernel.audit_ingest import LogReader

        reader = LogReader(path, 0)
        next_sample = size / 4
        while (batch := reader.read_batch(200)).events or batch.malformed:
            lines += len(batch.events)
            bad += len(batch.malformed)
            if batch.end_offset >= next_sample:
                samples.append(round(_rss_mb(), 1))
                next_sample += size / 4
        reader.close()
    elif name == "ingest_null_memory":
        from proto.bodies import memory as M
        from services.kernel.audit_ingest import ingest_audit_log

        async def null_memory(body):  # memory's typed bodies in and out, nothing stored
            if isinstance(body, M.AuditOffset):
                return M.AuditOffsetReply(value=0)
            return M.CreateFractalsReply(created=len(body.events), skipped=0)

        report = asyncio.run(ingest_audit_log(path, null_memory, batch=200))
        lines, bad = report.created, report.malformed
    else:
        raise SystemExit(f"unknown phase {name}")
    seconds = time.perf_counter() - started
    return {"phase": name, "lines": lines, "malformed": bad, "seconds": seconds, "lines_per_s": lines / seconds,
            "mb_per_s": size / 2**20 / seconds, "base_rss_mb": round(base_rss, 1), "peak_rss_mb": round(_peak_mb(), 1),
            "rss_samples_mb": samples}


PHASES = ("json.loads", "msgspec_bare", "reader_validate", "ingest_null_memory")


def bench_ingest(size_mb: int, directory: Path) -> dict:
    path = directory / "metacognition.jsonl"
    started = time.perf_counter()
    lines, malformed = generate(path, size_mb)
    generated = time.perf_counter() - started
    print(f"generated {path.stat().st_size / 2**20:.0f} MB, {lines} lines ({malformed} garbled) in {generated:.1f} s",
          flush=True)
    results = {}
    for name in PHASES:
        out = subprocess.run([sys.executable, __file__, "--phase", name, "--file", str(path)], check=True,
                             capture_output=True, text=True)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[name]
        print(f"  {name:<20} {r['lines_per_s']:>10,.0f} lines/s {r['mb_per_s']:>7.1f} MB/s  "
              f"peak RSS {r['peak_rss_mb']:.0f} MB (at start {r['base_rss_mb']:.0f})  "
              f"malformed {r['malformed']}  {r['rss_samples_mb'] or ''}", flush=True)
        if name != "json.loads":
            assert r["malformed"] == malformed and r["lines"] == lines - malformed, (name, r, lines, malformed)
    return {"size_mb": path.stat().st_size / 2**20, "lines": lines, "malformed": malformed, "phases": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=1024, help="synthetic log size for the ingestion bench")
    parser.add_argument("--events", type=int, default=10_000, help="events in the logging burst")
    parser.add_argument("--rounds", type=int, default=5, help="alternating off/on lag rounds (medians reported)")
    parser.add_argument("--skip-lag", action="store_true")
    parser.add_argument("--skip-ingest", action="store_true")
    parser.add_argument("--tmp", default=None, help="directory for the temp files (default: the system's)")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(phase(args.phase, Path(args.file))))
        return
    summary: dict = {}
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="batos-audit-bench-") as tmp:
        directory = Path(tmp)
        if not args.skip_lag:
            lag = bench_lag(args.events, directory, args.rounds)
            summary["lag"] = lag
            for mode in ("off", "on"):
                r = lag[mode]
                print(f"loop lag, logging {mode:>3} (median of {args.rounds} rounds): p50 {r['p50_ms']:.3f} ms  "
                      f"p99 {r['p99_ms']:.3f} ms  max {r['max_ms']:.2f} ms  ({r['ticks']:.0f} ticks, burst "
                      f"{r['total_s']:.2f} s, {r['events_per_s']:,.0f} events/s)  p99 by round {r['p99_ms_rounds']}",
                      flush=True)
                print(f"    loop steps (CPU time): p99 {r['step_p99_ms']:.3f} ms  max {r['step_max_ms']:.2f} ms  "
                      f"({r['steps']:.0f} steps, {r['loop_cpu_s']:.2f} s CPU on the loop)", flush=True)
            on, off = lag["on"], lag["off"]
            print(f"  ratios on/off: lag p99 {on['p99_ms'] / max(off['p99_ms'], 1e-6):.2f}, "
                  f"step p99 {on['step_p99_ms'] / max(off['step_p99_ms'], 1e-6):.2f}, "
                  f"step max {on['step_max_ms'] / max(off['step_max_ms'], 1e-6):.2f}", flush=True)
        if not args.skip_ingest:
            ingest = bench_ingest(args.size_mb, directory)
            summary["ingest"] = ingest
            p = {k: v["lines_per_s"] for k, v in ingest["phases"].items()}
            print(f"  ratios: reader_validate / msgspec_bare {p['reader_validate'] / p['msgspec_bare']:.2f}, "
                  f"reader_validate / json.loads {p['reader_validate'] / p['json.loads']:.2f}, "
                  f"msgspec_bare / json.loads {p['msgspec_bare'] / p['json.loads']:.2f}, "
                  f"ingest / reader_validate {p['ingest_null_memory'] / p['reader_validate']:.2f}", flush=True)
    print(json.dumps(summary, default=float))


if __name__ == "__main__":
    main()
