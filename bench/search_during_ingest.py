"""Issue 14 item 6: search stays fast while an ingest runs.

A real system (broker, ZEO, memory_weaver, ingestor, kernel) in a temp dir. The kernel's `search`
is timed as a console would see it:

1. idle: after a small seed ingest (so search has something to find), SEARCHES sequential searches;
2. during ingest: a large ingest (standard-library packages copied to a temp dir) runs in the
   background while the same searches run back to back until it ends.

3. ingest alone: the same packages again, with ``self`` spelled ``this`` (text not embedded yet), and no
   searches: the ingest's own rate.

Prints p50 / p99 / max for both phases, the ratio during / idle (target: p99 within 2x of idle),
timeouts, and the ingest's chunks/s with and without searches. The baseline is the idle phase of the same
run. ``--niceness 0,10`` runs the whole thing once per ``BATOS_EMBED_BULK_NICENESS`` (how much nicer memory's
ingest embedding runs than its queries), each on a fresh system, and prints them side by side.

    .venv/bin/python bench/search_during_ingest.py [--searches 30] [--packages email,http,...] [--niceness 0,10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from batos.client import Client  # noqa: E402
from tests.conftest import System  # noqa: E402

SEED = ["json"]
LARGE = ["email", "http", "logging", "asyncio", "concurrent", "xml", "importlib", "unittest"]
QUERIES = [
    "how is a JSON string decoded", "parse an email header", "retry a failed connection",
    "format a log record", "schedule a callback on the event loop", "parse XML attributes",
    "load a module from a path", "compare two test results", "escape special characters",
    "where are timeouts handled",
]
SEARCH_TIMEOUT = 120.0
INGEST_TIMEOUT = 3600.0


def copy_packages(dest: Path, names: list[str], *, renamed: bool = False) -> None:
    """Copy stdlib modules/packages; ``renamed`` spells ``self`` as ``this`` in every file, so the copy has the
    same size and shape but text memory has not embedded yet (it reuses vectors of text it has seen)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (stdlib / f"{name}.py").is_file():  # a module, not a package
            shutil.copyfile(stdlib / f"{name}.py", dest / f"{name}.py")
        else:
            shutil.copytree(stdlib / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "test", "tests"))
    if renamed:
        for path in dest.rglob("*.py"):
            path.write_text(path.read_text(encoding="utf-8").replace("self", "this"), encoding="utf-8")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def describe(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0, "p50": float("nan"), "p99": float("nan"), "max": float("nan")}
    return {"n": len(values), "p50": statistics.median(values), "p99": percentile(values, 0.99), "max": max(values)}


def query(i: int) -> str:
    """The i-th query: the same ten questions, each made distinct so no cache answers it."""
    return f"{QUERIES[i % len(QUERIES)]} (query {i})"


async def timed_search(client: Client, text: str) -> float | None:
    started = time.perf_counter()
    try:
        await client.call("kernel", "search", {"text": text, "k": 5}, timeout=SEARCH_TIMEOUT)
    except Exception as e:  # a timeout or error is what this benchmark counts
        print(f"  search failed: {type(e).__name__}: {e}", flush=True)
        return None
    return (time.perf_counter() - started) * 1000


async def ingest(client: Client, path: Path) -> dict[str, Any]:
    started = time.monotonic()
    reply = await client.call("kernel", "ingest", {"path": str(path)}, timeout=INGEST_TIMEOUT)
    return {"chunks": reply.get("chunks"), "files": reply.get("files"), "s": time.monotonic() - started}


