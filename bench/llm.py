"""LLM serving overhead and ReAct action validity, each beside its baseline measured in the same run.

1. In process: tokens/s and time to first token of ``LocalBackend.generate`` (chat template, streamer,
   incremental detokenization, stop/cancel checks) vs a bare ``model.generate`` on the same model
   object and prompt. Runs alternate, medians are reported, the ratio is backend / bare.
2. Through the service: the same request sent with ``batos.client.Client`` to the llm service (a broker
   and a forge worker spawned in a temp dir, or an already running system with ``--service connect``)
   vs the bare loop; client-side TTFT (request sent -> first token event) and decode tokens/s (first
   token event -> reply); the worker's peak RSS (VmHWM).
3. Action validity over a fixed set of ReAct prompts: bare generation + tolerant parser vs the
   structured helper (xgrammar-constrained JSON + re-ask).

    .venv/bin/python bench/llm.py [--tokens 64] [--reps 3] [--service spawn|connect|skip] [--actions 10]

tokens/s is the decode rate: (tokens - 1) / (last token - first token), for every column alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from batos import config, personas  # noqa: E402
from services.forge.backends import make_backend  # noqa: E402
from services.forge.backends.base import GenerationParams  # noqa: E402
from services.forge.backends.local import LocalBackend  # noqa: E402
from services.forge.structured import DEFAULT_ACTIONS, action_schema, run_action  # noqa: E402

PERSONA = "ROBIN"
PROMPT = "Explain in detail how a persistent object database keeps data safe when a program crashes."

# ReAct steps as the kernel sends them: the question, sometimes with an observation from memory.
ACTION_PROMPTS = [
    "Question: How does the broker route a request to a worker?",
    "Question: Where is the token budget enforced when the final prompt is assembled?",
    "Question: What happens when a method is missing on a UvmObject?",
    "Question: How are LoRA adapters activated for a persona?",
    "Question: Which file defines the audit event schema?\n"
    "Observation: summaries found: [3f2a] batos/audit.py: AuditEvent pydantic model, AuditLog writer; "
    "[3f2b] services/kernel/psm.py: state machine.",
    "Question: How does ingestion split a Python file into chunks?\n"
    "Observation: summaries found: [51c0] services/ingestor/chunker.py: AST split-then-merge chunking.",
    "Question: What does the steward do after training a new adapter?",
    "Question: How are vectors searched in memory?\n"
    "Observation: chunks found: [77aa] services/memory_weaver/vectors.py lines 10-40: numpy top-k over shards.",
    "Question: Why does the kernel abort a transaction in the REASONING state?",
    "Question: What is the heartbeat interval between the broker and a worker, and why?",
]


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def decode_rate(tokens: int, first: float, last: float) -> float:
    return (tokens - 1) / (last - first) if tokens > 1 and last > first else float("nan")


# -- 1. in process ---------------------------------------------------------------------------------


class TimingStreamer:
    """The least a streamer can do: note when each generated token arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt = True

    def put(self, value: Any) -> None:
        if self._prompt:
            self._prompt = False
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def bare_generate(backend: LocalBackend, input_ids: Any, tokens: int) -> dict[str, float]:
    model = backend.model
    streamer = TimingStreamer()
    cpu = time.process_time()
    start = time.perf_counter()
    out = model.generate(
        input_ids=input_ids,
        attention_mask=input_ids.new_ones(input_ids.shape),
        max_new_tokens=tokens,
        do_sample=False,
        pad_token_id=backend.tokenizer.pad_token_id,
        streamer=streamer,
    )
    n = int(out.shape[1] - input_ids.shape[1])
    return {
        "prompt_tokens": int(input_ids.shape[1]),
        "tokens": n,
        "ttft_s": streamer.times[0] - start,
        "tps": decode_rate(n, streamer.times[0], streamer.times[-1]),
        "cpu_ms": (time.process_time() - cpu) * 1000 / n,
    }


def backend_generate(backend: LocalBackend, messages: list[dict[str, str]], tokens: int) -> dict[str, float]:
    cpu = time.process_time()
    result = backend.generate(PERSONA, messages, GenerationParams(max_tokens=tokens), on_token=lambda _t: None)
    cpu_ms = (time.process_time() - cpu) * 1000 / result.completion_tokens
    return {"prompt_tokens": result.prompt_tokens, "tokens": result.completion_tokens, "ttft_s": result.ttft_s,
            "tps": result.tokens_per_s, "cpu_ms": cpu_ms}  # fmt: skip


def in_process(backend: LocalBackend, messages: list[dict[str, str]], tokens: int, reps: int) -> dict[str, Any]:
    input_ids = backend.encode_chat(messages)
    bare_generate(backend, input_ids, 4)  # warm-up (first-call allocations)
    runs: dict[str, list[dict[str, float]]] = {"bare": [], "backend": []}
    for i in range(reps):  # alternate which goes first, so drift in machine load hits both alike
        pair = [("bare", lambda: bare_generate(backend, input_ids, tokens)),
                ("backend", lambda: backend_generate(backend, messages, tokens))]  # fmt: skip
        for name, run in pair[:: 1 if i % 2 == 0 else -1]:
            runs[name].append(run())
    return summarize(runs, "bare", "backend")


