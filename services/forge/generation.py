"""The llm service's logic, independent of the broker: a fair queue that runs one generation at a time,
deadlines, cancellation, and adapters that survive a restart.

The engine takes and answers the typed bodies of proto/bodies/llm.py (checked once, where they were decoded);
handlers (handlers_llm.py) only hand them on. Generation runs in a thread (``run_blocking``); tokens leave
through ``on_token`` from that thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec

import proto
from batos import personas
from proto.bodies import llm as bodies
from services.forge.backends.base import (
    CANCELLED,
    TIMEOUT,
    Backend,
    BackendError,
    GenerationParams,
    GenerationResult,
    TokenCallback,
)
from services.forge.structured import run_action

log = logging.getLogger(__name__)

QUEUE_POLL = 0.1  # how often a queued request looks at its cancel flag and deadline
ADAPTER_REGISTRY = "llm_adapters.json"  # in settings.lora_dir: persona -> {path, meta}

RunBlocking = Callable[..., Awaitable[Any]]


# -- the queue ------------------------------------------------------------------------------------


class GenerationQueue:
    """First come, first served; one at a time. A waiter leaves when cancelled or out of time."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self.waiting = 0

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    @contextlib.asynccontextmanager
    async def slot(self, cancelled: threading.Event, deadline: float) -> AsyncIterator[None]:
        acquire = asyncio.ensure_future(self._lock.acquire())
        self.waiting += 1
        try:
            while not acquire.done() and not cancelled.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                await asyncio.wait({acquire}, timeout=min(QUEUE_POLL, remaining))
        except asyncio.CancelledError:
            _abandon(acquire, self._lock)
            raise
        finally:
            self.waiting -= 1
        if not acquire.done():
            acquire.cancel()
            if cancelled.is_set():
                raise BackendError(proto.ErrorCode.CANCELLED, "cancelled while queued")
            raise BackendError(proto.ErrorCode.TIMEOUT, "timed out waiting for the model (queue)")
        try:
            yield
        finally:
            self._lock.release()


def _abandon(acquire: asyncio.Future, lock: asyncio.Lock) -> None:
    if acquire.done() and not acquire.cancelled():
        lock.release()
    else:
        acquire.cancel()


# -- adapters that survive restarts -------------------------------------------------------------------


def registry_path(settings: Any) -> Path:
    return Path(settings.lora_dir) / ADAPTER_REGISTRY


class AdapterRegistry:
    """persona -> {path, meta} in a small JSON file, written atomically."""

    def __init__(self, path: Path | None):
        self.path = path

    def load(self) -> dict[str, dict[str, Any]]:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable adapter registry %s: %s", self.path, e)
            return {}
        return {p: v for p, v in data.items() if p in personas.PERSONAS and isinstance(v, dict) and v.get("path")}

    def save(self, entries: dict[str, dict[str, Any]]) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".llm_adapters.", dir=self.path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(entries, f, indent=2, sort_keys=True)
        os.replace(tmp, self.path)


# -- the engine -------------------------------------------------------------------------------------


async def _to_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args)