async def run(args: argparse.Namespace, work: Path, niceness: int) -> dict[str, Any]:
    src = work / "src"
    copy_packages(src / "seed", SEED)
    copy_packages(src / "large", args.packages.split(","))
    copy_packages(src / "alone", args.packages.split(","), renamed=True)
    system = System(work / "install")
    try:
        system.start_broker()
        system.start_zeo()
        env = {"BATOS_AUTOTELIC_PERIOD": "36000", "BATOS_INGEST_ROOTS": str(src),
               "BATOS_EMBED_BULK_NICENESS": str(niceness)}
        for name in ("memory", "ingest", "kernel"):
            system.start_service(name, **env)
        async with Client(system.settings, identity="bench-search") as client:
            await client.wait_for_broker(30)
            await system.wait_registered(client, {"memory": 1, "ingest": 1, "kernel": 1}, timeout=180)
            seed = await ingest(client, src / "seed")
            print(f"seed ingest: {seed}", flush=True)
            for i in range(3):  # warm the query path (first search loads lazily)
                await timed_search(client, query(10_000 + i))

            idle: list[float] = []
            failures_idle = 0
            for i in range(args.searches):
                ms = await timed_search(client, query(i))
                failures_idle += ms is None
                if ms is not None:
                    idle.append(ms)

            async with Client(system.settings, identity="bench-ingest") as ingest_client:
                big = asyncio.create_task(ingest(ingest_client, src / "large"))
                during: list[float] = []
                failures_during = 0
                i = args.searches
                while not big.done():
                    ms = await timed_search(client, query(i))
                    i += 1
                    if big.done():
                        break  # only searches that overlapped the ingest count
                    failures_during += ms is None
                    if ms is not None:
                        during.append(ms)
                    await asyncio.sleep(args.gap)
                large = await big
                alone = await ingest(ingest_client, src / "alone")
    finally:
        system.stop_all()
    return {"niceness": niceness, "idle": describe(idle), "during": describe(during), "failed_idle": failures_idle,
            "failed_during": failures_during, "large": large, "alone": alone, "load": os.getloadavg()}


def rate(ingest: dict[str, Any]) -> float:
    return float(ingest["chunks"] or 0) / ingest["s"]


def report(results: list[dict[str, Any]]) -> None:
    print("\n| bulk niceness | idle p50 | idle p99 | during p50 | during p99 | max | failed | p99 during/idle | "
          "ingest chunks/s with searches | alone | load (1 min) at end |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        a, b = r["idle"], r["during"]
        ratio = b["p99"] / a["p99"] if a["n"] and b["n"] else float("nan")
        print(f"| {r['niceness']} | {a['p50']:.0f} | {a['p99']:.0f} | {b['p50']:.0f} | {b['p99']:.0f} | {b['max']:.0f} "
              f"| {r['failed_idle'] + r['failed_during']} | **{ratio:.2f}x** | {rate(r['large']):.1f} "
              f"| {rate(r['alone']):.1f} | {r['load'][0]:.1f} |")
    first = results[0]
    print(f"({first['during']['n']} searches during, {first['idle']['n']} idle; {first['large']['chunks']} chunks per "
          "ingest; target: p99 during <= 2x idle)")
    alone: dict[int, list[float]] = {}
    for r in results:
        alone.setdefault(r["niceness"], []).append(rate(r["alone"]))
    if len(alone) == 2:  # the ingest's own rate, niced over not (mean of each value's runs)
        (low, a), (high, b) = sorted(alone.items())
        print(f"ingest alone, niceness {high} / {low}: {statistics.mean(b) / statistics.mean(a):.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--searches", type=int, default=30, help="idle searches (the baseline)")
    parser.add_argument("--packages", default=",".join(LARGE), help="stdlib packages the large ingest reads")
    parser.add_argument("--gap", type=float, default=0.5, help="seconds between searches during the ingest")
    parser.add_argument("--niceness", default="10", help="comma-separated BATOS_EMBED_BULK_NICENESS values to compare")
    args = parser.parse_args()
    results = []
    for niceness in (int(n) for n in args.niceness.split(",")):
        with tempfile.TemporaryDirectory(prefix="batos-bench-search-") as tmp:
            results.append(asyncio.run(run(args, Path(tmp), niceness)))
    report(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
