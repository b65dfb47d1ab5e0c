"""The forge worker process: services ``llm`` (generation) and ``forge`` (curation, LoRA training).

Both share one process so a freshly trained adapter and the model it adapts live together.
"""

from __future__ import annotations

import importlib
from typing import Any

from batos.worker import Context, run_services
from services.forge import handlers_llm

# Generations queue inside the service one at a time; a capacity above 1 lets quick commands
# (count_tokens, adapters, info) through while a generation runs.
LLM_CAPACITY = 4
FORGE_CAPACITY = 1  # one training/curation run at a time


def _forge_module() -> Any:
    try:
        return importlib.import_module("services.forge.handlers_forge")
    except ModuleNotFoundError as e:
        if e.name != "services.forge.handlers_forge":
            raise
        return None


async def _startup(ctx: Context) -> None:
    await handlers_llm.startup(ctx)
    forge = _forge_module()
    if forge is not None and getattr(forge, "startup", None) is not None:
        await forge.startup(ctx)


async def _shutdown(ctx: Context) -> None:
    forge = _forge_module()
    try:
        if forge is not None and getattr(forge, "shutdown", None) is not None:
            await forge.shutdown(ctx)
    finally:
        await handlers_llm.shutdown(ctx)


def main() -> None:
    forge = _forge_module()
    forge_handlers = dict(getattr(forge, "HANDLERS", {})) if forge is not None else {}
    run_services(
        [("llm", handlers_llm.HANDLERS, LLM_CAPACITY), ("forge", forge_handlers, FORGE_CAPACITY)],
        startup=_startup,
        shutdown=_shutdown,
        status=handlers_llm.status,
    )


if __name__ == "__main__":
    main()
