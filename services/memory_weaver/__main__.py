"""The `memory_weaver` program: the `memory` service, a ZEO client of the Living Image."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from batos.image import Image
from batos.malloc_tuning import bound_heap
from batos.worker import run_service
from services.memory_weaver.embedder import Embedder
from services.memory_weaver.handlers import HANDLERS
from services.memory_weaver.weaver import MemoryWeaver

log = logging.getLogger("memory_weaver")


async def startup(ctx: Any) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    bound_heap(ctx.settings.malloc_mmap_threshold, ctx.settings.malloc_arena_max)  # before the model loads
    image = await Image(ctx.settings).open()
    embedder = await asyncio.to_thread(Embedder(bulk_niceness=ctx.settings.embed_bulk_niceness).load)
    weaver = MemoryWeaver(image, embedder, ctx.settings.vector_shard_rows)
    seconds = await weaver.start()
    ctx.state.update(image=image, weaver=weaver)
    log.info("memory ready: %d vector rows loaded in %.2f s", weaver.index.rows, seconds)


async def shutdown(ctx: Any) -> None:
    weaver, image = ctx.state.pop("weaver", None), ctx.state.pop("image", None)
    if weaver is not None:
        await weaver.close()
    if image is not None:
        await image.close()


async def status(ctx: Any) -> dict[str, Any]:
    weaver = ctx.state.get("weaver")
    return {"index": weaver.index.stats()} if weaver is not None else {}


def main() -> None:
    run_service("memory", HANDLERS, startup=startup, shutdown=shutdown, status=status)


if __name__ == "__main__":
    main()
