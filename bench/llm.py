"""LLM runtimes and models, each figure beside its baseline measured in the same run.

1. Runtime table, per model and runtime (each in its own process, so load time and peak RSS are its
   own): load time; a ~1,200-token prompt on a cold cache (prompt tokens/s, TTFT); generation tokens/s;
   the TTFT of a second chat turn that extends the first (KV-cache prefix reuse; llama.cpp only). Rows:
   transformers fp32 (the models with a transformers form: SmolLM2) and the GGUF runtime (llama.cpp).
   The ratio column is GGUF generation tokens/s over transformers' best row (its best thread count) on the
   same model; threads 0 is the GGUF backend's auto choice (services/forge/spare_cores.py).
2. Service over bare, GGUF backend: the same request through the llm service (broker + forge worker
   spawned in a temp dir, ``batos.client.Client``, tokens streamed as events) vs a bare
   ``llama_cpp.Llama`` loop in this process on the same model, prompt and thread count; runs alternate,
   medians; ratio = service / bare decode tokens/s (target >= 0.9) and the TTFT difference.
3. ReAct action validity per model (the structured helper: grammar-constrained JSON + one re-ask).

    .venv/bin/python bench/llm.py [--models smollm2-135m,qwen2.5-coder-0.5b] [--tokens 64] [--reps 3]
                                  [--threads 1,2] [--service-model smollm2-135m] [--actions 5]

tokens/s: generation = (tokens - 1) / (last token - first token); prompt = prompt tokens / TTFT (cold).
Per CPU-second columns (this process's CPU time) are what a loaded machine distorts least.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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
from services.forge.spare_cores import bound_openmp_spinning  # noqa: E402

bound_openmp_spinning()  # before llama_cpp loads, as the service does

from batos import config, models, personas  # noqa: E402
from services.forge.backends import make_backend  # noqa: E402
from services.forge.backends.base import GenerationParams  # noqa: E402
from services.forge.structured import run_action  # noqa: E402

PERSONA = "ROBIN"
PROMPT_TOKENS = 1200
QUESTION = "Which function in the excerpts above cuts generated text at a stop string, and how does it work?"
FOLLOW_UP = "And which class decodes token ids into text as they arrive?"
CONTEXT_FILES = ["services/forge/streaming.py", "services/forge/structured.py", "services/forge/generation.py"]
ACTION_PROMPTS = [
    "Question: How does the broker route a request to a worker?",
    "Question: Where is the token budget enforced when the final prompt is assembled?",
    "Question: What happens when a method is missing on a UvmObject?",
    "Question: How does ingestion split a Python file into chunks?\n"
    "Observation: summaries found: [51c0] services/ingestor/chunker.py: AST split-then-merge chunking.",
    "Question: What is the heartbeat interval between the broker and a worker, and why?",
]


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def decode_rate(tokens: int, first: float, last: float) -> float:
    return (tokens - 1) / (last - first) if tokens > 1 and last > first else float("nan")


def peak_rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def long_chat(count_tokens: Any, target: int = PROMPT_TOKENS) -> list[dict[str, str]]:
    """A retrieval-shaped question: line-numbered source excerpts cut to ~target prompt tokens."""
    lines: list[str] = []
    for rel in CONTEXT_FILES:
        for n, line in enumerate((REPO / rel).read_text().splitlines(), 1):
            lines.append(f"{rel}:{n}: {line}")
    lo, hi = 1, len(lines)
    while lo < hi:  # the most lines that fit
        mid = (lo + hi + 1) // 2
        if count_tokens("\n".join(lines[:mid])) + 80 <= target:
            lo = mid
        else:
            hi = mid - 1
    user = "Excerpts:\n" + "\n".join(lines[:lo]) + f"\n\nQuestion: {QUESTION}"
    return personas.with_system_prompt(PERSONA, [{"role": "user", "content": user}])


# -- 1. one model on one runtime, in a child process -----------------------------------------------------


def measure_one(model: str, runtime: str, tokens: int, threads: int, actions: int) -> dict[str, Any]:
    started = time.monotonic()  # the thread count reaches both runtimes as llm_threads (0: auto)
    backend = make_backend(config.load(llm_model=model, llm_runtime="transformers" if runtime == "transformers"
                                       else "llamacpp", llm_threads=threads))  # fmt: skip
    load_s = time.monotonic() - started
    messages = long_chat(backend.count_tokens)
    params = GenerationParams(max_tokens=tokens)
    # warm-up on a short prompt (first-call allocations), then a cold cache for the long one
    backend.generate(PERSONA, personas.with_system_prompt(PERSONA, [{"role": "user", "content": "hi"}]),
                     GenerationParams(max_tokens=2))  # fmt: skip
    if runtime == "gguf":
        backend._llm.reset()
    # cold prompt: one token, so the time is the prefill (what a first turn pays)
    cpu = time.process_time()
    cold = backend.generate(PERSONA, messages, GenerationParams(max_tokens=1))
    prompt_cpu = time.process_time() - cpu
    # generation: llama.cpp finds the prompt cached; transformers prefills again (its CPU is subtracted)
    cpu = time.process_time()
    first = backend.generate(PERSONA, messages, params)
    gen_cpu = time.process_time() - cpu - (prompt_cpu if runtime == "transformers" else 0.0)
    out = {"model": model, "runtime": runtime, "threads": threads, "load_s": load_s,
           "prompt_tokens": cold.prompt_tokens, "tokens": first.completion_tokens, "ttft_s": cold.ttft_s,
           "prompt_tps": cold.prompt_tokens / cold.ttft_s, "gen_tps": first.tokens_per_s,
           "prompt_per_cpu_s": cold.prompt_tokens / prompt_cpu, "gen_per_cpu_s": first.completion_tokens / gen_cpu,
           "answer": first.text[:200]}  # fmt: skip
    turn2 = [*messages, {"role": "assistant", "content": first.text}, {"role": "user", "content": FOLLOW_UP}]
    second = backend.generate(PERSONA, turn2, GenerationParams(max_tokens=8))
    out["turn2_prompt_tokens"], out["turn2_ttft_s"] = second.prompt_tokens, second.ttft_s
    if actions:
        valid, seconds = 0, []
        for prompt in ACTION_PROMPTS[:actions]:
            chat = personas.with_system_prompt("BABS", [{"role": "user", "content": prompt}])
            t0 = time.perf_counter()
            valid += run_action(backend, "BABS", chat, max_tokens=128).action is not None
            seconds.append(time.perf_counter() - t0)
        out["actions_valid"], out["actions_of"], out["action_median_s"] = valid, actions, median(seconds)
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def run_child(model: str, runtime: str, tokens: int, threads: int, actions: int,
              env: dict[str, str | None] | None = None) -> dict[str, Any] | None:
    """measure_one in a fresh process (own load time, peak RSS and OpenMP settings); `env` overrides this
    process's environment for it, a None value removing the variable."""
    child_env = {**os.environ, **(env or {})}
    child_env = {k: v for k, v in child_env.items() if v is not None}
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        proc = subprocess.run([sys.executable, __file__, "--one", model, "--runtime", runtime, "--tokens", str(tokens),
                               "--threads", str(threads), "--actions", str(actions), "--json", f.name],
                              cwd=REPO, capture_output=True, text=True, env=child_env)  # fmt: skip
        if proc.returncode != 0:
            print(f"  {model} {runtime}: failed\n{proc.stderr[-1500:]}", file=sys.stderr)
            return None
        return json.loads(Path(f.name).read_text())


