"""``python -m services.forge.steward_main``: the steward program supervisord runs, the broker service ``steward``.

Commands (bodies in proto/bodies/steward.py; services/forge/steward.py does the work):
  upgrade: one forge run (the Instruction forge ``run`` answered with): events started, stopped, stage,
      progress, output, stage_done, stored, restarted, finished, incarnated; the reply is the run's result.
      ``busy`` while another runs.
  status: the runtime's status plus runs (the last few), last_forge (persona -> time), busy, current.

It registers with the service key like every worker (batos.worker), so only services may call it.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any

import msgspec

from batos.errors import ServiceError
from batos.image import Image
from batos.supervisor_rpc import Supervisor, url_for
from batos.worker import Context, Request, run_services
from proto import ErrorCode
from proto.bodies.steward import Instruction, UpgradeReply
from services.forge import lora_experts
from services.forge.steward import ImageOps, Steward, StewardBusy

log = logging.getLogger("batos.steward")

STEWARD = "steward"  # ctx.state keys
IMAGE = "steward_image"
WATCH = "steward_stop_watch"
# status answers while an upgrade runs; a second upgrade is refused with `busy`, never queued behind hours
CAPACITY = 4
OWN_PROGRAM = "steward"


def image_ops(image: Image, loop: asyncio.AbstractEventLoop) -> ImageOps:
    """The steward's image work, callable from its run thread (each call a transaction on the image's pool)."""
    def wait(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    return ImageOps(
        store=lambda name, path, info: wait(image.transact(lora_experts.store, name, path, info)),
        extract=lambda name, target: wait(image.read(lora_experts.extract, name, target)),
        get=lambda name: wait(image.read(lora_experts.get, name)))


async def handle_upgrade(req: Request, ins: Instruction) -> UpgradeReply:
    steward: Steward = req.ctx.state[STEWARD]

    def emit(event: str, **data: Any) -> None:
        # stamped where it happens: the kernel derives the training rate from these times
        req.emit_threadsafe(event, **{**data, "ts": datetime.now(UTC).isoformat()})

    try:
        return msgspec.convert(await req.run_blocking(steward.run, ins, emit), UpgradeReply)
    except StewardBusy as e:
        raise ServiceError(ErrorCode.BUSY, str(e)) from e


HANDLERS = {"upgrade": handle_upgrade}


async def status(ctx: Context) -> dict[str, Any]:
    """What the runtime's status adds: proto.bodies.steward.StewardStatusReply's own fields."""
    return ctx.state[STEWARD].status()


async def startup(ctx: Context) -> None:
    settings = ctx.settings
    image = await Image(settings, pool_threads=1, do_awaken=False).open()  # lora_experts only
    ctx.state[IMAGE] = image
    steward = Steward(settings.steward_dir, Supervisor(url_for(settings)),
                      image=image_ops(image, asyncio.get_running_loop()), own_program=OWN_PROGRAM,
                      hidden=[settings.keys_dir], incarnation_grace=settings.forge_incarnation_grace)
    ctx.state[STEWARD] = steward
    recovered = await asyncio.to_thread(steward.recover)
    if recovered:
        log.warning("steward: closed out the interrupted run %s (reported failed, not retried)", recovered)

    async def stop_on_signal() -> None:
        # SIGTERM: kill a running training step now, so the program is restarted within the drain grace
        await ctx.stopping.wait()
        steward.request_stop()

    ctx.state[WATCH] = asyncio.create_task(stop_on_signal(), name="steward-stop")
    log.info("steward: supervisord at %s, state in %s", url_for(settings), settings.steward_dir)


async def shutdown(ctx: Context) -> None:
    # the stop watch has finished by now: serve() sets ctx.stopping before the drain that precedes this hook
    ctx.state.pop(WATCH, None)
    image = ctx.state.pop(IMAGE, None)
    if image is not None:
        await image.close()


def main() -> None:
    run_services([(STEWARD, HANDLERS, CAPACITY)], startup=startup, shutdown=shutdown, status=status)


if __name__ == "__main__":
    main()