class LLMEngine:
    def __init__(self, backend: Backend, *, request_timeout: float = 300.0, registry: AdapterRegistry | None = None):
        self.backend = backend
        self.request_timeout = request_timeout
        self.queue = GenerationQueue()
        self.registry = registry or AdapterRegistry(None)
        self._adapter_lock = asyncio.Lock()

    def _deadline(self, timeout: float | None) -> float:
        return time.monotonic() + (timeout or self.request_timeout)

    async def _run(
        self, fn: Callable[[], Any], cancelled: threading.Event, deadline: float, run_blocking: RunBlocking
    ) -> tuple[Any, float]:
        """Wait for the model, run ``fn`` in a thread; (its result, seconds queued)."""
        queued = time.monotonic()
        async with self.queue.slot(cancelled, deadline):
            queue_s = time.monotonic() - queued
            try:
                return await run_blocking(fn), queue_s
            except asyncio.CancelledError:
                cancelled.set()  # our task is gone: make the thread stop at its next token
                raise

    async def generate(
        self,
        args: bodies.Generate,
        *,
        on_token: TokenCallback | None = None,
        cancelled: threading.Event | None = None,
        run_blocking: RunBlocking = _to_thread,
    ) -> bodies.GenerateReply:
        cancelled = cancelled or threading.Event()
        deadline = self._deadline(args.timeout)
        params = GenerationParams(
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, stop=list(args.stop),
            json_schema=args.json_schema, repetition_penalty=args.repetition_penalty, deadline=deadline,
        )  # fmt: skip
        messages = personas.with_system_prompt(args.persona, _plain(args.messages))
        result, queue_s = await self._run(
            lambda: self.backend.generate(args.persona, messages, params, on_token, cancelled),
            cancelled, deadline, run_blocking,
        )  # fmt: skip
        _raise_if_interrupted(result, args.timeout or self.request_timeout)
        return bodies.GenerateReply(**result.as_dict(), persona=args.persona, queue_s=queue_s)

    async def action(
        self,
        args: bodies.Action,
        *,
        on_token: TokenCallback | None = None,
        cancelled: threading.Event | None = None,
        run_blocking: RunBlocking = _to_thread,
    ) -> bodies.ActionReply:
        cancelled = cancelled or threading.Event()
        deadline = self._deadline(args.timeout)
        messages = personas.with_system_prompt(args.persona, _plain(args.messages))
        outcome, queue_s = await self._run(
            lambda: run_action(
                self.backend, args.persona, messages, max_tokens=args.max_tokens, temperature=args.temperature,
                deadline=deadline, constrained=args.constrained, reask=args.reask, on_token=on_token,
                cancel=cancelled,
            ),
            cancelled, deadline, run_blocking,
        )  # fmt: skip
        results = outcome.results
        _raise_if_interrupted(results[-1], args.timeout or self.request_timeout)
        return bodies.ActionReply(
            action=outcome.action, valid=outcome.action is not None, raw=results[-1].text,
            attempts=len(results), problem=outcome.problem, persona=args.persona,
            prompt_tokens=sum(r.prompt_tokens for r in results),
            completion_tokens=sum(r.completion_tokens for r in results),
            total_s=sum(r.total_s for r in results), queue_s=queue_s, adapter=results[-1].adapter,
            model=results[-1].model,
        )  # fmt: skip

    def count_tokens(self, text: str) -> bodies.CountTokensReply:
        return bodies.CountTokensReply(tokens=self.backend.count_tokens(text),
                                       exact=self.backend.name in ("local", "llamacpp"))

    def adapter(self, persona: str) -> bodies.AdapterInfo | None:
        """The adapter serving ``persona`` now, None for the base model."""
        return self.adapters().personas.get(persona)

    def adapters(self) -> bodies.AdaptersReply:
        loaded = self.backend.adapters()
        return msgspec.convert({"personas": {p: loaded.get(p) for p in personas.PERSONAS},
                                "backend": self.backend.info()}, bodies.AdaptersReply)

    async def activate_adapter(self, args: bodies.ActivateAdapter,
                               run_blocking: RunBlocking = _to_thread) -> bodies.ActivateAdapterReply:
        async with self._adapter_lock:
            # the queue slot: never swap adapters under a running generation
            async with self.queue.slot(threading.Event(), self._deadline(None)):
                info = await run_blocking(self.backend.activate_adapter, args.persona, args.path, args.meta)
            entries = self.registry.load()
            entries[args.persona] = {"path": args.path, "meta": args.meta}
            self.registry.save(entries)
        return bodies.ActivateAdapterReply(persona=args.persona, adapter=msgspec.convert(info, bodies.AdapterInfo))

    async def deactivate_adapter(self, persona: str,
                                 run_blocking: RunBlocking = _to_thread) -> bodies.DeactivateAdapterReply:
        async with self._adapter_lock:
            async with self.queue.slot(threading.Event(), self._deadline(None)):
                removed = await run_blocking(self.backend.deactivate_adapter, persona)
            entries = self.registry.load()
            entries.pop(persona, None)
            self.registry.save(entries)
        return bodies.DeactivateAdapterReply(persona=persona, removed=removed)

    async def restore_adapters(self, run_blocking: RunBlocking = _to_thread) -> dict[str, str]:
        """Re-activate the adapters recorded before a restart; report persona -> outcome."""
        outcome: dict[str, str] = {}
        for persona, entry in self.registry.load().items():
            try:
                await run_blocking(self.backend.activate_adapter, persona, entry["path"], entry.get("meta"))
                outcome[persona] = "active"
            except BackendError as e:
                log.warning("adapter for %s not restored: %s", persona, e.message)
                outcome[persona] = f"failed: {e.message}"
        return outcome


def _plain(messages: list[bodies.Message]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


def _raise_if_interrupted(result: GenerationResult, timeout: float) -> None:
    if result.finish_reason == CANCELLED:
        raise BackendError(proto.ErrorCode.CANCELLED, f"cancelled after {result.completion_tokens} tokens")
    if result.finish_reason == TIMEOUT:
        raise BackendError(
            proto.ErrorCode.TIMEOUT,
            f"generation exceeded the {timeout:g} s timeout after {result.completion_tokens} tokens",
        )