# -- 2. service over bare ----------------------------------------------------------------------------------


class SpawnedSystem:
    """A broker and a forge worker in a temp var dir (like tests/conftest.py)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.var = Path(tempfile.mkdtemp(prefix="batos-bench-llm-"))
        self.extra = env
        self.procs: list[subprocess.Popen] = []

    def start(self) -> str:
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("BATOS_")}, "PYTHONPATH": str(REPO),
               "BATOS_VAR_DIR": str(self.var), "BATOS_LOG_LEVEL": "WARNING", "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", **self.extra}  # fmt: skip
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


def bare_llama(llm: Any, prompt: list[int], tokens: int) -> dict[str, float]:
    """The least a llama.cpp loop can do: sample greedily, note when each token arrives."""
    times: list[float] = []
    start = time.perf_counter()
    for _token in llm.generate(prompt, temp=0.0, top_k=0, min_p=0.0, top_p=1.0):
        times.append(time.perf_counter())
        if len(times) >= tokens:
            break
    return {"ttft_s": times[0] - start, "tps": decode_rate(len(times), times[0], times[-1]), "tokens": len(times)}


async def service_generate(client: Any, messages: list[dict[str, str]], tokens: int) -> dict[str, float]:
    first: list[float] = []

    def on_event(body: dict[str, Any]) -> None:
        if body.get("event") == "token" and not first:
            first.append(time.perf_counter())

    start = time.perf_counter()
    reply = await client.call("llm", "generate", {"persona": PERSONA, "messages": messages, "max_tokens": tokens,
                                                  "stop": []}, on_event=on_event, timeout=600)  # fmt: skip
    end = time.perf_counter()
    return {"ttft_s": first[0] - start, "tps": decode_rate(reply["completion_tokens"], first[0], end),
            "tokens": reply["completion_tokens"]}  # fmt: skip


async def wait_ready(client: Any, spawned: SpawnedSystem, timeout: float = 300) -> None:
    from batos.errors import ServiceError

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if spawned.worker.poll() is not None:
            raise RuntimeError(f"the forge worker exited with {spawned.worker.returncode}")
        try:
            if (await client.call("llm", "status", {}, timeout=30)).get("llm", {}).get("ready"):
                return
        except ServiceError:
            pass  # not registered yet
        await asyncio.sleep(0.5)
    raise TimeoutError("llm not ready")


async def service_over_bare(model: str, tokens: int, reps: int, threads: int) -> dict[str, Any]:
    from llama_cpp import Llama

    from batos.client import Client
    from services.forge.backends.llamacpp import LlamaCppBackend

    backend = make_backend(config.load(llm_model=model, llm_runtime="llamacpp", llm_threads=threads))
    assert isinstance(backend, LlamaCppBackend)
    # the bare loop gets its own Llama with the backend's settings; the backend is only the tokenizer here
    llm: Llama = backend._llm
    user = [{"role": "user", "content": "Explain in detail how a persistent object database keeps data safe."}]
    prompt = backend.encode_chat(personas.with_system_prompt(PERSONA, user))
    spawned = SpawnedSystem({"BATOS_LLM_MODEL": model, "BATOS_LLM_THREADS": str(threads)})
    try:
        settings = config.load(broker_endpoint=spawned.start())
        async with Client(settings) as client:
            await client.wait_for_broker(30)
            await wait_ready(client, spawned)
            await service_generate(client, user, 4)  # warm-up: both sides then reuse the cached prompt
            bare_llama(llm, prompt, 4)
            runs: dict[str, list[dict[str, float]]] = {"bare": [], "service": []}
            for i in range(reps):  # alternate which goes first, so drifting load hits both alike
                order = [("bare", None), ("service", None)][:: 1 if i % 2 == 0 else -1]
                for name, _ in order:
                    if name == "bare":
                        runs["bare"].append(bare_llama(llm, prompt, tokens))
                    else:
                        runs["service"].append(await service_generate(client, user, tokens))
            out = {name: {"ttft_s": median([r["ttft_s"] for r in rs]), "tokens_per_s": median([r["tps"] for r in rs]),
                          "tokens": rs[0]["tokens"]} for name, rs in runs.items()}  # fmt: skip
            out["ratio"] = out["service"]["tokens_per_s"] / out["bare"]["tokens_per_s"]
            out["extra_ttft_ms"] = (out["service"]["ttft_s"] - out["bare"]["ttft_s"]) * 1000
            out["worker_peak_rss_mb"] = peak_rss_mb(spawned.worker.pid)
            out["model"], out["threads"] = model, threads
            return out
    finally:
        spawned.stop()
        backend.close()


# -- main -------------------------------------------------------------------------------------------------


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'model':<20} {'runtime':<12} {'thr':>3} {'load s':>7} {'prompt':>6} {'TTFT s':>7} {'prompt t/s':>10} "
          f"{'gen t/s':>8} {'x tf':>5} {'p/cpu-s':>8} {'g/cpu-s':>8} {'turn2 TTFT':>10} {'RSS MB':>7} "
          f"{'actions':>8}")  # fmt: skip
    # x tf: generation tokens/s over transformers' fastest row on the same model (its thread counts run too)
    base: dict[str, float] = {}
    for r in rows:
        if r["runtime"] == "transformers":
            base[r["model"]] = max(base.get(r["model"], 0.0), r["gen_tps"])
    for r in rows:
        ratio = r["gen_tps"] / base[r["model"]] if r["model"] in base else None
        acts = f"{r['actions_valid']}/{r['actions_of']}" if "actions_valid" in r else "-"
        print(f"{r['model']:<20} {r['runtime']:<12} {r['threads']:>3} {r['load_s']:>7.2f} {r['prompt_tokens']:>6} "
              f"{r['ttft_s']:>7.2f} {r['prompt_tps']:>10.1f} {r['gen_tps']:>8.2f} "
              f"{(f'{ratio:.2f}' if ratio else '-'):>5} {r['prompt_per_cpu_s']:>8.1f} {r['gen_per_cpu_s']:>8.1f} "
              f"{r['turn2_ttft_s']:>10.2f} {r['peak_rss_mb']:>7.0f} {acts:>8}")
    for r in rows:
        print(f"  {r['model']} {r['runtime']} {r['threads']}t answer: {r['answer'][:150]!r}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2-135m", help=f"comma-separated, of {sorted(models.LLM_MODELS)}")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts; 0: auto")
    parser.add_argument("--actions", type=int, default=0, help="ReAct action prompts per model (0: skip)")
    parser.add_argument("--service-model", default="smollm2-135m", help="'' skips the service-over-bare part")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--runtime", default="gguf", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.one:  # a child: one model on one runtime
        result = measure_one(args.one, args.runtime, args.tokens, int(args.threads), args.actions)
        args.json.write_text(json.dumps(result))
        return 0

    threads = [int(t) for t in args.threads.split(",")]
    results: dict[str, Any] = {"loadavg": [round(x, 2) for x in os.getloadavg()], "rows": []}
    print(f"loadavg {results['loadavg']}, {os.cpu_count()} CPUs")
    for model in args.models.split(","):
        spec = models.llm_spec(model)
        # transformers at every fixed count too: the service ran it at torch's default (all cores)
        runs = [("transformers", t) for t in threads if t > 0] if spec.hf_checkpoint else []
        runs += [("gguf", t) for t in threads]
        for runtime, t in runs:
            row = run_child(model, runtime, args.tokens, t, args.actions)
            if row:
                results["rows"].append(row)
                print(f"  {model} {runtime} {t}t: gen {row['gen_tps']:.1f} tok/s, prompt {row['prompt_tps']:.0f} tok/s",
                      flush=True)  # fmt: skip
    print_table(results["rows"])
    if args.service_model:
        s = asyncio.run(service_over_bare(args.service_model, args.tokens, args.reps, threads[0]))
        results["service"] = s
        print(f"\nservice over bare, GGUF backend ({s['model']}, {s['threads']} thread(s), "
              f"{s['bare']['tokens']} tokens):")
        for name in ("bare", "service"):
            print(f"  {name:<8} TTFT {s[name]['ttft_s'] * 1000:7.1f} ms   {s[name]['tokens_per_s']:7.2f} tok/s")
        print(f"  ratio service/bare = {s['ratio']:.3f}   extra TTFT {s['extra_ttft_ms']:.1f} ms   "
              f"worker peak RSS {s['worker_peak_rss_mb']:.0f} MB")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
