"""The ``llm`` service's command table: each handler hands its typed request (proto/bodies/llm.py) to LLMEngine.

Commands: generate, action, count_tokens, adapters, activate_adapter, deactivate_adapter, info.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec

import proto
from batos.errors import ServiceError
from batos.worker import Context, Handler, Request
from proto.bodies import llm as bodies
from services.forge.backends import BackendError, make_backend
from services.forge.generation import AdapterRegistry, LLMEngine, registry_path

log = logging.getLogger(__name__)

ENGINE = "llm"  # ctx.state key of the LLMEngine
LOAD_ERROR = "llm_error"  # ctx.state key of the reason the backend did not load

B = TypeVar("B")
R = TypeVar("R")


def _engine(req: Request) -> LLMEngine:
    engine = req.ctx.state.get(ENGINE)
    if engine is None:
        reason = req.ctx.state.get(LOAD_ERROR, "the model is still loading")
        raise ServiceError(proto.ErrorCode.UNAVAILABLE, f"llm backend not available: {reason}")
    return engine


def _translating(fn: Callable[[Request, B], Awaitable[R]]) -> Callable[[Request, B], Awaitable[R]]:
    """BackendError (the library's) -> ServiceError (the wire's)."""

    @functools.wraps(fn)
    async def handler(req: Request, body: B) -> R:
        try:
            return await fn(req, body)
        except BackendError as e:
            raise ServiceError(e.code, e.message) from e

    return handler


def _token_emitter(req: Request) -> Callable[[str], None]:
    return lambda text: req.emit_threadsafe("token", text=text)


@_translating
async def handle_generate(req: Request, body: bodies.Generate) -> bodies.GenerateReply:
    return await _engine(req).generate(body, on_token=_token_emitter(req), cancelled=req.cancelled,
                                       run_blocking=req.run_blocking)


@_translating
async def handle_action(req: Request, body: bodies.Action) -> bodies.ActionReply:
    # tokens stream only on request: a ReAct loop wants the parsed action, not JSON fragments
    on_token = _token_emitter(req) if body.stream else None
    return await _engine(req).action(body, on_token=on_token, cancelled=req.cancelled,
                                     run_blocking=req.run_blocking)


@_translating
async def handle_count_tokens(req: Request, body: bodies.CountTokens) -> bodies.CountTokensReply:
    reply: bodies.CountTokensReply = await req.run_blocking(_engine(req).count_tokens, body.text)
    return reply


@_translating
async def handle_adapters(req: Request, body: bodies.Adapters) -> bodies.AdaptersReply:
    return _engine(req).adapters()


@_translating
async def handle_activate_adapter(req: Request, body: bodies.ActivateAdapter) -> bodies.ActivateAdapterReply:
    return await _engine(req).activate_adapter(body, run_blocking=req.run_blocking)


@_translating
async def handle_deactivate_adapter(req: Request, body: bodies.DeactivateAdapter) -> bodies.DeactivateAdapterReply:
    return await _engine(req).deactivate_adapter(body.persona, run_blocking=req.run_blocking)


@_translating
async def handle_info(req: Request, body: bodies.Info) -> bodies.InfoReply:
    engine = _engine(req)
    info = {**engine.backend.info(), "queue_waiting": engine.queue.waiting, "busy": engine.queue.busy}
    return msgspec.convert(info, bodies.InfoReply)


HANDLERS: dict[str, Handler] = {
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
    """What the runtime's status adds for the llm service: proto.bodies.llm.LLMState."""
    engine: LLMEngine | None = ctx.state.get(ENGINE)
    if engine is None:
        return {"llm": {"ready": False, "error": ctx.state.get(LOAD_ERROR)}}
    return {"llm": {"ready": True, **engine.backend.info(), "queue_waiting": engine.queue.waiting}}
