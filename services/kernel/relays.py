"""Table 1 commands that are not cognitive cycles: relays to other services, and the kernel's own views.

ingest / search / inspect / stats go to the ``ingest`` and ``memory`` services; their streamed events are
forwarded to the console that asked. status = the broker's worker table + this kernel's state. trace = a
cycle's record in the image + its audit events (after catching the audit log up). audit = ALFRED's audit
ingestion now, with progress events. forge = the forge service's run, events forwarded, then the steward
service's upgrade, its events relayed to the adapter's incarnation (forge_follow.py).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batos import paging, personas
from batos.config import MEMORY_TIMEOUT
from batos.errors import ServiceError
from proto import ErrorCode, Table1Command
from services.kernel import cycle as records
from services.kernel import forge_follow
from services.kernel.env import Emit

if TYPE_CHECKING:
    from batos.uvm import Root
    from services.kernel.kernel import Kernel

log = logging.getLogger("batos.kernel.relays")

INGEST_TIMEOUT = 6 * 3600.0  # a whole tree on 2 cores embeds at ~25 chunks/s: hours for a big one
FORGE_TIMEOUT = 6 * 3600.0 + 600.0  # LoRA training on CPU (the steward's limit) + evaluation and incarnation
FORGE_PREPARE_TIMEOUT = 1800.0  # curation + BRICK writing the training script (~a minute on 2 cores)
FORGE_OPTIONS = ("mission_type", "epochs", "max_steps", "generate_script", "format_prompts", "logging_steps")
VERIFY_TIMEOUT = 600.0  # verify reads every object of the image: ~1 min per 100k objects from a cold cache
TRACE_TEXT_CHARS = 2000  # prompts in a trace are cut here (the audit log keeps them whole)
RECENT_EVENTS = 10
TAIL_BYTES = 256 * 1024


def forwarder(emit: Emit):
    """on_event for client.call: a service's events go on to the console unchanged."""
    async def forward(event: dict[str, Any]) -> None:
        data = dict(event)
        name = str(data.pop("event", "log"))
        await emit(name, **data)

    return forward


def progress_to(emit: Emit):
    """progress callback for the audit ingestion: each report becomes a ``progress`` event."""
    async def progress(data: dict[str, Any]) -> None:
        await emit("progress", **data)

    return progress


def persona_arg(value: Any) -> str:
    try:
        return personas.normalize(value)
    except personas.UnknownPersona as e:
        raise ServiceError(ErrorCode.BAD_ARGS, str(e)) from None


def _first_arg(cmd: Table1Command, name: str) -> Any:
    brief = cmd.mission_brief
    value = brief.args[0] if brief.args else brief.kwargs.get(name)
    if not isinstance(value, str) or not value.strip():
        raise ServiceError(ErrorCode.BAD_ARGS, f"{cmd.command} needs {name} (a non-empty string)")
    return value


async def ingest(kernel: Kernel, emit: Emit, cmd: Table1Command) -> dict[str, Any]:
    path = _first_arg(cmd, "path")
    body: dict[str, Any] = {"path": path}
    if "max_chunk_tokens" in cmd.mission_brief.kwargs:
        body["max_chunk_tokens"] = cmd.mission_brief.kwargs["max_chunk_tokens"]
    return await kernel.env.client.call("ingest", "ingest", body, on_event=forwarder(emit), timeout=INGEST_TIMEOUT)


async def search(kernel: Kernel, emit: Emit, cmd: Table1Command) -> dict[str, Any]:
    text = _first_arg(cmd, "text")
    kw = cmd.mission_brief.kwargs
    k = kw.get("k", 8)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 100:
        raise ServiceError(ErrorCode.BAD_ARGS, f"search: k must be a whole number from 1 to 100, not {k!r}")
    # `after`: a page cursor from memory's previous reply (batos.paging); the reply's `next` goes back as is
    body: dict[str, Any] = {"text": text, "k": k,
                            **{n: kw[n] for n in ("level", "filters", "within", "after") if n in kw}}
    return await kernel.env.client.call("memory", "search", body, on_event=forwarder(emit), timeout=MEMORY_TIMEOUT)


async def inspect(kernel: Kernel, emit: Emit, cmd: Table1Command) -> dict[str, Any]:
    return await kernel.env.client.call("memory", "inspect", {"oid": cmd.target_oid}, timeout=MEMORY_TIMEOUT)


async def stats(kernel: Kernel, emit: Emit, cmd: Table1Command) -> dict[str, Any]:
    reply = await kernel.env.client.call("memory", "stats", {}, timeout=MEMORY_TIMEOUT)
    reply["cycles"] = await kernel.env.image.read(_cycle_counts)
    return reply


async def verify(kernel: Kernel, emit: Emit, cmd: Table1Command) -> dict[str, Any]:
    """memory's invariants (services/memory_weaver/verify.py); kwargs {repair: bool}."""
    body = {"repair": bool(cmd.mission_brief.kwargs.get("repair"))}
    return await kernel.env.client.call("memory", "verify", body, timeout=VERIFY_TIMEOUT)


