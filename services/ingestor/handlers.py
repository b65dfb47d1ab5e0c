"""The ``ingest`` service's command table (the only commands callable from the wire)."""

from __future__ import annotations

from functools import partial
from typing import Any

from batos.worker import Request, ServiceError
from proto import ErrorCode
from services.ingestor import pipeline, roots
from services.ingestor.files import chunk_file

MIN_CHUNK_TOKENS = 16  # below this a chunk holds a line or two: almost everything would be line-split
MAX_CHUNK_TOKENS = 8192


def _budget(req: Request) -> int:
    default = int(req.ctx.settings.max_chunk_tokens)
    value = req.arg("max_chunk_tokens", int, default)
    if not MIN_CHUNK_TOKENS <= value <= MAX_CHUNK_TOKENS:
        raise ServiceError(ErrorCode.BAD_ARGS,
                           f"max_chunk_tokens must be between {MIN_CHUNK_TOKENS} and {MAX_CHUNK_TOKENS}, got {value}")
    return value


async def handle_ingest(req: Request) -> dict[str, Any]:
    """{path, max_chunk_tokens?, use_unparse?} -> progress events, then the run's summary."""
    path = req.arg("path", str, required=True)
    if not path.strip():
        raise ServiceError(ErrorCode.BAD_ARGS, "ingest: path must not be empty")
    allowed = roots.allowed(req.ctx.settings)
    real = roots.check(path, allowed)  # refused outside the roots: bad_args
    return await pipeline.ingest(
        real, client=req.client, emit=req.emit, cancelled=req.cancelled, run_blocking=req.run_blocking,
        max_chunk_tokens=_budget(req), max_file_bytes=int(req.ctx.settings.ingest_max_file_bytes),
        use_unparse=req.arg("use_unparse", bool, False), beneath=roots.root_of(real, allowed))


async def handle_chunk(req: Request) -> dict[str, Any]:
    """{path, max_chunk_tokens?} -> one file's chunks and summaries, without storing anything (a preview)."""
    path = req.arg("path", str, required=True)
    allowed = roots.allowed(req.ctx.settings)
    real = roots.check(path, allowed)
    outcome = await req.run_blocking(partial(chunk_file, beneath=roots.root_of(real, allowed)), real, _budget(req),
                                     int(req.ctx.settings.ingest_max_file_bytes))
    if outcome.status == "skipped" and outcome.reason == "unreadable":
        raise ServiceError(ErrorCode.NOT_FOUND, outcome.error or f"cannot read {path}")
    result = outcome.result
    return {"file_path": path, "status": outcome.status, "reason": outcome.reason, "error": outcome.error,
            "chunks": [c.payload(with_context_header=True) for c in result.chunks] if result else [],
            "summaries": [s.payload() for s in result.summaries] if result else []}


HANDLERS = {"ingest": handle_ingest, "chunk": handle_chunk}
