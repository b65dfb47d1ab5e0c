"""Issue 14 item 10: does every program's memory stay bounded with use?

Starts the real system in a temp dir (broker, ZEO, memory_weaver, ingestor, forge with the llm service,
kernel, steward: tests/conftest.System, the same processes and modules supervisord runs) and records each
program's RSS, its child processes included, at:

1. start: every service registered with the broker, nothing ingested;
2. after ingesting a tree of ~LINES lines of Python (standard-library packages copied to the temp dir);
3. after each of ASKS `ask`s (the QA benchmark's behavioural questions about json, http, logging and csv,
   which are part of the tree; past the end of the list they repeat with a number, so no two prompts are
   the same).

Prints one row per program: RSS at start, after the ingest, after ask 1, 10, 25 and the last, the growth per
ask over the last half of the asks (least squares, MiB/ask), and the last ask's RSS beside the baseline
(the mean after the first asks) as a ratio. A bounded program shows a slope near 0 and a ratio near 1.

    nice -n 15 .venv/bin/python bench/rss.py [--asks 50] [--minutes M] [--lines 100000] [--json out.json] [--worktree]

The programs run from a snapshot of HEAD (``git archive`` into the temp dir; the bench re-runs itself from
there), so edits in the working tree during a run of tens of minutes cannot break it; ``--worktree`` runs the
working tree as it is instead.

Any BATOS_* variable in the environment (e.g. BATOS_LLM_MODEL) is passed to every service, except the ones
that place the system (var dir, broker, ZEO).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

if TYPE_CHECKING:  # imported when the bench runs (from the snapshot), not by the process that makes it
    from batos.client import Client
    from tests.conftest import System

# Packages first (the QA questions' codebases lead, so the asks find their code), then top-level modules.
PACKAGES = ("json", "http", "logging", "csv", "email", "asyncio", "concurrent", "xml", "importlib", "unittest",
            "urllib", "multiprocessing", "collections", "ctypes", "sqlite3", "tomllib", "wsgiref",
            "zoneinfo", "re", "dbm", "html", "lib2to3", "pydoc_data", "xmlrpc", "curses")
PLACEMENT = ("BATOS_VAR_DIR", "BATOS_BROKER_ENDPOINT", "BATOS_ZEO")
SERVICES = {"memory": 1, "ingest": 1, "llm": 1, "forge": 1, "kernel": 1, "steward": 1}
# bench name -> program name (supervisord.conf)
PROGRAMS = {"zeo": "zeo", "broker": "broker", "memory": "memory_weaver", "ingest": "ingestor",
            "forge": "forge", "kernel": "kernel", "steward": "steward"}
MIB = 2**20
STARTUP_TIMEOUT = 600.0
INGEST_TIMEOUT = 7200.0
ASK_TIMEOUT = 900.0
BASELINE_ASKS = 5  # "the first asks' level": the mean after asks 1..5


# -- the tree ---------------------------------------------------------------------------------------------


def python_lines(path: Path) -> int:
    try:
        return len(path.read_bytes().splitlines())
    except OSError:
        return 0


def units(stdlib: Path) -> list[Path]:
    """What may be copied, in order: the packages above, then every top-level module by name."""
    out = [stdlib / (p if (stdlib / p).is_dir() else f"{p}.py") for p in PACKAGES]
    out += sorted(p for p in stdlib.glob("*.py") if p.stem not in PACKAGES)
    return [p for p in out if p.exists()]


def copy_tree(dest: Path, lines: int) -> tuple[int, int]:
    """Whole packages and modules of the stdlib until ``lines`` lines of Python; returns (files, lines)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = shutil.ignore_patterns("__pycache__", "test", "tests", "idle_test")
    files = total = 0
    for unit in units(stdlib):
        if total >= lines:
            break
        target = dest / unit.name
        if unit.is_dir():
            shutil.copytree(unit, target, ignore=skip)
        else:
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(unit, target)
        copied = [target] if target.is_file() else list(target.rglob("*.py"))
        files += len(copied)
        total += sum(python_lines(p) for p in copied)
    return files, total


# -- RSS --------------------------------------------------------------------------------------------------


def rss_mib(pid: int) -> tuple[float, int]:
    """RSS of the process and all its descendants (MiB), and how many descendants there are."""
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return float("nan"), 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / MIB, len(procs) - 1


