"""ALFRED's autotelic loop: every settings.autotelic_period seconds, new audit-log lines become ContextFractals.

The ingestion itself is audit_ingest.ingest_audit_log (exactly-once by committed offset). This module decides
when it runs and with what: one run at a time (a lock shared with the `audit` and `trace` commands), the log
flushed first so the newest events are on disk, and LLM summaries (ALFRED through llm ``generate``, within
audit_ingest's time budget) only while no cognitive cycle is running in this kernel, so self-observation never
takes the model from the Architect; otherwise the deterministic template summaries are used. Each run also
prunes finished cycles from the image's active-cycle registry (see cycle.prune_active).

After a successful ingestion the loop runs ALFRED's ``_audit_cognitive_history_``
(services.forge.history_audit): a persona with ``forge_threshold`` new successful golden cycles since its last
forge gets a forge run dispatched (forge ``run``). A failure there is logged and reported in ``status``; it never
ends the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from ZODB.POSException import ConflictError

from batos.config import MEMORY_BATCH_TIMEOUT
from services.forge.history_audit import audit_cognitive_history, forge_dispatcher
from services.kernel import cycle as records
from services.kernel.audit_ingest import Progress, ingest_audit_log, llm_summarizer
from services.kernel.env import KernelEnv

log = logging.getLogger("batos.kernel.autotelic")

SUMMARY_BUDGET_S = 30.0  # LLM time per periodic run; the rest of a run's events get template summaries
SUMMARY_TIMEOUT_S = 15.0
FORGE_DISPATCH_TIMEOUT = 1800.0  # forge.run: curation + BRICK writing the training script, then it returns


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

    async def memory_call(self, command: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.env.client.call("memory", command, body, timeout=MEMORY_BATCH_TIMEOUT)

    async def llm_call(self, command: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.env.client.call("llm", command, body, timeout=SUMMARY_TIMEOUT_S)

    async def ingest(self, progress: Progress | None = None, *, llm_summaries: bool = False) -> dict[str, Any]:
        """One ingestion run (waits for a running one to finish first); returns its report."""
        async with self.lock:
            flush = getattr(self.env.audit, "flush", None)
            if flush is not None:
                await flush()
            summarize = llm_summarizer(self.llm_call) if llm_summaries else None
            report = await ingest_audit_log(self.env.settings.audit_log, self.memory_call, summarize,
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

    async def call(self, service: str, command: str, body: dict[str, Any]) -> dict[str, Any]:
        """The (service, command, body) caller services.forge.history_audit takes."""
        timeout = FORGE_DISPATCH_TIMEOUT if service == "forge" else MEMORY_BATCH_TIMEOUT
        return await self.env.client.call(service, command, body, timeout=timeout)

    async def audit_history(self) -> dict[str, Any]:
        """ALFRED's _audit_cognitive_history_: enough new successful cycles for a persona -> a forge run.

        The dispatch is held back while a cognitive cycle runs in this kernel: a forge run stops the forge worker
        (the llm service with it) for the length of the training, which would fail the cycle's next llm call.
        The counts are still taken, and the next period dispatches."""
        dispatch = forge_dispatcher(self.call) if not self.env.active else None
        report = (await audit_cognitive_history(self.call, self.env.settings, dispatch=dispatch)).describe()
        if dispatch is None and report["due"]:
            report["deferred"] = "cognitive cycles running; the forge is dispatched at a later period"
        for persona, result in report["dispatched"].items():
            if isinstance(result, dict) and "error" in result:
                log.warning("autotelic: forge of %s not dispatched: %s", persona, result["error"])
            else:
                log.info("autotelic: forge of %s dispatched (%s)", persona, result)
        self.history = report
        self.history_runs += 1
        self.history_error = None
        return report

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
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None

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
        }
