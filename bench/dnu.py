"""`_doesNotUnderstand_` on 20 selectors with arguments, each with a check: pass rate per model.

For each model, each case goes through the kernel's own generation loop (``dnu.write_method``: BRICK's prompt,
extraction, the code policy, a real sandbox run on the call's arguments, one retry told the reason), driven
in-process by the configured LLM backend (``make_backend``, BRICK's system prompt) instead of through the
broker. Memory context is empty here (no ingest): what is measured is BRICK plus the acceptance rule.

Printed per model, beside the baseline measured on the same attempts:
  * today's rule (before this change): the first method that passes the policy (one re-ask only for a reply
    with no usable method) is persisted as SUCCESS if it runs without an exception;
  * the new rule: refused unrun if it never reads an argument it was called with; accepted only if it runs on
    the call's arguments AND does something (a value, a slot change, output); a refused attempt is retried
    once, told why.
Columns: persisted as SUCCESS, actually correct (the case's check on the returned value / slot updates),
false SUCCESS (persisted but wrong), and correct / 20. The baseline's attempt 2 prompt is the new loop's
(identical text when attempt 1 held no usable method, which is the only case the old rule retried).

    BATOS_LLM_MODEL=qwen2.5-coder-0.5b .venv/bin/python bench/dnu.py [--models a,b] [--max-tokens 200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from services.forge.spare_cores import bound_openmp_spinning  # noqa: E402

bound_openmp_spinning()  # before llama_cpp loads, as the service does

from batos import config, personas  # noqa: E402
from services.kernel import dnu, sandbox  # noqa: E402

SLOTS: dict[str, Any] = {"owner": "bob", "items": [3, 1, 2], "text": "the quick brown fox",
                         "prices": {"apple": 1.5, "pear": 2.0}, "count": 1}
Check = Callable[[sandbox.SandboxResult], bool]


def value_is(expected: Any) -> Check:
    return lambda r: r.value == expected


CASES: list[tuple[str, list[Any], Check]] = [
    ("word_count", ["a b c"], value_is(3)),
    ("reverse_words", ["hello big world"], value_is("world big hello")),
    ("is_palindrome", ["Racecar"], value_is(True)),
    ("count_vowels", ["education"], value_is(5)),
    ("sum_items", [], value_is(6)),
    ("max_item", [], value_is(3)),
    ("sorted_items", [], value_is([1, 2, 3])),
    ("total_price", [], lambda r: isinstance(r.value, int | float) and abs(r.value - 3.5) < 1e-9),
    ("capitalized_owner", [], value_is("Bob")),
    ("add", [2, 3], value_is(5)),
    ("factorial", [5], value_is(120)),
    ("fibonacci", [10], value_is(55)),
    ("celsius_to_fahrenheit", [100], lambda r: isinstance(r.value, int | float) and abs(r.value - 212) < 1e-9),
    ("average", [[1, 2, 3, 4]], lambda r: isinstance(r.value, int | float) and abs(r.value - 2.5) < 1e-9),
    ("unique_words", ["a b a c b"], lambda r: isinstance(r.value, list) and sorted(r.value) == ["a", "b", "c"]),
    ("longest_word", ["a bb ccc dd"], value_is("ccc")),
    ("char_frequency", ["aab"], value_is({"a": 2, "b": 1})),
    ("increment_count", [], lambda r: r.slot_updates.get("count") == 2),
    ("is_even", [4], value_is(True)),
    ("title_case_text", [], value_is("The Quick Brown Fox")),
]


@dataclass
class Outcome:
    selector: str
    new_accepted: bool
    new_correct: bool
    old_persisted: bool
    old_correct: bool
    attempts: int
    seconds: float
    problem: str
    value: str  # what the accepted method returned (short repr), for reading false successes


def receiver() -> dnu.Receiver:
    return dnu.Receiver(oid="1", name="thing", prototype="traits", kind="missing", slots=dict(SLOTS),
                        plain=set(SLOTS), methods={}, own=set(SLOTS))


def correct(check: Check, result: sandbox.SandboxResult | None) -> bool:
    try:
        return result is not None and result.ok and bool(check(result))
    except Exception:
        return False


async def run_case(backend: Any, selector: str, args: list[Any], check: Check, max_tokens: int,
                   settings: config.Settings) -> Outcome:
    from services.forge.backends import GenerationParams

    async def generate(prompt: str) -> str:
        messages = personas.with_system_prompt("BRICK", [{"role": "user", "content": prompt}])
        params = GenerationParams(max_tokens=max_tokens, temperature=0.0)
        out = await asyncio.to_thread(backend.generate, "BRICK", messages, params)
        return out.text

    async def trial(source: str) -> sandbox.SandboxResult:
        return await asyncio.to_thread(sandbox.run_method, source, selector, SLOTS, args, {},
                                       timeout_s=settings.sandbox_timeout, memory_mb=settings.sandbox_memory_mb)

    started = time.monotonic()
    trials = await dnu.write_method(generate, trial, receiver(), selector, args, {}, [], attempts=2)
    last = trials[-1]
    # Today's rule on the same attempts: the first trial with a policy-clean method decides, ok = persisted.
    # (A method refused unrun for ignoring its arguments was never run: run it now, as today's rule would.)
    first_run = next((t for t in trials if t.source is not None), None)
    if first_run is not None and first_run.result is None:
        first_run.result = await trial(first_run.source)
    old_persisted = first_run is not None and first_run.result is not None and first_run.result.ok
    return Outcome(selector, not last.problem, not last.problem and correct(check, last.result), old_persisted,
                   old_persisted and correct(check, first_run.result if first_run else None), len(trials),
                   time.monotonic() - started, last.problem[:100],
                   repr(last.result.value)[:40] if last.result is not None and last.result.ok else "")


def table(model: str, rows: list[Outcome]) -> str:
    n = len(rows)

    def pct(k: int) -> str:
        return f"{k}/{n} ({100 * k / n:.0f}%)"

    old_p = sum(r.old_persisted for r in rows)
    old_c = sum(r.old_correct for r in rows)
    new_p = sum(r.new_accepted for r in rows)
    new_c = sum(r.new_correct for r in rows)
    ratio = f"{new_c / old_c:.2f}x" if old_c else "n/a"
    lines = [f"\n## {model}",
             "| rule | persisted as SUCCESS | actually correct | false SUCCESS |",
             "|---|---|---|---|",
             f"| today's (baseline) | {pct(old_p)} | {pct(old_c)} | {old_p - old_c} |",
             f"| run on the call + 1 retry | {pct(new_p)} | {pct(new_c)} | {new_p - new_c} |",
             f"correct, new / baseline: {ratio}; median seconds per case "
             f"{sorted(r.seconds for r in rows)[n // 2]:.1f}; retries used {sum(r.attempts > 1 for r in rows)}",
             "", "| selector | new | correct | baseline persisted | baseline correct | attempts | returned | "
             "last problem |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.selector} | {r.new_accepted} | {r.new_correct} | {r.old_persisted} | {r.old_correct} | "
              f"{r.attempts} | {r.value.replace('|', '/')} | {r.problem.replace('|', '/')} |" for r in rows]
    return "\n".join(lines)


async def bench_model(model: str, max_tokens: int, limit: int) -> str:
    from services.forge.backends import make_backend

    settings = config.load(llm_model=model) if model else config.load()
    loaded = time.monotonic()
    backend = await asyncio.to_thread(make_backend, settings)
    label = f"{settings.llm_backend}:{getattr(backend, 'model_name', '') or settings.llm_model}"
    print(f"# {label} loaded in {time.monotonic() - loaded:.1f} s", flush=True)
    rows = []
    for selector, args, check in CASES[:limit]:
        rows.append(await run_case(backend, selector, args, check, max_tokens, settings))
        r = rows[-1]
        print(f"  {selector}: new={r.new_accepted}/{r.new_correct} old={r.old_persisted}/{r.old_correct} "
              f"({r.seconds:.1f} s) {r.problem}", flush=True)
    backend.close()
    return table(label, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=os.environ.get("BATOS_LLM_MODEL", ""),
                        help="comma-separated llm_model keys (default: BATOS_LLM_MODEL or the configured one)")
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--limit", type=int, default=len(CASES), help="first N cases only (smoke runs)")
    opts = parser.parse_args()
    sandbox.probe_sandbox()
    for model in [m.strip() for m in opts.models.split(",")] if opts.models else [""]:
        print(asyncio.run(bench_model(model, opts.max_tokens, opts.limit)), flush=True)


if __name__ == "__main__":
    main()