def rss_parts(pid: int) -> dict[str, float]:
    """The main process's RSS split as the kernel counts it: anonymous (heap, KV cache), file-backed (mapped
    model weights and libraries, which the kernel can drop and re-read), shared memory; MiB."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "RssFile", "RssShmem", "VmHWM"):
                    out[key] = int(value.split()[0]) / 1024
    except OSError:
        pass
    return out


def sample(pids: dict[str, int]) -> dict[str, float]:
    return {name: rss_mib(pid)[0] for name, pid in pids.items()}


def slope(ys: list[float]) -> float:
    """Least-squares MiB per step of a series sampled once per ask."""
    n = len(ys)
    if n < 2:
        return float("nan")
    mx, my = (n - 1) / 2, sum(ys) / n
    num = sum((x - mx) * (y - my) for x, y in enumerate(ys))
    den = sum((x - mx) ** 2 for x in range(n))
    return num / den


# -- the system -------------------------------------------------------------------------------------------


def passthrough_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("BATOS_") and not k.startswith(PLACEMENT)}


async def start(system: System, src: Path) -> dict[str, int]:
    from batos.client import Client
    from tests.conftest import PY

    env = {**passthrough_env(), "BATOS_AUTOTELIC_PERIOD": "36000",  # no background work beside the bench
           "BATOS_INGEST_ROOTS": str(src)}
    procs = {"broker": system.start_broker(), "zeo": system.start_zeo()}
    for name in ("memory", "ingest", "forge", "kernel"):
        procs[name] = system.start_service(name, **env)
    procs["steward"] = system.spawn("steward", [PY, "-u", "-m", "services.forge.steward_main"], **env)
    async with Client(system.settings, identity="rss-setup") as client:
        await client.wait_for_broker(30)
        await system.wait_registered(client, SERVICES, timeout=STARTUP_TIMEOUT)
    return {name: p.pid for name, p in procs.items()}


def question(i: int) -> str:
    from bench.qa_questions import QUESTIONS

    text = QUESTIONS[i % len(QUESTIONS)].text
    return text if i < len(QUESTIONS) else f"{text} (ask {i + 1})"


async def ask(client: Client, i: int) -> tuple[float, str]:
    started = time.monotonic()
    try:
        reply = await client.call("kernel", "ask", {"question": question(i)}, timeout=ASK_TIMEOUT)
        status = str(reply.get("status") or reply.get("outcome") or "?")
    except Exception as e:  # a failed ask is a result; memory is still measured after it
        status = f"{type(e).__name__}: {getattr(e, 'message', e)}"[:120]
    return time.monotonic() - started, status


# -- the report -------------------------------------------------------------------------------------------


def fmt(v: float, digits: int = 0) -> str:
    return "-" if v != v else f"{v:,.{digits}f}"


def table(start: dict[str, float], ingested: dict[str, float], asks: list[dict[str, float]]) -> list[str]:
    n = len(asks)
    marks = sorted({m for m in (1, 10, 25, n) if m <= n})
    head = ["program", "start", "after ingest", *(f"ask {m}" for m in marks),
            f"MiB/ask (asks {n // 2 + 1}-{n})", f"ask {n} / asks 1-{min(BASELINE_ASKS, n)}"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in start:
        series = [a[name] for a in asks]
        base = series[: BASELINE_ASKS]
        level = sum(base) / len(base) if base else float("nan")
        tail = series[n // 2:] if n >= 4 else series
        cells = [PROGRAMS[name], fmt(start[name]), fmt(ingested[name]), *(fmt(series[m - 1]) for m in marks),
                 fmt(slope(tail), 2), fmt(series[-1] / level if series else float("nan"), 3)]
        rows.append("| " + " | ".join(cells) + " |")
    total = {k: sum(d.values()) for k, d in (("start", start), ("ingest", ingested))}
    tot_series = [sum(a.values()) for a in asks]
    tbase = tot_series[: BASELINE_ASKS]
    rows.append("| **all** | " + " | ".join([
        fmt(total["start"]), fmt(total["ingest"]), *(fmt(tot_series[m - 1]) for m in marks),
        fmt(slope(tot_series[n // 2:] if n >= 4 else tot_series), 2),
        fmt(tot_series[-1] / (sum(tbase) / len(tbase)) if tbase else float("nan"), 3)]) + " |")
    return rows


async def run(args: argparse.Namespace, work: Path) -> int:
    from batos.client import Client
    from tests.conftest import System

    src = work / "src"
    files, lines = copy_tree(src, args.lines)
    print(f"tree: {files} files, {lines:,} lines of Python under {src}", flush=True)
    system = System(work / "install")
    record: dict[str, Any] = {"files": files, "lines": lines, "asks": []}
    try:
        pids = await start(system, src)
        await asyncio.sleep(args.settle)
        record["start"] = start_rss = sample(pids)
        record["parts_start"] = {name: rss_parts(pid) for name, pid in pids.items()}
        print(f"start: { {k: round(v) for k, v in start_rss.items()} }", flush=True)
        async with Client(system.settings, identity="rss-bench") as client:
            t0 = time.monotonic()
            reply = await client.call("kernel", "ingest", {"path": str(src)}, timeout=INGEST_TIMEOUT)
            record["ingest"] = {"files": reply.get("files"), "chunks": reply.get("chunks"),
                                "errors": len(reply.get("errors") or []), "s": round(time.monotonic() - t0)}
            print(f"ingest: {record['ingest']}", flush=True)
            record["after_ingest"] = ingested = sample(pids)
            print(f"after ingest: { {k: round(v) for k, v in ingested.items()} }", flush=True)
            asks: list[dict[str, float]] = []
            deadline = time.monotonic() + args.minutes * 60 if args.minutes else float("inf")
            for i in range(args.asks):
                if time.monotonic() > deadline:
                    print(f"--minutes {args.minutes} spent: stopping after {i} asks", flush=True)
                    break
                seconds, status = await ask(client, i)
                asks.append(sample(pids))
                record["asks"].append({"s": round(seconds, 1), "status": status, "rss": asks[-1]})
                print(f"ask {i + 1}: {seconds:.1f} s {status}; "
                      f"{ {k: round(v) for k, v in asks[-1].items()} } load {os.getloadavg()[0]:.1f}", flush=True)
        children = {name: rss_mib(pid)[1] for name, pid in pids.items()}
        record["parts_end"] = {name: rss_parts(pid) for name, pid in pids.items()}
    finally:
        system.stop_all()
        if args.keep_logs:
            shutil.copytree(system.var / "log", args.keep_logs, dirs_exist_ok=True)

    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1))
    print(f"\nload average at the end: {os.getloadavg()}; child processes at the end: {children}")
    print(f"ingest: {record['ingest']} ({lines:,} lines); asks: {len(asks)}, "
          f"median {sorted(a['s'] for a in record['asks'])[len(asks) // 2]:.1f} s")
    print("RSS in MiB, each program with its child processes:")
    print("\n".join(table(start_rss, ingested, asks)))
    print("\nmain process only, MiB, start -> end: anonymous | file-backed | peak (VmHWM)")
    for name in pids:
        a, b = record["parts_start"].get(name, {}), record["parts_end"].get(name, {})
        print(f"  {PROGRAMS[name]:14} {fmt(a.get('RssAnon', float('nan')))} -> {fmt(b.get('RssAnon', float('nan')))}"
              f" | {fmt(a.get('RssFile', float('nan')))} -> {fmt(b.get('RssFile', float('nan')))}"
              f" | {fmt(b.get('VmHWM', float('nan')))}")
    return 0


def report_from_output(path: Path) -> int:
    """The table from a run's printed lines (a run stopped before its end prints no table)."""
    import ast

    start: dict[str, float] = {}
    ingested: dict[str, float] = {}
    asks: list[dict[str, float]] = []
    for line in path.read_text().splitlines():
        sample_ = line[line.find("{"): line.rfind("}") + 1]
        if line.startswith("start: "):
            start = ast.literal_eval(sample_)
        elif line.startswith("after ingest: "):
            ingested = ast.literal_eval(sample_)
        elif line.startswith("ask ") and "{" in line:
            asks.append(ast.literal_eval(sample_))
    print(f"{len(asks)} asks in {path} (figures rounded to 1 MiB as printed)")
    print("\n".join(table(start, ingested, asks)))
    return 0


