"""Cognitive-cycle benchmark through the running system (broker + kernel + memory + llm), via batos.client.

Measures, per cycle:
  * time from sending the command to the first streamed event (the IDLE `state` event). Target < 100 ms.
  * the share of the cycle's time spent outside LLM calls: the kernel reports each cycle's timing
    (total_s, llm_s = time awaiting the llm service, other_s = the rest: image transactions, memory searches,
    audit, sandbox). Target < 10%.
Also: client-side total time, the states seen, and the reply's status.

    .venv/bin/python bench/cycle.py [--runs 3] [--command ask|send|display_yourself]
                                    [--question "..."] [--oid OID --selector SEL] [--json]

`send` to an object whose method exists measures the kernel's own overhead (no LLM at all: the share
outside LLM is then 100% by definition and only the first-event latency and total time are meaningful).
Needs a running system (`make up` or the supervisord config) with the repository ingested for useful answers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from batos.client import Client  # noqa: E402
from batos.config import load  # noqa: E402
from batos.errors import ServiceError  # noqa: E402
from proto import Kind  # noqa: E402

FIRST_EVENT_TARGET_MS = 100.0
OUTSIDE_LLM_TARGET = 0.10
DEFAULT_QUESTION = "How does the kernel run the ReAct loop inside one ZODB transaction?"


async def one_cycle(client: Client, command: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    started = time.perf_counter()
    call = await client.start_call("kernel", command, body)
    first_event_ms: float | None = None
    states: list[str] = []
    tokens = 0
    reply: dict[str, Any] = {}
    error: str | None = None

    async def drain() -> None:
        nonlocal first_event_ms, tokens, reply, error
        async for env in call.events():
            if env.kind == Kind.EVENT:
                if first_event_ms is None:
                    first_event_ms = (time.perf_counter() - started) * 1000
                name = env.body.get("event")
                if name == "state":
                    states.append(f"{env.body.get('cycle_id', '')[:8]}:{env.body.get('state')}")
                elif name == "token":
                    tokens += 1
            elif env.kind == Kind.ERROR:
                error = f"{env.body.get('code')}: {env.body.get('message')}"
            else:
                reply = env.body

    try:
        await asyncio.wait_for(drain(), timeout)
    except TimeoutError:
        await call.cancel()
        error = f"no reply within {timeout} s"
    finally:
        client.pending.pop(call.id, None)
    total = time.perf_counter() - started
    timing = reply.get("timing", {})
    if "plan" in timing:  # display_yourself: two cycles
        parts = [timing["plan"], timing["display"]]
        timing = {"total_s": sum(p["total_s"] for p in parts), "llm_s": sum(p["llm_s"] for p in parts)}
        timing["other_s"] = timing["total_s"] - timing["llm_s"]
        timing["other_share"] = timing["other_s"] / timing["total_s"] if timing["total_s"] else 0.0
    return {"first_event_ms": first_event_ms, "client_total_s": round(total, 3), "states": states,
            "tokens": tokens, "status": reply.get("status"), "cycle_id": reply.get("cycle_id"),
            "timing": timing, "error": error}


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    firsts = [r["first_event_ms"] for r in rows if r["first_event_ms"] is not None]
    shares = [r["timing"]["other_share"] for r in rows if r["timing"].get("llm_s")]
    out: dict[str, Any] = {"runs": len(rows), "errors": sum(1 for r in rows if r["error"])}
    if firsts:
        out["first_event_ms"] = {"p50": round(statistics.median(firsts), 2), "max": round(max(firsts), 2),
                                 "target": FIRST_EVENT_TARGET_MS, "ok": max(firsts) < FIRST_EVENT_TARGET_MS}
    if shares:
        out["outside_llm_share"] = {"mean": round(statistics.fmean(shares), 4), "max": round(max(shares), 4),
                                    "target": OUTSIDE_LLM_TARGET, "ok": max(shares) < OUTSIDE_LLM_TARGET}
    return out


async def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--command", choices=("ask", "send", "display_yourself"), default="ask")
    p.add_argument("--question", default=DEFAULT_QUESTION)
    p.add_argument("--oid", default="")
    p.add_argument("--selector", default="")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.command == "ask":
        body: dict[str, Any] = {"question": a.question}
    elif a.command == "send":
        if not a.oid or not a.selector:
            p.error("send needs --oid and --selector (an object with that method already defined)")
        body = {"oid": a.oid, "selector": a.selector, "args": [], "kwargs": {}}
    else:
        body = {}
    settings = load()
    async with Client(settings) as client:
        try:
            await client.wait_for_broker(timeout=10.0)
        except ServiceError as e:
            print(f"no broker at {settings.broker_endpoint}: {e.message}", file=sys.stderr)
            return 2
        rows = []
        for i in range(a.runs):
            row = await one_cycle(client, a.command, body, a.timeout)
            rows.append(row)
            if not a.json:
                t = row["timing"]
                print(f"run {i + 1}: first event {row['first_event_ms'] or float('nan'):.1f} ms, total "
                      f"{row['client_total_s']:.2f} s, llm {t.get('llm_s', 0):.2f} s, outside llm "
                      f"{100 * t.get('other_share', 0):.1f}%, status {row['status']}"
                      + (f", ERROR {row['error']}" if row["error"] else ""))
    summary = summarize(rows)
    print(json.dumps({"summary": summary, "runs": rows} if a.json else summary, indent=2))
    return 0 if not summary["errors"] else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
