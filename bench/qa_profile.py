"""Where one `ask` spends its seconds: bench/qa.py --profile.

Reads three records of the same ask, all written by the live system anyway:
  the events the client received (state transitions, thoughts, streamed tokens), timed on arrival;
  the kernel's audit log (LLM_CALL: command, persona, prompt and generated tokens, seconds in the model);
  the forge's log (llamacpp.py: per generation, prompt tokens, how many the KV cache already held, TTFT).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

Trace = list[tuple[float, dict[str, Any]]]

_GENERATE = re.compile(r"generate (\w+): prompt (\d+) tokens \((\d+) reused from the KV cache\), (\d+) generated, "
                       r"TTFT ([\d.]+) s, total ([\d.]+) s")


def phases(trace: Trace, total_s: float) -> dict[str, float]:
    """Seconds in each PSM state (client-side), from one state event to the next, the last one to the reply."""
    marks = [(t, str(e.get("state"))) for t, e in trace if e.get("event") == "state" and e.get("state")]
    out: dict[str, float] = {}
    for (t, state), nxt in zip(marks, [*marks[1:], (total_s, "")], strict=True):
        out[state] = round(out.get(state, 0.0) + nxt[0] - t, 2)
    return out


def first_tokens(trace: Trace) -> list[float]:
    """For each streamed answer (the first, and the retry after VALIDATING began): its first token's delay after
    the state that asked for it."""
    out, asked, waiting = [], None, False
    for t, e in trace:
        if e.get("event") == "state" and e.get("state") in ("SYNTHESIZING", "VALIDATING"):
            asked, waiting = t, True
        elif e.get("event") == "log" and "one retry" in str(e.get("text", "")):
            asked, waiting = t, True
        elif e.get("event") == "token" and waiting and asked is not None:
            out.append(round(t - asked, 2))
            waiting = False
    return out


def llm_calls(audit_log: Path, cycle_id: str) -> list[dict[str, Any]]:
    calls = []
    if not audit_log.is_file():
        return calls
    for line in audit_log.read_text(errors="replace").splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if ev.get("cycle_id") != cycle_id:
            continue
        d = ev.get("event_data") or {}
        if ev.get("event_type") == "LLM_CALL":
            calls.append({k: d.get(k) for k in ("command", "prompt_tokens", "completion_tokens", "total_s")}
                         | {"persona": ev.get("active_persona"), "raw": str(d.get("llm_response_raw"))[:400],
                                                               "prompt": d.get("llm_prompt")})
        elif ev.get("event_type") == "ANSWER_REJECTED" and calls:
            calls[-1]["rejected"] = d.get("reason")
    return calls


def generations(forge_log: Path, offset: int) -> list[dict[str, Any]]:
    """The llama.cpp generations logged after ``offset`` (bytes) of the forge's log."""
    if not forge_log.is_file():
        return []
    with forge_log.open("rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    return [{"persona": m[1], "prompt": int(m[2]), "reused": int(m[3]), "generated": int(m[4]),
             "ttft_s": float(m[5]), "total_s": float(m[6])} for m in _GENERATE.finditer(text)]


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """User + system CPU seconds each process has used so far (/proc/PID/stat); load-independent, unlike wall time."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for name, pid in pids.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[name] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime (fields 14 and 15 of stat)
    return out


def cpu_used(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: round(after[k] - before[k], 2) for k in after if k in before}


def log_size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


def profile(trace: Trace, reply: dict[str, Any], seconds: float, var: Path, forge_offset: int,
            cpu: dict[str, float]) -> dict[str, Any]:
    timing = reply.get("timing") or {}
    return {"phases": phases(trace, seconds), "first_token_s": first_tokens(trace), "cpu_s": cpu,
            "thoughts": sum(1 for _, e in trace if e.get("event") == "thought"),
            "llm_s": timing.get("llm_s"), "other_s": timing.get("other_s"),
            "llm_calls": llm_calls(var / "metacognition.jsonl", str(reply.get("cycle_id", ""))),
            "generations": generations(var / "log" / "forge.log", forge_offset)}


def describe(p: dict[str, Any]) -> str:
    gens = "; ".join(f"{g['persona']} prompt {g['prompt']} ({g['reused']} cached) +{g['generated']} out, "
                     f"TTFT {g['ttft_s']:.1f} s, {g['total_s']:.1f} s" for g in p["generations"])
    ph = ", ".join(f"{k} {v:.1f}" for k, v in p["phases"].items())
    cpu = ", ".join(f"{k} {v:.1f}" for k, v in p["cpu_s"].items())
    return (f"    phases s: {ph}\n    CPU s: {cpu}\n"
            f"    llm {p['llm_s']} s, other {p['other_s']} s; generations: {gens or 'none logged'}")