def from_snapshot(tmp: Path) -> int:
    """Run this bench again from a snapshot of HEAD (its own python, its own tests/conftest.py)."""
    tree = tmp / "head"
    tree.mkdir()
    archive = subprocess.run(["git", "archive", "--format=tar", "HEAD"], cwd=REPO, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    print(f"running from a snapshot of HEAD {head.strip()}", flush=True)
    argv = [sys.executable, str(tree / "bench" / "rss.py"), *sys.argv[1:], "--worktree"]
    return subprocess.run(argv, cwd=tree).returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--asks", type=int, default=50, help="how many asks after the ingest")
    parser.add_argument("--lines", type=int, default=100_000, help="lines of stdlib Python to ingest")
    parser.add_argument("--minutes", type=float, default=0,
                        help="stop asking once the asks have run this long (0: no limit); the report covers those done")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds idle before the start figure")
    parser.add_argument("--json", help="write every sample here")
    parser.add_argument("--keep-logs", help="copy the programs' logs here at the end")
    parser.add_argument("--worktree", action="store_true", help="run the working tree, not a snapshot of HEAD")
    parser.add_argument("--report", help="print the table from a run's saved output instead of running")
    args = parser.parse_args()
    if args.report:
        return report_from_output(Path(args.report))
    with tempfile.TemporaryDirectory(prefix="batos-bench-rss-") as tmp:
        if not args.worktree:
            return from_snapshot(Path(tmp))
        return asyncio.run(run(args, Path(tmp)))


if __name__ == "__main__":
    raise SystemExit(main())
