"""Table 1 commands that are not cognitive cycles: relays to other services, and the kernel's own views.

ingest / search / inspect / stats / verify go to the ``ingest`` and ``memory`` services as those services' own
typed requests (``client.request``); their streamed events are forwarded to the console that asked.
status = the broker's worker table + this kernel's state. trace = a cycle's record in the image + its audit
events (memory's indexed history and the log's newest lines). audit = ALFRED's audit ingestion now, with
progress events. forge = the forge service's run, events forwarded, then the steward
service's upgrade, its events relayed to the adapter's incarnation (forge_follow.py).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from batos import paging
from batos.config import MEMORY_TIMEOUT
from batos.errors import ServiceError
from proto import ErrorCode
from proto.bodies import ingest as ingest_bodies
from proto.bodies import kernel as K
from proto.bodies import llm, memory
from proto.bodies.broker import Workers, WorkerTable
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


async def ingest(kernel: Kernel, emit: Emit, req: K.Ingest) -> ingest_bodies.IngestReply:
    body = ingest_bodies.Ingest(**msgspec.structs.asdict(req))  # the kernel's request is the ingest service's
    reply: ingest_bodies.IngestReply = await kernel.env.client.request(body, on_event=forwarder(emit),
                                                                        timeout=INGEST_TIMEOUT)
    return reply


async def search(kernel: Kernel, emit: Emit, req: K.Search) -> memory.SearchReply:
    # `after`: a page cursor from memory's previous reply (batos.paging); the reply's `next` goes back as is
    body = memory.Search(text=req.text, k=req.k, level=req.level, filters=req.filters or memory.Filters(),
                         within=req.within, after=req.after)
    reply: memory.SearchReply = await kernel.env.client.request(body, on_event=forwarder(emit),
                                                                timeout=MEMORY_TIMEOUT)
    return reply


async def inspect(kernel: Kernel, emit: Emit, req: K.Inspect) -> memory.InspectReply:
    reply: memory.InspectReply = await kernel.env.client.request(memory.Inspect(oid=req.oid), timeout=MEMORY_TIMEOUT)
    return reply


async def stats(kernel: Kernel, emit: Emit, req: K.Stats) -> K.StatsReply:
    reply = await kernel.env.client.request(memory.Stats(), timeout=MEMORY_TIMEOUT)
    cycles = await kernel.env.image.read(_cycle_counts)
    return K.StatsReply(**msgspec.structs.asdict(reply), cycles=cycles)


async def verify(kernel: Kernel, emit: Emit, req: K.Verify) -> memory.VerifyReply:
    """memory's invariants (services/memory_weaver/verify.py); ``repair`` fixes what it can."""
    reply: memory.VerifyReply = await kernel.env.client.request(memory.Verify(repair=req.repair),
                                                                timeout=VERIFY_TIMEOUT)
    return reply


def _cycle_counts(root: Root, conn: Any) -> K.CycleCounts:
    return K.CycleCounts(total=len(root[records.CYCLES_KEY]), unfinished=len(records.unfinished(root, conn)))


def kernel_info(kernel: Kernel) -> K.KernelInfo:
    env = kernel.env
    return K.KernelInfo(
        instance=env.instance,
        uptime_s=round(time.time() - env.started, 1),
        active_cycles=[K.ActiveCycle(cycle_id=cid, state=run.state, mission_type=run.mission_type,
                                     persona=run.persona, age_s=round(time.monotonic() - run.started, 1))
                       for cid, run in list(env.active.items())],
        autotelic=kernel.autotelic.describe(),
        recovered_at_start=env.info.get("recovered", []),
        sandbox_available=env.info.get("sandbox"),
        audit_log=getattr(env.audit, "stats", {"path": str(env.settings.audit_log)}),
    )


async def status(kernel: Kernel, emit: Emit, req: K.KernelStatus | None = None) -> K.KernelState:
    """The kernel's view: the broker's worker table and its own cycles and loops (a Table 1 ``status``; the
    runtime's ``kernel.status`` adds its own fields through kernel.status_hook)."""
    try:
        workers: WorkerTable = await kernel.env.client.request(Workers(), timeout=5.0)
    except ServiceError as e:
        return K.KernelState(broker_error=f"{e.code}: {e.message}", kernel=kernel_info(kernel))
    return K.KernelState(broker=workers, kernel=kernel_info(kernel))


async def trace(kernel: Kernel, emit: Emit, req: K.Trace) -> K.TraceReply:
    cycle_id = req.cycle_id.strip().lower()
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
    start = paging.offset_cursor(req.after, len(events))
    page, more = paging.take_page(events[start:], paging.page_budget(kernel.env.settings.max_frame_bytes),
                                  max(1, len(events)))
    return K.TraceReply(cycle=record, events=page, notes=notes, next=str(start + len(page)) if more else None)


def _trimmed(event: dict[str, Any]) -> dict[str, Any]:
    data = event.get("event_data") or {}
    for key, value in list(data.items()):
        if isinstance(value, str) and len(value) > TRACE_TEXT_CHARS:
            data[key] = value[:TRACE_TEXT_CHARS] + f"... [{len(value) - TRACE_TEXT_CHARS} more characters]"
    return event


async def audit(kernel: Kernel, emit: Emit, req: K.Audit) -> K.AuditReply:
    report = await kernel.autotelic.ingest(progress=progress_to(emit), llm_summaries=False)
    path = Path(kernel.env.settings.audit_log)
    return K.AuditReply(ingest=report, log=getattr(kernel.env.audit, "stats", {"path": str(path)}),
                        recent=_recent_events(path))


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


async def forge(kernel: Kernel, emit: Emit, req: K.Forge) -> K.ForgeReply:
    """The forge service prepares the run (its events forwarded), then the steward service runs it
    (forge_follow.py): training progress, the worker's restart, the adapter's incarnation."""
    env = kernel.env
    run = llm.ForgeRun(**msgspec.structs.asdict(req))  # the kernel's request is the forge service's own
    prepared: llm.ForgeRunReply = await env.client.request(run, on_event=forwarder(emit),
                                                           timeout=FORGE_PREPARE_TIMEOUT)
    outcome = await forge_follow.upgrade(env.client, prepared.instruction, emit, timeout=FORGE_TIMEOUT)
    return K.ForgeReply(persona=req.persona, instruction_id=prepared.instruction_id, dataset=prepared.dataset,
                        counts=prepared.counts, script=prepared.script, **outcome)