def _cycle_counts(root: Root, conn: Any) -> dict[str, Any]:
    return {"total": len(root[records.CYCLES_KEY]), "unfinished": len(records.unfinished(root, conn))}


async def kernel_info(kernel: Kernel) -> dict[str, Any]:
    env = kernel.env
    return {
        "instance": env.instance,
        "uptime_s": round(time.time() - env.started, 1),
        "active_cycles": [{"cycle_id": cid, "state": run.state, "mission_type": run.mission_type,
                           "persona": run.persona, "age_s": round(time.monotonic() - run.started, 1)}
                          for cid, run in list(env.active.items())],
        "autotelic": kernel.autotelic.describe(),
        "recovered_at_start": env.info.get("recovered", []),
        "sandbox_available": env.info.get("sandbox"),
        "audit_log": getattr(env.audit, "stats", {"path": str(env.settings.audit_log)}),
    }


async def status(kernel: Kernel, emit: Emit, cmd: Table1Command | None = None) -> dict[str, Any]:
    try:
        workers = await kernel.env.client.call("broker", "workers", {}, timeout=5.0)
    except ServiceError as e:
        workers = {"error": f"{e.code}: {e.message}"}
    return {"broker": workers, "kernel": await kernel_info(kernel)}


async def trace(kernel: Kernel, emit: Emit, cmd: Table1Command) -> dict[str, Any]:
    cycle_id = _first_arg(cmd, "cycle_id").strip().lower()
    try:
        record = await kernel.env.image.read(records.describe_cycle, cycle_id)
    except records.UnknownCycle:
        raise ServiceError(ErrorCode.NOT_FOUND, f"no cognitive cycle {cycle_id!r} in the image") from None
    notes: list[str] = []
    events: list[dict[str, Any]] = []
    try:
        # memory's indexed history plus what the kernel logged since the last ingestion (read, not ingested)
        found = await kernel.autotelic.trace(cycle_id)
        events = [_trimmed(e.model_dump(mode="json")) for e in found]
    except ServiceError as e:
        notes.append(f"audit events unavailable ({e.code}: {e.message}); the image's record is shown")
    # a long trace in pages (batos.paging): `after` is the offset the previous page's `next` gave
    start = paging.offset_cursor(cmd.mission_brief.kwargs.get("after"), len(events))
    page, more = paging.take_page(events[start:], paging.page_budget(kernel.env.settings.max_frame_bytes),
                                  max(1, len(events)))
    return {"cycle": record, "events": page, "notes": notes, "next": str(start + len(page)) if more else None}


def _trimmed(event: dict[str, Any]) -> dict[str, Any]:
    data = event.get("event_data") or {}
    for key, value in list(data.items()):
        if isinstance(value, str) and len(value) > TRACE_TEXT_CHARS:
            data[key] = value[:TRACE_TEXT_CHARS] + f"... [{len(value) - TRACE_TEXT_CHARS} more characters]"
    return event


async def audit(kernel: Kernel, emit: Emit, cmd: Table1Command) -> dict[str, Any]:
    report = await kernel.autotelic.ingest(progress=progress_to(emit), llm_summaries=False)
    path = Path(kernel.env.settings.audit_log)
    return {"ingest": report, "log": getattr(kernel.env.audit, "stats", {"path": str(path)}),
            "recent": _recent_events(path)}


def _recent_events(path: Path, n: int = RECENT_EVENTS) -> list[dict[str, Any]]:
    """The last ``n`` events of the active log file, briefly (a tail read: constant cost)."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - TAIL_BYTES))
            lines = f.read().splitlines()[-n:]
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            e = json.loads(line)
        except ValueError:
            continue
        out.append({k: e.get(k) for k in ("timestamp", "cycle_id", "event_type", "psm_state", "active_persona",
                                          "status", "mission_type")})
    return out


async def forge(kernel: Kernel, emit: Emit, cmd: Table1Command) -> dict[str, Any]:
    """The forge service prepares the run (its events forwarded), then the steward service runs it
    (forge_follow.py): training progress, the worker's restart, the adapter's incarnation."""
    persona = persona_arg(_first_arg(cmd, "persona"))
    env = kernel.env
    body = {"persona": persona, **{k: v for k, v in cmd.mission_brief.kwargs.items() if k in FORGE_OPTIONS}}
    reply = await env.client.call("forge", "run", body, on_event=forwarder(emit), timeout=FORGE_PREPARE_TIMEOUT)
    instruction = reply.pop("instruction", None)
    if not isinstance(instruction, dict) or not instruction.get("id"):
        raise ServiceError(ErrorCode.INTERNAL, f"forge.run replied without an instruction: {sorted(reply)}")
    outcome = await forge_follow.upgrade(env.client, instruction, emit, timeout=FORGE_TIMEOUT)
    return {**reply, "persona": persona, **outcome}
