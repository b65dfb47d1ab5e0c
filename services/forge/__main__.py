"""The forge worker process: services ``llm`` (generation) and ``forge`` (curation, LoRA training).

Both share one process so a freshly trained adapter and the model it adapts live together.
"""

from __future__ import annotations

from batos.worker import Context, run_services
from services.forge import handlers_forge, handlers_llm

# Generations queue inside the service one at a time; a capacity above 1 lets quick commands
# (count_tokens, adapters, info) through while a generation runs.
LLM_CAPACITY = 4
FORGE_CAPACITY = 1  # one training/curation run at a time


async def _startup(ctx: Context) -> None:
    await handlers_llm.startup(ctx)  # first: the forge's incarnation activates adapters on the loaded model
    await handlers_forge.startup(ctx)


async def _shutdown(ctx: Context) -> None:
    try:
        await handlers_forge.shutdown(ctx)
    finally:
        await handlers_llm.shutdown(ctx)


def main() -> None:
    run_services(
        [("llm", handlers_llm.HANDLERS, LLM_CAPACITY), ("forge", handlers_forge.HANDLERS, FORGE_CAPACITY)],
        startup=_startup,
        shutdown=_shutdown,
        status=handlers_llm.status,
    )


if __name__ == "__main__":
    main()
