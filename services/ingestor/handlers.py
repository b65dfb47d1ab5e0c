"""The ``ingest`` service's command table (the only commands callable from the wire); bodies: proto.bodies.ingest."""

from __future__ import annotations

from functools import partial

import msgspec

from batos.worker import Handler, Request, ServiceError
from proto import ErrorCode
from proto.bodies.ingest import Chunk, ChunkReply, Ingest, IngestReply
from services.ingestor import pipeline, roots
from services.ingestor.files import chunk_file


async def handle_ingest(req: Request, body: Ingest) -> IngestReply:
    """Progress events, then the run's summary."""
    settings = req.ctx.settings
    allowed = roots.allowed(settings)
    real = roots.check(body.path, allowed)  # refused outside the roots: bad_args
    summary = await pipeline.ingest(
        real, client=req.client, emit=req.emit, cancelled=req.cancelled, run_blocking=req.run_blocking,
        max_chunk_tokens=body.max_chunk_tokens or settings.max_chunk_tokens,
        max_file_bytes=settings.ingest_max_file_bytes, use_unparse=body.use_unparse,
        beneath=roots.root_of(real, allowed))
    return msgspec.convert(summary, IngestReply)


async def handle_chunk(req: Request, body: Chunk) -> ChunkReply:
    settings = req.ctx.settings
    allowed = roots.allowed(settings)
    real = roots.check(body.path, allowed)
    outcome = await req.run_blocking(partial(chunk_file, beneath=roots.root_of(real, allowed)), real,
                                     body.max_chunk_tokens or settings.max_chunk_tokens,
                                     settings.ingest_max_file_bytes)
    if outcome.status == "skipped" and outcome.reason == "unreadable":
        raise ServiceError(ErrorCode.NOT_FOUND, outcome.error or f"cannot read {body.path}")
    result = outcome.result
    return ChunkReply(file_path=body.path, status=outcome.status, reason=outcome.reason, error=outcome.error,
                      chunks=[c.payload(with_context_header=True) for c in result.chunks] if result else [],
                      summaries=[s.payload() for s in result.summaries] if result else [])


HANDLERS: dict[str, Handler] = {"ingest": handle_ingest, "chunk": handle_chunk}
