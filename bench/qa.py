"""QA benchmark: does `ask` cite and name the code that answers a behavioural question about code nobody here wrote?

Codebases: copies of CPython stdlib packages (bench/qa_questions.py: json, http, logging, csv), ingested into a
real live system started in a temp dir (broker, ZEO, memory, ingest, forge/llm, kernel: tests/conftest.System).
Each question has gold definition(s) by qualified name; their lines come from the AST of the copied file at run
time. Per question:
  cited     a citation overlaps a gold definition's lines
  first     the first citation overlaps one
  named     the model's own prose names the gold (its last name; a dunder method: its class), sources apart;
            ``named_body``: the answer body names it, an extractive answer's listing of signatures included
  status    SUCCESS / SUCCESS_DEGRADED / error; ``ungrounded``: SUCCESS whose citations miss every gold
  seconds   client-side time of the whole `ask`
Baselines measured in the same run:
  search    memory `search` alone with the question (chunks, k=5): gold in the top 5 (and top 1)
  base      the cycle as committed at --base-commit (default eed4484, before issue 12), from `git archive` of
            that commit in a temp dir, run the same way on its own live system (--no-base to skip it)

    .venv/bin/python bench/qa.py [--limit N] [--codebase json --codebase csv] [--no-base] [--json out.json]
    .venv/bin/python bench/qa.py --readme      # ingest this repository, ask the README's first question

Any BATOS_* variable in the environment (e.g. BATOS_LLM_BACKEND, BATOS_LLM_MODEL, BATOS_ANSWER_MAX_TOKENS) is
passed to every service of both systems, except the ones that place the system (var dir, broker, ZEO).
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from batos.client import Client  # noqa: E402
from bench import qa_profile  # noqa: E402
from bench.qa_questions import CODEBASES, QUESTIONS, Question  # noqa: E402
from tests import conftest  # noqa: E402

BASE_COMMIT = "eed4484"
SERVICES = {"kernel": 1, "memory": 1, "ingest": 1, "llm": 1}
PLACEMENT = ("BATOS_VAR_DIR", "BATOS_BROKER_ENDPOINT", "BATOS_ZEO")  # prefixes never passed through
TARGETS = {"cited": 0.80, "named": 0.60, "first": 0.50, "median_s": 20.0}
INGEST_TIMEOUT = 1800.0
STARTUP_TIMEOUT = 600.0


# -- gold lines from the AST ------------------------------------------------------------------------------


def definitions(path: Path) -> dict[str, tuple[int, int]]:
    """Qualified name -> (first line incl. decorators, last line) of every def/class in a file."""
    out: dict[str, tuple[int, int]] = {}

    def walk(node: ast.AST, scope: list[str]) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = ".".join([*scope, child.name])
                start = min([child.lineno, *(d.lineno for d in child.decorator_list)])
                out.setdefault(name, (start, child.end_lineno or child.lineno))
                walk(child, [*scope, child.name])
            else:
                walk(child, scope)

    walk(ast.parse(path.read_text()), [])
    return out


@dataclass
class Gold:
    rel: str  # path relative to the codebase copy root, e.g. json/decoder.py
    qualname: str
    start: int
    end: int

    @property
    def name(self) -> str:
        """What an answer must say to name it: the last name, or a dunder method's class."""
        parts = self.qualname.split(".")
        return parts[-2] if parts[-1].startswith("__") and len(parts) > 1 else parts[-1]

    def hit(self, file_path: str, start: Any, end: Any) -> bool:
        if not str(file_path).replace(os.sep, "/").endswith("/" + self.rel) or start is None or end is None:
            return False
        return int(start) <= self.end and int(end) >= self.start


def resolve_gold(src: Path, question: Question) -> list[Gold]:
    golds = []
    for spec in question.gold:
        rel, qualname = spec.split(":", 1)
        defs = definitions(src / rel)
        if qualname not in defs:
            raise SystemExit(f"gold {spec!r} not found in {src / rel} (Python {sys.version.split()[0]})")
        golds.append(Gold(rel, qualname, *defs[qualname]))
    return golds


def copy_codebases(dest: Path, names: list[str]) -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in names:
        for rel in CODEBASES[name]:
            target = dest / name / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(stdlib / rel, target)


# -- a live system from a given source tree ---------------------------------------------------------------


