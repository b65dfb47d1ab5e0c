"""The ``llm`` service's command table: each handler maps a request onto LLMEngine.

Commands: generate, action, count_tokens, adapters, activate_adapter, deactivate_adapter, info.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import proto
from batos.errors import ServiceError
from batos.worker import Context, Request
from services.forge.backends import BackendError, make_backend
from services.forge.generation import AdapterRegistry, LLMEngine, registry_path

log = logging.getLogger(__name__)

ENGINE = "llm"  # ctx.state key of the LLMEngine
LOAD_ERROR = "llm_error"  # ctx.state key of the reason the backend did not load


def _engine(req: Request) -> LLMEngine:
    engine = req.ctx.state.get(ENGINE)
    if engine is None:
        reason = req.ctx.state.get(LOAD_ERROR, "the model is still loading")
        raise ServiceError(proto.ErrorCode.UNAVAILABLE, f"llm backend not available: {reason}")
    return engine


def _translating(fn: Callable[[Request], Awaitable[dict[str, Any]]]) -> Callable[[Request], Awaitable[dict[str, Any]]]:
    """BackendError (the library's) -> ServiceError (the wire's)."""

    @functools.wraps(fn)
    async def handler(req: Request) -> dict[str, Any]:
        try:
            return await fn(req)
        except BackendError as e:
            raise ServiceError(e.code, e.message) from e

    return handler


def _token_emitter(req: Request) -> Callable[[str], None]:
    return lambda text: req.emit_threadsafe("token", text=text)


@_translating
async def handle_generate(req: Request) -> dict[str, Any]:
    return await _engine(req).generate(
        req.args, on_token=_token_emitter(req), cancelled=req.cancelled, run_blocking=req.run_blocking
    )


@_translating
async def handle_action(req: Request) -> dict[str, Any]:
    # tokens stream only on request: a ReAct loop wants the parsed action, not JSON fragments
    on_token = _token_emitter(req) if req.args.get("stream") else None
    return await _engine(req).action(
        req.args, on_token=on_token, cancelled=req.cancelled, run_blocking=req.run_blocking
    )


@_translating
async def handle_count_tokens(req: Request) -> dict[str, Any]:
    return await req.run_blocking(_engine(req).count_tokens, req.args)


@_translating
async def handle_adapters(req: Request) -> dict[str, Any]:
    return _engine(req).adapters()


@_translating
async def handle_activate_adapter(req: Request) -> dict[str, Any]:
    return await _engine(req).activate_adapter(req.args, run_blocking=req.run_blocking)


@_translating
async def handle_deactivate_adapter(req: Request) -> dict[str, Any]:
    return await _engine(req).deactivate_adapter(req.args, run_blocking=req.run_blocking)


@_translating
async def handle_info(req: Request) -> dict[str, Any]:
    engine = _engine(req)
    return {**engine.backend.info(), "queue_waiting": engine.queue.waiting, "busy": engine.queue.busy}


HANDLERS = {
    "generate": handle_generate,
    "action": handle_action,
    "count_tokens": handle_count_tokens,
    "adapters": handle_adapters,
    "activate_adapter": handle_activate_adapter,
    "deactivate_adapter": handle_deactivate_adapter,
    "info": handle_info,
}


async def startup(ctx: Context) -> None:
    """Load the backend (in a thread: seconds for SmolLM2, minutes for an 8B model) and restore adapters.

    A backend that cannot load does not kill the process (supervisord would restart it in a loop): the
    service registers and answers ``unavailable`` with the reason.
    """
    settings = ctx.settings
    try:
        backend = await asyncio.to_thread(make_backend, settings)
    except BackendError as e:
        log.error("llm backend %s did not load: %s", settings.llm_backend, e.message)
        ctx.state[LOAD_ERROR] = e.message
        return
    engine = LLMEngine(
        backend, request_timeout=settings.llm_request_timeout, registry=AdapterRegistry(registry_path(settings))
    )
    restored = await engine.restore_adapters()
    if restored:
        log.info("adapters restored: %s", restored)
    ctx.state[ENGINE] = engine
    log.info("llm ready: %s", backend.info())


async def shutdown(ctx: Context) -> None:
    engine = ctx.state.pop(ENGINE, None)
    if engine is not None:
        await asyncio.to_thread(engine.backend.close)


async def status(ctx: Context) -> dict[str, Any]:
    engine: LLMEngine | None = ctx.state.get(ENGINE)
    if engine is None:
        return {"llm": {"ready": False, "error": ctx.state.get(LOAD_ERROR)}}
    return {"llm": {"ready": True, **engine.backend.info(), "queue_waiting": engine.queue.waiting}}