def summarize(runs: dict[str, list[dict[str, float]]], base: str, other: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    prompts = {r["prompt_tokens"] for rs in runs.values() for r in rs}
    if len(prompts) != 1:  # a comparison is only fair on the same prompt
        raise RuntimeError(f"prompt lengths differ between runs: {sorted(prompts)}")
    for name, rs in runs.items():
        out[name] = {
            "prompt_tokens": rs[0]["prompt_tokens"],
            "tokens": rs[0]["tokens"],
            "ttft_s": median([r["ttft_s"] for r in rs]),
            "tokens_per_s": median([r["tps"] for r in rs]),
            "cpu_ms_per_token": median([r["cpu_ms"] for r in rs]),
        }
    out["ratio_tokens_per_s"] = out[other]["tokens_per_s"] / out[base]["tokens_per_s"]
    # CPU per token is what a busy machine cannot distort much: the ratio says how much work we add
    out["ratio_cpu_efficiency"] = out[base]["cpu_ms_per_token"] / out[other]["cpu_ms_per_token"]
    out["extra_ttft_ms"] = (out[other]["ttft_s"] - out[base]["ttft_s"]) * 1000
    return out


# -- 2. through the service ------------------------------------------------------------------------------


class SpawnedSystem:
    """A broker and a forge worker in a temp var dir (like tests/conftest.py)."""

    def __init__(self) -> None:
        self.var = Path(tempfile.mkdtemp(prefix="batos-bench-llm-"))
        self.procs: list[subprocess.Popen] = []

    def start(self) -> str:
        env = {**os.environ, "PYTHONPATH": str(REPO), "BATOS_VAR_DIR": str(self.var), "BATOS_LOG_LEVEL": "WARNING",
               "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
        endpoint_file = self.var / "broker.endpoint"
        self.procs.append(subprocess.Popen([sys.executable, "-m", "broker"], cwd=REPO,
                                           env={**env, "BATOS_BROKER_ENDPOINT": "tcp://127.0.0.1:*"}))  # fmt: skip
        deadline = time.monotonic() + 30
        while not endpoint_file.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("broker did not start")
            time.sleep(0.05)
        endpoint = endpoint_file.read_text().strip()
        self.worker = subprocess.Popen([sys.executable, "-m", "services.forge"], cwd=REPO,
                                       env={**env, "BATOS_BROKER_ENDPOINT": endpoint})  # fmt: skip
        self.procs.append(self.worker)
        return endpoint

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(self.var, ignore_errors=True)


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def process_cpu_s(pid: int) -> float:
    """utime + stime of a process, all threads (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


USER_MESSAGES = [{"role": "user", "content": PROMPT}]  # the service adds the persona's system prompt itself


async def service_generate(client: Any, tokens: int, pid: int) -> dict[str, float]:
    first: list[float] = []

    def on_event(body: dict[str, Any]) -> None:
        if body.get("event") == "token" and not first:
            first.append(time.perf_counter())

    cpu = process_cpu_s(pid)
    start = time.perf_counter()
    reply = await client.call("llm", "generate", {"persona": PERSONA, "messages": USER_MESSAGES, "max_tokens": tokens},
                              on_event=on_event, timeout=600)  # fmt: skip
    end = time.perf_counter()
    n = reply["completion_tokens"]
    return {"prompt_tokens": reply["prompt_tokens"], "tokens": n, "ttft_s": first[0] - start,
            "tps": decode_rate(n, first[0], end),
            "cpu_ms": (process_cpu_s(pid) - cpu) * 1000 / n,
            "service_ttft_s": reply["ttft_s"], "service_tps": reply["tokens_per_s"]}  # fmt: skip


async def wait_for_llm(client: Any, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = await client.call("llm", "status", {}, timeout=5)
            if status.get("llm", {}).get("ready"):
                return status
        except Exception:
            pass
        await asyncio.sleep(0.5)
    raise TimeoutError("llm service not ready")


async def through_service(
    backend: LocalBackend, messages: list[dict[str, str]], tokens: int, reps: int, mode: str
) -> dict[str, Any]:
    from batos.client import Client

    spawned = SpawnedSystem() if mode == "spawn" else None
    settings = config.load(broker_endpoint=spawned.start()) if spawned else config.load()
    try:
        async with Client(settings) as client:
            await client.wait_for_broker(30)
            status = await wait_for_llm(client)
            pid = spawned.worker.pid if spawned else int(status["pid"])  # connect: the worker must be local
            input_ids = backend.encode_chat(messages)
            await service_generate(client, 4, pid)  # warm-up
            runs: dict[str, list[dict[str, float]]] = {"bare": [], "service": []}
            for i in range(reps):
                if i % 2:
                    runs["service"].append(await service_generate(client, tokens, pid))
                runs["bare"].append(bare_generate(backend, input_ids, tokens))
                if not i % 2:
                    runs["service"].append(await service_generate(client, tokens, pid))
            out = summarize(runs, "bare", "service")
            out["service"]["reported_ttft_s"] = median([r["service_ttft_s"] for r in runs["service"]])
            out["service"]["reported_tokens_per_s"] = median([r["service_tps"] for r in runs["service"]])
            out["worker_peak_rss_mb"] = peak_rss_mb(pid)
            return out
    finally:
        if spawned:
            spawned.stop()


# -- 3. action validity ----------------------------------------------------------------------------------


def strict_json_valid(text: str) -> bool:
    """The whole reply is one JSON object with every field of the action schema."""
    try:
        obj = json.loads(text)
    except ValueError:
        return False
    schema = action_schema(list(DEFAULT_ACTIONS))
    return isinstance(obj, dict) and set(schema["required"]) <= set(obj) and obj.get("action") in DEFAULT_ACTIONS


def action_validity(backend: LocalBackend, n: int, max_tokens: int) -> dict[str, Any]:
    modes = {"bare": {"constrained": False, "reask": False}, "structured": {"constrained": True, "reask": True}}
    out: dict[str, Any] = {}
    for name, flags in modes.items():
        valid = strict = attempts = 0
        seconds: list[float] = []
        examples: list[str] = []
        for prompt in ACTION_PROMPTS[:n]:
            messages = personas.with_system_prompt("BABS", [{"role": "user", "content": prompt}])
            started = time.perf_counter()
            result = run_action(backend, "BABS", messages, max_tokens=max_tokens, **flags)
            seconds.append(time.perf_counter() - started)
            valid += result["valid"]
            strict += strict_json_valid(result["raw"])
            attempts += result["attempts"]
            if len(examples) < 2:
                examples.append(result["raw"][:160])
        out[name] = {"valid": valid, "strict_json": strict, "of": n, "mean_attempts": attempts / n,
                     "median_s": median(seconds), "examples": examples}  # fmt: skip
    return out


# -- main -------------------------------------------------------------------------------------------------


def report(results: dict[str, Any]) -> None:
    def row(label: str, r: dict[str, Any]) -> str:
        return (f"  {label:<10} {r['tokens']:>6} {r['ttft_s'] * 1000:>9.1f} {r['tokens_per_s']:>9.2f}"
                f" {r['cpu_ms_per_token']:>12.1f}")  # fmt: skip

    print(f"model {results['model']}  load {results['load_s']:.2f} s  loadavg {results['loadavg']}")
    for section in ("in_process", "service"):
        s = results.get(section)
        if not s:
            continue
        other = "backend" if section == "in_process" else "service"
        print(f"\n{section}:\n  {'':<10} {'tokens':>6} {'ttft ms':>9} {'tok/s':>9} {'cpu ms/tok':>12}")
        print(row("bare", s["bare"]))
        print(row(other, s[other]))
        print(f"  ratio tok/s {other}/bare = {s['ratio_tokens_per_s']:.3f}   extra TTFT {s['extra_ttft_ms']:.1f} ms"
              f"   cpu efficiency bare/{other} = {s['ratio_cpu_efficiency']:.3f}")  # fmt: skip
        if section == "service" and s.get("worker_peak_rss_mb"):
            print(f"  forge worker peak RSS {s['worker_peak_rss_mb']:.0f} MB")
    if results.get("actions"):
        print("\nReAct action validity (BABS):")
        for name, r in results["actions"].items():
            print(f"  {name:<10} valid {r['valid']}/{r['of']}  strict JSON {r['strict_json']}/{r['of']}  "
                  f"attempts {r['mean_attempts']:.2f}  median {r['median_s']:.1f} s")  # fmt: skip
    print(f"\nbench process peak RSS {results['bench_peak_rss_mb']:.0f} MB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--service", choices=["spawn", "connect", "skip"], default="spawn")
    parser.add_argument("--actions", type=int, default=len(ACTION_PROMPTS), help="prompts for validity (0: skip)")
    parser.add_argument("--action-max-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, help="torch threads here and in a spawned worker (default: torch's)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the spawned worker

    started = time.monotonic()
    backend = make_backend(config.load(llm_backend="embedded"))
    assert isinstance(backend, LocalBackend)
    results: dict[str, Any] = {"model": backend.model_name, "load_s": time.monotonic() - started,
                               "loadavg": [round(x, 2) for x in os.getloadavg()], "threads": args.threads}  # fmt: skip
    messages = personas.with_system_prompt(PERSONA, [{"role": "user", "content": PROMPT}])
    results["in_process"] = in_process(backend, messages, args.tokens, args.reps)
    if args.service != "skip":
        results["service"] = asyncio.run(through_service(backend, messages, args.tokens, args.reps, args.service))
    if args.actions:
        results["actions"] = action_validity(backend, min(args.actions, len(ACTION_PROMPTS)), args.action_max_tokens)
    results["bench_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