class TreeProc(conftest.Proc):
    """conftest.Proc run from another source tree (cwd decides what `python -m` imports)."""

    cwd: Path = REPO

    def start(self) -> TreeProc:
        out = self.log.open("ab")
        self.popen = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdout=out, stderr=subprocess.STDOUT,
                                      preexec_fn=conftest._die_with_parent)
        out.close()
        return self


@dataclass
class TreeSystem(conftest.System):
    tree: Path = REPO
    passthrough: dict[str, str] = field(default_factory=dict)

    def env(self, **extra: str) -> dict[str, str]:
        env = super().env(**{**self.passthrough, **extra})
        env["PYTHONPATH"] = str(self.tree)
        return env

    def spawn(self, name: str, argv: list[str], **env: str) -> conftest.Proc:
        self.var.joinpath("log").mkdir(parents=True, exist_ok=True)
        proc = TreeProc(name, argv, self.env(**env), self.var / "log" / f"{name}.log")
        proc.cwd = self.tree
        proc.start()
        self.procs.append(proc)
        return proc


def passthrough_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("BATOS_") and not k.startswith(PLACEMENT)}


def export_commit(commit: str, dest: Path) -> Path:
    """The repository at ``commit`` as plain files (no worktree: nothing in .git changes)."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", "--format=tar", commit], cwd=REPO, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


async def start(system: TreeSystem) -> None:
    system.start_broker()
    system.start_zeo()
    for name in ("memory", "ingest", "forge", "kernel"):
        # the codebases are copied under the temp dir; --readme ingests this repository
        system.start_service(name, BATOS_AUTOTELIC_PERIOD="36000",  # no background work beside the bench
                             BATOS_INGEST_ROOTS=os.pathsep.join([tempfile.gettempdir(), str(REPO)]))
    async with Client(system.settings, identity="qa-setup") as client:
        await client.wait_for_broker(30)
        await system.wait_registered(client, SERVICES, timeout=STARTUP_TIMEOUT)


async def ingest(system: TreeSystem, src: Path, names: list[str]) -> dict[str, Any]:
    out = {}
    async with Client(system.settings, identity="qa-ingest") as client:
        for name in names:
            started = time.monotonic()
            reply = await client.call("kernel", "ingest", {"path": str(src / name)}, timeout=INGEST_TIMEOUT)
            out[name] = {"files": reply.get("files"), "chunks": reply.get("chunks"),
                         "errors": len(reply.get("errors") or []), "s": round(time.monotonic() - started, 1)}
    return out


# -- one question -----------------------------------------------------------------------------------------

_SECTION = re.compile(r"^\s*(Sources?:|Also retrieved|Evidence|Retrieved|\[[CS]\d+\]\s+\S+:\d+)", re.I | re.M)


def prose(reply: dict[str, Any]) -> str:
    """The answer's own words: the model's text if the reply carries it, else the answer up to its source list."""
    text = reply.get("model_text")
    if not isinstance(text, str):
        text = str(reply.get("answer") or "")
        m = _SECTION.search(text)
        text = text[: m.start()] if m else text
    return text


def body(reply: dict[str, Any]) -> str:
    """The answer as the Architect reads it, its Sources list apart (an extractive answer's listing included)."""
    return str(reply.get("answer") or "").split("\nSources:")[0]


def named(text: str, golds: list[Gold]) -> bool:
    return any(re.search(rf"(?<![\w]){re.escape(g.name)}(?![\w])", text) for g in golds)


async def ask(client: Client, question: str, timeout: float,
              trace: list[tuple[float, dict[str, Any]]] | None = None) -> tuple[dict[str, Any], float, str]:
    """``trace``: if given, every event of the ask is appended with its client-side time since the start."""
    started = time.monotonic()

    def seen(event: dict[str, Any]) -> None:
        if trace is not None:
            trace.append((time.monotonic() - started, event))

    try:
        reply = await client.call("kernel", "ask", {"question": question}, timeout=timeout, on_event=seen)
        return reply, time.monotonic() - started, ""
    except Exception as e:  # a failed cycle is a result, not the end of the benchmark
        return {}, time.monotonic() - started, f"{type(e).__name__}: {getattr(e, 'message', e)}"


def score_ask(reply: dict[str, Any], golds: list[Gold], seconds: float, error: str) -> dict[str, Any]:
    cites = reply.get("citations") or []
    hits = [any(g.hit(c.get("file_path", ""), c.get("start_line"), c.get("end_line")) for g in golds) for c in cites]
    status = reply.get("status") or ("error" if error else "?")
    row = {"status": status, "cited": any(hits), "first": bool(hits and hits[0]),
           "named": named(prose(reply), golds), "named_body": named(body(reply), golds),
           "seconds": round(seconds, 1), "n_cited": len(cites),
           "error": error, "steps": reply.get("steps"), "llm_calls": (reply.get("timing") or {}).get("llm_calls")}
    row["ungrounded"] = status == "SUCCESS" and not row["cited"]
    return row


async def search_top(client: Client, question: str, golds: list[Gold], k: int = 5) -> dict[str, Any]:
    reply = await client.call("memory", "search", {"text": question, "k": k, "level": "chunks"}, timeout=120)
    hits = [any(g.hit((h.get("metadata") or {}).get("file_path", ""), (h.get("metadata") or {}).get("start_line"),
                      (h.get("metadata") or {}).get("end_line")) for g in golds) for h in reply.get("hits", [])]
    return {"top5": any(hits), "top1": bool(hits and hits[0])}


async def run_questions(system: TreeSystem, questions: list[tuple[Question, list[Gold]]], label: str,
                        timeout: float, with_search: bool, verbose: bool,
                        profile: bool = False) -> list[dict[str, Any]]:
    rows = []
    async with Client(system.settings, identity=f"qa-{label}") as client:
        for i, (qn, golds) in enumerate(questions, 1):
            row: dict[str, Any] = {"i": i, "codebase": qn.codebase, "question": qn.text,
                                   "gold": [f"{g.rel}:{g.qualname}:{g.start}-{g.end}" for g in golds]}
            if with_search:
                row["search"] = await search_top(client, qn.text, golds)
            trace: list[tuple[float, dict[str, Any]]] = []
            offset = qa_profile.log_size(system.var / "log" / "forge.log")
            pids = {p.name: p.popen.pid for p in system.procs if p.popen is not None}
            cpu = qa_profile.cpu_seconds(pids)
            reply, seconds, error = await ask(client, qn.text, timeout, trace)
            cpu = qa_profile.cpu_used(cpu, qa_profile.cpu_seconds(pids))
            row.update(score_ask(reply, golds, seconds, error))
            row["profile"] = qa_profile.profile(trace, reply, seconds, system.var, offset, cpu)
            row["answer"] = str(reply.get("answer") or "")[:1500]
            row["citations"] = [c.get("where") for c in reply.get("citations") or []]
            rows.append(row)
            if verbose:
                print(f"[{label} {i}/{len(questions)}] {row['status']:<16} cited={row['cited']!s:<5} "
                      f"first={row['first']!s:<5} named={row['named']!s:<5} {row['seconds']:>6.1f}s  {qn.text}"
                      + (f"  ERROR {row['error'][:200]}" if row["error"] else ""), flush=True)
                if profile:
                    print(qa_profile.describe(row["profile"]), flush=True)
    return rows


# -- the table ----------------------------------------------------------------------------------------------


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    if not rows:
        return {"n": 0}
    n = len(rows)
    secs = [r["seconds"] for r in rows if not r["error"]]
    cpus = [sum(r["profile"]["cpu_s"].values()) for r in rows if not r["error"] and r.get("profile")]
    return {"n": len(rows), "cited": sum(r["cited"] for r in rows) / n, "first": sum(r["first"] for r in rows) / n,
            "named": sum(r["named"] for r in rows) / n,
            "named_body": sum(r.get("named_body", r["named"]) for r in rows) / n,
            "success": sum(r["status"] == "SUCCESS" for r in rows) / n,
            "degraded": sum(r["status"] == "SUCCESS_DEGRADED" for r in rows) / n,
            "errors": sum(bool(r["error"]) for r in rows),
            "ungrounded_success": sum(r["ungrounded"] for r in rows),
            "median_s": statistics.median(secs) if secs else float("nan"),
            # CPU seconds of all the system's processes during the ask: comparable across machine loads
            "median_cpu_s": statistics.median(cpus) if cpus else None,
            "search_top5": sum(r["search"]["top5"] for r in rows if "search" in r) / n if "search" in rows[0] else None,
            "search_top1": sum(r["search"]["top1"] for r in rows if "search" in r) / n if "search" in rows[0] else None}


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"x{a / b:.2f}"


def table(now: dict[str, Any], base: dict[str, Any] | None, commit: str = BASE_COMMIT) -> str:
    def f(v: Any) -> str:
        return "-" if v is None else (f"{v:.1f}" if isinstance(v, float) and v > 1.5 else
                                      f"{v:.0%}" if isinstance(v, float) else str(v))

    lines = [f"| metric | search top-5 | cycle at {commit} | cycle now | now/base | target |",
             "|---|---|---|---|---|---|"]
    b = base or {}
    lines.append(f"| gold cited | {f(now['search_top5'])} | {f(b.get('cited'))} | {f(now['cited'])} | "
                 f"{ratio(now['cited'], b.get('cited'))} | >= {TARGETS['cited']:.0%} |")
    lines.append(f"| first citation gold | {f(now['search_top1'])} (top-1) | {f(b.get('first'))} | "
                 f"{f(now['first'])} | {ratio(now['first'], b.get('first'))} | >= {TARGETS['first']:.0%} |")
    lines.append(f"| gold named in the model's prose | - | {f(b.get('named'))} | {f(now['named'])} | "
                 f"{ratio(now['named'], b.get('named'))} | >= {TARGETS['named']:.0%} |")
    lines.append(f"| gold named in the answer body (extractive listing included) | - | {f(b.get('named_body'))} | "
                 f"{f(now['named_body'])} | {ratio(now['named_body'], b.get('named_body'))} | - |")
    lines.append(f"| SUCCESS | - | {f(b.get('success'))} | {f(now['success'])} | - | - |")
    lines.append(f"| SUCCESS_DEGRADED | - | {f(b.get('degraded'))} | {f(now['degraded'])} | - | - |")
    lines.append(f"| SUCCESS citing no gold | - | {f(b.get('ungrounded_success'))} | "
                 f"{f(now['ungrounded_success'])} | - | 0 |")
    lines.append(f"| errors | - | {f(b.get('errors'))} | {f(now['errors'])} | - | 0 |")
    lines.append(f"| median ask seconds | - | {f(b.get('median_s'))} | {f(now['median_s'])} | "
                 f"{ratio(now['median_s'], b.get('median_s'))} | <= {TARGETS['median_s']:.0f} |")
    if now.get("median_cpu_s") is not None:
        lines.append(f"| median ask CPU-seconds (all processes) | - | {f(b.get('median_cpu_s'))} | "
                     f"{f(now['median_cpu_s'])} | {ratio(now['median_cpu_s'], b.get('median_cpu_s'))} | - |")
    return "\n".join(lines)


def per_codebase(rows: list[dict[str, Any]]) -> str:
    out = ["| codebase | n | search top-5 | cited | first | named | median s |", "|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["codebase"] for r in rows):
        s = summary([r for r in rows if r["codebase"] == name])
        out.append(f"| {name} | {s['n']} | {s['search_top5']:.0%} | {s['cited']:.0%} | {s['first']:.0%} | "
                   f"{s['named']:.0%} | {s['median_s']:.1f} |")
    return "\n".join(out)


# -- main -----------------------------------------------------------------------------------------------------


async def bench(label: str, tree: Path, work: Path, src: Path, names: list[str],
                questions: list[tuple[Question, list[Gold]]], a: argparse.Namespace, with_search: bool) -> dict:
    system = TreeSystem(work / label, tree=tree, passthrough=passthrough_env())
    try:
        started = time.monotonic()
        await start(system)
        up_s = time.monotonic() - started
        ingested = await ingest(system, src, names)
        print(f"[{label}] up in {up_s:.0f} s; ingested {json.dumps(ingested)}", flush=True)
        rows = await run_questions(system, questions, label, a.timeout, with_search, not a.quiet, a.profile)
        return {"rows": rows, "summary": summary(rows), "ingest": ingested, "up_s": round(up_s, 1)}
    finally:
        system.stop_all()


README_QUESTION = "how does the broker handle a dead worker?"


async def readme_check(work: Path, question: str) -> int:
    """Ingest this repository and ask the README's first question; print the reply as the console would."""
    system = TreeSystem(work / "readme", tree=REPO, passthrough=passthrough_env())
    try:
        await start(system)
        async with Client(system.settings, identity="qa-readme") as client:
            started = time.monotonic()
            report = await client.call("kernel", "ingest", {"path": str(REPO)}, timeout=INGEST_TIMEOUT)
            print(f"ingest .: {report.get('files')} files, {report.get('chunks')} chunks in "
                  f"{time.monotonic() - started:.0f} s", flush=True)
            reply, seconds, error = await ask(client, question, 900.0)
        print(f"ask {question}\n({seconds:.1f} s, {reply.get('status') or error})\n{reply.get('answer', '')}")
        for name in ("citations", "also_retrieved"):
            print(f"{name}: " + ", ".join(f"[{c.get('label')}] {c.get('where')} {c.get('node_name', '')}"
                                          for c in reply.get(name) or []))
        print(json.dumps({k: reply.get(k) for k in ("reason", "notes", "stop", "steps", "thoughts", "timing")},
                         default=str))
        return 0 if reply else 1
    finally:
        system.stop_all()


async def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--codebase", action="append", choices=sorted(CODEBASES), help="repeatable; default: all")
    p.add_argument("--limit", type=int, default=0, help="at most N questions (spread over the codebases)")
    p.add_argument("--no-base", action="store_true", help=f"skip the baseline cycle at {BASE_COMMIT}")
    p.add_argument("--base-commit", default=BASE_COMMIT)
    p.add_argument("--base-limit", type=int, default=0,
                   help="the baseline cycle on the first N questions only (it takes minutes a question)")
    p.add_argument("--timeout", type=float, default=900.0, help="per ask, seconds")
    p.add_argument("--json", type=Path, help="write every row and the summaries here")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--profile", action="store_true", help="print where each ask's seconds went (bench/qa_profile.py)")
    p.add_argument("--readme", nargs="?", const=README_QUESTION, metavar="QUESTION",
                   help="instead: ingest this repository and ask the README's question (or QUESTION)")
    a = p.parse_args(argv)
    if a.readme:
        work = Path(tempfile.mkdtemp(prefix="batos-qa-"))
        try:
            return await readme_check(work, a.readme)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    names = a.codebase or list(CODEBASES)
    chosen = [qn for qn in QUESTIONS if qn.codebase in names]
    if a.limit:  # round-robin over the codebases so a subset still covers each
        by_cb = {n: [qn for qn in chosen if qn.codebase == n] for n in names}
        chosen = [qn for i in range(max(map(len, by_cb.values()))) for n in names if i < len(by_cb[n])
                  for qn in [by_cb[n][i]]][: a.limit]
    work = Path(tempfile.mkdtemp(prefix="batos-qa-"))
    src = work / "src"
    copy_codebases(src, names)
    questions = [(qn, resolve_gold(src / qn.codebase, qn)) for qn in chosen]
    print(f"{len(questions)} questions over {', '.join(names)}; work dir {work}; "
          f"passthrough {sorted(passthrough_env())}", flush=True)
    out: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "questions": len(questions), "codebases": names}
    try:
        out["now"] = await bench("now", REPO, work, src, names, questions, a, with_search=True)
        if not a.no_base:
            base_tree = export_commit(a.base_commit, work / "base-tree")
            subset = questions[: a.base_limit] if a.base_limit else questions
            out["base"] = await bench("base", base_tree, work, src, names, subset, a, with_search=False)
            if len(subset) < len(questions):  # the same questions on both sides of the table
                out["now_on_base_subset"] = summary(out["now"]["rows"][: len(subset)])
    finally:
        if a.json:
            a.json.write_text(json.dumps(out, indent=1, default=str))
    print()
    subset = "now_on_base_subset" in out  # the baseline ran on fewer questions: compared apart, below
    print(table(out["now"]["summary"], None if subset else out.get("base", {}).get("summary"), a.base_commit))
    if subset:
        print(f"\nthe baseline cycle ran on the first {out['base']['summary']['n']} questions; on those:")
        print(table(out["now_on_base_subset"], out["base"]["summary"], a.base_commit))
    print()
    print(per_codebase(out["now"]["rows"]))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))

