"""ALFRED's autotelic loop: every settings.autotelic_period seconds, new audit-log lines become ContextFractals.

The ingestion itself is audit_ingest.ingest_audit_log (exactly-once by committed offset). This module decides
when it runs and with what: one run at a time (a lock shared with the `audit` and `trace` commands), the log
flushed first so the newest events are on disk, and LLM summaries (ALFRED through llm ``generate``, within
audit_ingest's time budget) only while no cognitive cycle is running in this kernel, so self-observation never
takes the model from the Architect; otherwise the deterministic template summaries are used. Each run also
prunes finished cycles from the image's active-cycle registry (see cycle.prune_active).

After a successful ingestion the loop asks the forge service for ALFRED's ``_audit_cognitive_history_``
(forge ``history``): a persona with ``forge_threshold`` new successful golden cycles since its last forge is
due, and the first one due gets a forge run (forge ``run``, then steward ``upgrade``, followed in a background
task, one at a time, its events logged). A failure there is logged and reported in ``status``; it never ends
the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any, TypeVar

from ZODB.POSException import ConflictError

from batos.audit import AuditEvent
from batos.config import MEMORY_BATCH_TIMEOUT
from proto.bodies.llm import ForgeRun
from proto.bodies.memory import AuditOffset
from proto.contract import Call, Reply
from services.kernel import cycle as records
from services.kernel import forge_follow, history
from services.kernel.audit_ingest import Progress, cycle_events_after, ingest_audit_log, llm_summarizer
from services.kernel.env import KernelEnv

log = logging.getLogger("batos.kernel.autotelic")
R = TypeVar("R", bound=Reply)

SUMMARY_BUDGET_S = 30.0  # LLM time per periodic run; the rest of a run's events get template summaries
SUMMARY_TIMEOUT_S = 15.0
FORGE_DISPATCH_TIMEOUT = 1800.0  # forge.run: curation + BRICK writing the training script, then it returns
HISTORY_TIMEOUT = MEMORY_BATCH_TIMEOUT  # forge.history: a few memory queries per persona
UPGRADE_TIMEOUT = 6 * 3600.0 + 600.0  # steward.upgrade: silence allowed (training emits progress as it goes)


class Autotelic:
    def __init__(self, env: KernelEnv):
        self.env = env
        self.lock = asyncio.Lock()
        self.task: asyncio.Task[None] | None = None
        self.runs = 0
        self.last: dict[str, Any] | None = None
        self.last_error: str | None = None
        self.last_run_at: float | None = None
        self.history: dict[str, Any] | None = None  # the last history audit's report
        self.history_runs = 0
        self.history_error: str | None = None
        self.forge_task: asyncio.Task[None] | None = None  # the forge run this loop dispatched, followed
        self.last_forge: dict[str, Any] | None = None

    async def memory(self, body: Call[R]) -> R:
        return await self.env.client.request(body, timeout=MEMORY_BATCH_TIMEOUT)

    async def llm_call(self, command: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.env.client.call("llm", command, body, timeout=SUMMARY_TIMEOUT_S)

    async def ingest(self, progress: Progress | None = None, *, llm_summaries: bool = False) -> dict[str, Any]:
        """One ingestion run (waits for a running one to finish first); returns its report."""
        async with self.lock:
            flush = getattr(self.env.audit, "flush", None)
            if flush is not None:
                await flush()
            summarize = llm_summarizer(self.llm_call) if llm_summaries else None
            report = await ingest_audit_log(self.env.settings.audit_log, self.memory, summarize,
                                            progress=progress, summary_budget_s=SUMMARY_BUDGET_S,
                                            summary_timeout_s=SUMMARY_TIMEOUT_S)
            try:
                await self.env.image.transact(records.prune_active)
            except ConflictError:  # cycles starting right now: the entries are pruned next run
                log.info("active-cycle registry busy; pruning next run")
            self.runs += 1
            self.last = report.to_dict()
            self.last_run_at = time.time()
            self.last_error = None
            return self.last

    async def trace(self, cycle_id: str) -> list[AuditEvent]:
        """A cycle's events in time order: those memory holds (one indexed query) and those logged since the last
        ingestion, read from the kernel's own log rather than pushed into memory first."""
        flush = getattr(self.env.audit, "flush", None)
        if flush is not None:
            await flush()
        log_path = self.env.settings.audit_log
        offset = (await self.memory(AuditOffset(path=str(Path(log_path))))).value  # before the query: no gap
        stored = await history.trace_cycle(self.memory, cycle_id)
        pending = await asyncio.to_thread(cycle_events_after, log_path, offset, cycle_id)
        seen = {e.event_id for e in stored}
        return sorted([*stored, *(e for e in pending if e.event_id not in seen)], key=lambda e: e.timestamp)

    @property
    def forging(self) -> bool:
        return self.forge_task is not None and not self.forge_task.done()

    async def audit_history(self) -> dict[str, Any]:
        """ALFRED's _audit_cognitive_history_: enough new successful cycles for a persona -> a forge run.

        The dispatch is held back while a cognitive cycle runs in this kernel: a forge run stops the forge worker
        (the llm service with it) for the length of the training, which would fail the cycle's next llm call.
        The counts are still taken, and the next period dispatches."""
        report = await self.env.client.call("forge", "history", {}, timeout=HISTORY_TIMEOUT)
        report["dispatched"] = {}
        if report.get("due"):
            if self.env.active:
                report["deferred"] = "cognitive cycles running; the forge is dispatched at a later period"
            elif self.forging:
                report["deferred"] = "a forge run dispatched earlier is still running"
            else:
                persona = str(report["due"][0])  # the others are due again after this one's restart
                count = (report.get("counts") or {}).get(persona)
                self.forge_task = asyncio.create_task(self.forge(persona, count), name=f"alfred-forge-{persona}")
                report["dispatched"][persona] = "started"
                log.info("autotelic: forge of %s dispatched (%s new successful cycles)", persona, count)
        self.history = report
        self.history_runs += 1
        self.history_error = None
        return report

    async def forge(self, persona: str, count: Any) -> None:
        """One forge run on ALFRED's initiative: prepared by the forge service, run by the steward."""
        async def note(event: str, **data: Any) -> None:
            if event == "state":
                log.info("autotelic forge of %s: %s (%s)", persona, data.get("state"), data.get("note"))

        client = self.env.client
        try:
            settings = self.env.settings
            prepared = await client.request(ForgeRun(
                persona=persona, reason=f"{count} new successful cycles",
                generate_script=settings.autotelic_forge_script,
                format_prompts=settings.autotelic_forge_format_prompts), timeout=FORGE_DISPATCH_TIMEOUT)
            outcome = await forge_follow.upgrade(client, prepared.instruction, note, timeout=UPGRADE_TIMEOUT)
            self.last_forge = {"persona": persona, **outcome}
        except asyncio.CancelledError:
            raise
        except Exception as e:  # reported in status, never raised: the autotelic loop carries on
            self.last_forge = {"persona": persona, "error": f"{type(e).__name__}: {e}"}
            log.warning("autotelic: forge of %s failed: %s", persona, self.last_forge["error"])

    async def loop(self) -> None:
        period = self.env.settings.autotelic_period
        while True:
            await asyncio.sleep(period)
            try:
                await self.ingest(llm_summaries=not self.env.active)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # memory down, llm down, disk trouble: try again next period
                self.last_error = f"{type(e).__name__}: {e}"
                log.warning("autotelic audit ingestion failed: %s", self.last_error)
                continue  # the history audit reads the fractals this run failed to write: next period
            if self.forging:  # its worker is down for the training: the audit resumes after the run
                continue
            try:
                await self.audit_history()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # never ends the loop: ingestion goes on, the audit is retried next period
                self.history_error = f"{type(e).__name__}: {e}"
                log.warning("autotelic history audit failed: %s", self.history_error)

    def start(self) -> None:
        if self.task is None and self.env.settings.autotelic_period > 0:
            self.task = asyncio.create_task(self.loop(), name="alfred-autotelic")

    async def stop(self) -> None:
        for task in (self.task, self.forge_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self.task = self.forge_task = None

    def describe(self) -> dict[str, Any]:
        last = self.last or {}
        return {
            "running": self.task is not None and not self.task.done(),
            "period_s": self.env.settings.autotelic_period,
            "runs": self.runs,
            "last_run_at": self.last_run_at,
            "last_error": self.last_error,
            "last": {k: last.get(k) for k in ("created", "skipped", "malformed", "end_offset", "seconds")},
            "history_audit": {"runs": self.history_runs, "last_error": self.history_error,
                              "last": self.history},
            "forge": {"running": self.forging, "last": self.last_forge},
        }
