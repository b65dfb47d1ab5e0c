"""The kernel process's state and lifecycle: open the image, awaken, recover, audit, start ALFRED's loop.

Startup, in order: the Image (a ZEO client; awaken() gives it its prototypes), the PSM states and the cycle
registry installed (idempotent), the audit log opened, every cycle this kernel instance left unfinished marked
FAILED ("kernel restarted": a kernel killed mid-cycle leaves no half-written cycle behind), then the autotelic
loop. Shutdown reverses it, closing the ZODB connection cleanly (no stale .lock).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import msgspec

from batos.audit import AuditEvent, AuditLog
from batos.config import Settings
from batos.image import POOL_THREADS, Image
from batos.uvm import Root
from batos.worker import Context
from services.kernel import cycle as records
from services.kernel import governor, psm, sandbox
from services.kernel.autotelic import Autotelic
from services.kernel.env import AuditSink, KernelEnv, ServiceCaller

log = logging.getLogger("batos.kernel")


@dataclass
class Kernel:
    env: KernelEnv
    autotelic: Autotelic


def install(root: Root, conn: Any) -> bool:
    return psm.install_states(root) | records.install_registry(root)


def _load_cycle_objects(root: Root, conn: Any) -> int:
    """Bring what every cycle touches into this connection's cache (a cold load is a ZEO round trip each)."""
    objs = [root["prototypes"]["cognitive_cycle"], root["prototypes"]["query_morph"],
            root[records.CYCLES_KEY], root[records.ACTIVE_KEY], *root[psm.STATES_KEY].values()]
    for obj in objs:
        obj._p_activate()
    return len(objs)


async def warm_up(image: Image) -> dict[str, Any]:
    """Pay the one-time costs before the first command, not inside it (the first event must come fast):
    every pool connection's cache, the sandbox's availability probe, the tokenizer's tables."""
    await asyncio.gather(*(image.read(_load_cycle_objects) for _ in range(POOL_THREADS * 2)))
    loop = asyncio.get_running_loop()
    sandbox_ok = await loop.run_in_executor(None, sandbox.sandbox_available)
    await loop.run_in_executor(None, governor.count_tokens, "warm up")
    if not sandbox_ok:
        log.warning("no process sandbox on this host: send will refuse to run methods (see SANDBOX.md)")
    return {"sandbox": sandbox_ok}


async def recover(env: KernelEnv) -> list[dict[str, Any]]:
    """Fail this instance's interrupted cycles in the image and say so in the audit log."""
    failed = await env.image.transact(records.fail_interrupted, env.instance)
    for item in failed:
        log.warning("cycle %s was interrupted in %s: marked FAILED (%s)", item["cycle_id"], item["from"],
                    records.RESTART_REASON)
        persona, mission_type = item["persona"] or "ALFRED", item["mission_type"] or None
        await env.audit.log(AuditEvent.transition(item["cycle_id"], item["from"], "FAILED", persona=persona,
                                                  status="FAILURE", mission_type=mission_type,
                                                  note=records.RESTART_REASON))
        await env.audit.log(AuditEvent.cycle_end(item["cycle_id"], persona=persona, status="FAILURE", output=None,
                                                 mission_type=mission_type, psm_state="FAILED",
                                                 error=records.RESTART_REASON))
    env.info["recovered"] = [item["cycle_id"] for item in failed]
    return failed


async def start_kernel(settings: Settings, client: ServiceCaller, *, image: Image | None = None,
                       audit: AuditSink | None = None) -> Kernel:
    image = image or await Image(settings).open()
    await image.transact(install)
    audit = audit if audit is not None else AuditLog(settings.audit_log)
    if hasattr(audit, "open"):
        await audit.open()
    env = KernelEnv(settings=settings, image=image, audit=audit, client=client)
    await recover(env)
    env.info.update(await warm_up(image))
    kernel = Kernel(env, Autotelic(env))
    kernel.autotelic.start()
    log.info("kernel %s awake; %d interrupted cycle(s) failed", env.instance, len(env.info["recovered"]))
    return kernel


async def stop_kernel(kernel: Kernel) -> None:
    await kernel.autotelic.stop()
    close = getattr(kernel.env.audit, "close", None)
    if close is not None:
        await close()
    await kernel.env.image.close()


# -- hooks for batos.worker.run_service ------------------------------------------------------------


async def startup(ctx: Context) -> None:
    ctx.state["kernel"] = await start_kernel(ctx.settings, ctx.client)


async def shutdown(ctx: Context) -> None:
    kernel = ctx.state.pop("kernel", None)
    if kernel is not None:
        await stop_kernel(kernel)


async def status_hook(ctx: Context) -> dict[str, Any]:
    """Merged into the runtime's own `status` reply (worker identity, uptime, in-flight requests)."""
    kernel = ctx.state.get("kernel")
    if kernel is None:
        return {"kernel": "starting"}
    from services.kernel.relays import status

    return msgspec.to_builtins(await status(kernel, _no_emit))


async def _no_emit(name: str, **data: Any) -> None:
    return None


__all__ = ["Kernel", "shutdown", "start_kernel", "startup", "status_hook", "stop_kernel"]
