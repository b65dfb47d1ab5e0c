"""LLM thread settings on this machine, quiet and beside a busy program, with transformers as baseline.

Each row is bench/llm.py's measurement (SmolLM2-135M by default; a ~1,200-token retrieval-shaped prompt
on a cold cache, then 64 generated tokens) in its own process, so OpenMP settings apply from the start.
llama.cpp:
- 1 thread;
- 2 threads with OMP_WAIT_POLICY=PASSIVE (what the service used before: every ggml barrier sleeps);
- 2 threads with GOMP_SPINCOUNT=1000 (~10 us of spinning at a barrier, then sleep: the service's setting);
- auto (BATOS_LLM_THREADS=0: the cores other programs leave, re-decided during the request).
The same three thread settings (1, 2, auto) for transformers fp32, the runtime the service used before
llama.cpp and still uses where llama-cpp-python did not build; its fastest fixed row on a quiet machine is
the baseline of the generation ratio. "Busy" runs every row while one other process spins on a core at the
same priority (a CPU-bound neighbour, e.g. another user's job); "quiet" has nothing else running. Rounds
alternate the rows; the table shows medians.

    .venv/bin/python bench/llm_threads.py [--model smollm2-135m] [--rounds 2] [--tokens 64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm import run_child  # bench/llm.py: one measurement in a child process

# (label, runtime, threads, OpenMP environment: the only OpenMP variables the child gets)
SPIN_10US = {"GOMP_SPINCOUNT": "1000"}
ROWS: list[tuple[str, str, int, dict[str, str]]] = [
    ("transformers, 1 thread", "transformers", 1, SPIN_10US),
    ("transformers, 2 threads", "transformers", 2, SPIN_10US),
    ("transformers, auto", "transformers", 0, SPIN_10US),
    ("1 thread", "gguf", 1, SPIN_10US),
    ("2 threads, passive", "gguf", 2, {"OMP_WAIT_POLICY": "PASSIVE"}),
    ("2 threads, spin 10us", "gguf", 2, SPIN_10US),
    ("auto", "gguf", 0, SPIN_10US),
]
SPIN = "while True: pass"


def measure(model: str, row: tuple[str, str, int, dict[str, str]], tokens: int, busy: bool) -> dict[str, Any] | None:
    _, runtime, threads, env = row
    neighbour = subprocess.Popen([sys.executable, "-c", SPIN]) if busy else None
    try:
        return run_child(model, runtime, tokens, threads, actions=0,
                         env={"GOMP_SPINCOUNT": None, "OMP_WAIT_POLICY": None, **env})  # fmt: skip
    finally:
        if neighbour:
            neighbour.kill()
            neighbour.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    print(f"loadavg {[round(x, 2) for x in os.getloadavg()]}, {os.cpu_count()} CPUs, model {args.model}")
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    plan = [(row, busy) for busy in (False, True) for row in ROWS]
    for n in range(args.rounds):
        for row, busy in plan:
            r = measure(args.model, row, args.tokens, busy)
            if r is None:
                continue
            where = "busy" if busy else "quiet"
            results.setdefault((row[0], where), []).append(r)
            print(f"  round {n + 1} {where:<5} {row[0]:<24} prompt {r['prompt_tps']:6.1f} tok/s   "
                  f"gen {r['gen_tps']:6.1f} tok/s", flush=True)  # fmt: skip
    med = {key: {k: statistics.median(r[k] for r in rs) for k in ("prompt_tps", "gen_tps", "ttft_s")}
           for key, rs in results.items()}  # fmt: skip
    # the baseline: transformers' fastest fixed thread count on a quiet machine
    fixed_tf = [m["gen_tps"] for (label, where), m in med.items()
                if label.startswith("transformers") and "auto" not in label and where == "quiet"]  # fmt: skip
    base = max(fixed_tf, default=None)
    one = {(rt, where): med.get((f"{'transformers, ' if rt else ''}1 thread", where))
           for rt in (True, False) for where in ("quiet", "busy")}  # fmt: skip
    print(f"\n{'where':<6} {'setting':<24} {'TTFT s':>7} {'prompt t/s':>10} {'gen t/s':>8} {'gen x 1 thread':>14} "
          f"{'gen x transformers':>18}")  # fmt: skip
    for (label, where), m in med.items():
        ref = one.get((label.startswith("transformers"), where))  # 1 thread of the same runtime
        x1 = f"{m['gen_tps'] / ref['gen_tps']:.2f}" if ref else "-"
        xtf = f"{m['gen_tps'] / base:.2f}" if base else "-"
        print(f"{where:<6} {label:<24} {m['ttft_s']:>7.2f} {m['prompt_tps']:>10.1f} {m['gen_tps']:>8.2f} {x1:>14} "
              f"{xtf:>18}")  # fmt: skip
    print("gen x transformers: over transformers' fastest row (quiet), the same model and prompt")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
