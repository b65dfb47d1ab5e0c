"""The ``forge`` service: golden-path curation, fine-tuning runs via the steward, adapter incarnation.

Commands (bodies in proto/bodies/llm.py):
  run: curation -> BRICK's script (or the template) -> the steward's instruction. Streams ``progress`` events
      (stage curation | script | upgrade_requested) and replies with {instruction_id, instruction, ...}: the
      caller (the kernel) hands ``instruction`` to steward ``upgrade``, which stops this very process, trains,
      starts it again and streams the run's events. The instruction carries the script, its config and the
      dataset: nothing is passed through files.
  curate: the dataset only -> {counts, dataset}.
  history: ALFRED's audit of the history (the steward's record + memory's fractals) -> {counts, due, ...}.

``startup`` incarnates new LoRA experts from the Living Image in the background (services/forge/incarnation.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

import proto
from batos import personas
from batos.client import Client
from batos.config import MEMORY_TIMEOUT
from batos.errors import ServiceError
from batos.fractals import query_all
from batos.image import Image
from batos.worker import Context, Handler, Request
from proto.bodies import llm as bodies
from proto.bodies.memory import Fractal, QueryFractals
from proto.bodies.steward import Instruction
from services.forge import curation, history_audit, incarnation, training_script

log = logging.getLogger("batos.forge")

Call = Callable[[str, str, dict[str, Any]], Awaitable[dict[str, Any]]]
Emit = Callable[..., Awaitable[None]]

QUERY_LIMIT = 10_000  # golden events read for one curation
CYCLE_EVENTS_MAX = 1_000  # events read per cycle (a cycle writes a few dozen)
MAX_CYCLES = 2_000  # cycles whose full event lists are fetched for one curation
CYCLE_QUERY_CONCURRENCY = 8
SCRIPT_MAX_TOKENS = 700  # a complete training script; BRICK on CPU needs about a minute for it
INCARNATION_RETRY_S = (5, 10, 20, 40, 60, 60, 60, 60, 60, 60)  # memory/kernel may start after us
INCARNATION_TASK = "forge_incarnation"  # ctx.state keys
IMAGE = "forge_image"
STEWARD_STATUS_TIMEOUT = 10.0


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


# -- curation against the memory service --------------------------------------------------------------


async def gather_fractals(call: Call, persona: str, mission_type: str | None = None) -> list[dict[str, Any]]:
    """Every event of every cycle that ended in SUCCESS with a golden event by ``persona`` (newest cycles first,
    bounded): one query for the golden events (memory's history index), then one per cycle for its events."""
    memory = history_audit.memory_of(call)
    seeds = await query_all(memory, QueryFractals(
        persona=persona, mission_type=mission_type, status=curation.SUCCESS,
        event_types=list(curation.GOLDEN_EVENT_TYPES), cycle_status=curation.SUCCESS), QUERY_LIMIT)
    newest: dict[str, str] = {}
    for f in seeds:
        cycle = f.meta["cycle_id"]
        newest[cycle] = max(newest.get(cycle, ""), f.meta["timestamp"])
    cycles = sorted(newest, key=newest.__getitem__, reverse=True)[:MAX_CYCLES]
    sem = asyncio.Semaphore(CYCLE_QUERY_CONCURRENCY)

    async def one(cycle_id: str) -> list[Fractal]:
        async with sem:
            return await query_all(memory, QueryFractals(cycle_id=cycle_id), CYCLE_EVENTS_MAX)

    return [msgspec.to_builtins(f) for fractals in await asyncio.gather(*(one(c) for c in cycles)) for f in fractals]


def as_served(persona: str, example: curation.Example) -> curation.Example:
    """The chat as the llm service feeds it to the model: the persona's system prompt first, merged with the
    caller's (batos.personas.with_system_prompt). The audit log holds the kernel's messages, from before that
    merge; training on what the model really sees at inference is what makes the adapter fit."""
    system = personas.system_prompt(persona)
    messages = list(example.messages)
    if messages and messages[0]["role"] == "system" and messages[0]["content"].startswith(system):
        return example  # already merged
    return replace(example, messages=tuple(personas.with_system_prompt(persona, messages)))


async def curate_dataset(call: Call, persona: str, mission_type: str | None, out_dir: Path, *,
                         cap: int = curation.DEFAULT_CAP_PER_MISSION,
                         eval_percent: int = curation.DEFAULT_EVAL_PERCENT,
                         ) -> tuple[curation.Curation, curation.DatasetFiles]:
    fractals = await gather_fractals(call, persona, mission_type)
    result = curation.curate(fractals, persona, mission_type, cap_per_mission=cap, eval_percent=eval_percent)
    result.train = [as_served(persona, ex) for ex in result.train]
    result.eval = [as_served(persona, ex) for ex in result.eval]
    return result, curation.write_dataset(result, out_dir)


# -- a forge run ---------------------------------------------------------------------------------------


def brick_generator(client: Client, timeout: float) -> training_script.Generate:
    async def generate(messages: list[dict[str, str]]) -> str:
        ask = bodies.Generate(persona="BRICK", messages=msgspec.convert(messages, list[bodies.Message]),
                              max_tokens=SCRIPT_MAX_TOKENS)
        return (await client.request(ask, timeout=timeout)).text
    return generate


async def busy_personas(call: Call) -> set[str]:
    """Personas the steward is forging now; empty when it does not answer (it refuses a second run itself)."""
    try:
        status = await asyncio.wait_for(call("steward", "status", {}), STEWARD_STATUS_TIMEOUT)
    except (ServiceError, TimeoutError):
        return set()
    return set(status["busy"])  # proto.bodies.steward.StewardStatusReply: canonical persona names


async def prepare_forge(settings: Any, call: Call, emit: Emit, *, persona: str, mission_type: str | None = None,
                        epochs: int = 1, max_steps: int = -1, generate: training_script.Generate | None = None,
                        previous_expert: str | None = None, cycle_id: str | None = None,
                        format_prompts: int = 4, eval_max_new_tokens: int | None = None,
                        logging_steps: int | None = None) -> bodies.ForgeRunReply:
    """Curate, produce the script; returns the steward's instruction (the dataset and script inline)."""
    if persona in await busy_personas(call):
        raise ServiceError(proto.ErrorCode.BUSY, f"a forge of {persona} is already running")
    instruction_id = f"{persona.lower()}-{_stamp()}-{uuid.uuid4().hex[:6]}"
    with tempfile.TemporaryDirectory(prefix="forge-dataset-") as tmp:
        result, dataset = await curate_dataset(call, persona, mission_type, Path(tmp))
        files = {path.name: path.read_text(encoding="utf-8") for path in (dataset.train_path, dataset.eval_path)}
    counts = result.counts()
    await emit("progress", stage="curation", done=1, total=3, persona=persona, mission_type=mission_type, **counts)
    if not result.train:
        raise ServiceError(proto.ErrorCode.REJECTED,
                           f"no golden-path examples for {persona}"
                           f"{' on ' + mission_type if mission_type else ''}: {json.dumps(counts)}")

    try:
        base = training_script.resolve_base_model(settings)
    except training_script.ForgeConfigError as e:
        raise ServiceError(proto.ErrorCode.UNAVAILABLE, str(e)) from e
    try:
        config = training_script.build_config(
            base=base, persona=persona, dataset={**dataset.describe(), "train_ids": dataset.train_ids,
                                                 "eval_ids": dataset.eval_ids},
            output_dir=Path("adapter"), epochs=epochs, max_steps=max_steps,  # the steward sets the paths
            logging_steps=logging_steps, previous_adapter=None,
            evaluation={"max_format_prompts": format_prompts, "max_new_tokens": eval_max_new_tokens})
    except training_script.ForgeConfigError as e:
        raise ServiceError(proto.ErrorCode.BAD_ARGS, str(e)) from e

    choice = await training_script.produce_script(generate, config)
    config.update(instruction_id=instruction_id, cycle_id=cycle_id, origin=choice.origin)
    for key in ("train_path", "eval_path", "output_dir"):  # this host's temp paths mean nothing to the steward
        config.pop(key, None)
    await emit("progress", stage="script", done=2, total=3, **choice.describe())
    instruction = msgspec.convert({
        "id": instruction_id, "persona": persona, "script": choice.source, "config": config, "files": files,
        "program": settings.forge_program, "origin": choice.origin, "timeout_s": settings.forge_train_timeout,
        "previous_expert": previous_expert}, Instruction)  # checked here, as the steward will check it
    await emit("progress", stage="upgrade_requested", done=3, total=3, instruction_id=instruction_id)
    described = {k: v for k, v in dataset.describe().items() if not k.endswith("_path")}
    return msgspec.convert({"instruction_id": instruction_id, "instruction": instruction, "dataset": described,
                            "counts": counts, "script": choice.describe()}, bodies.ForgeRunReply)


# -- handlers -------------------------------------------------------------------------------------------


def _caller(req: Request, timeout: float = MEMORY_TIMEOUT) -> Call:
    async def call(service: str, command: str, body: dict[str, Any]) -> dict[str, Any]:
        return await req.client.call(service, command, body, timeout=timeout)
    return call


def _active_adapter(ctx: Context, persona: str) -> bodies.AdapterInfo | None:
    from services.forge.handlers_llm import ENGINE  # the llm service shares this process

    engine = ctx.state.get(ENGINE)
    return engine.adapter(persona) if engine is not None else None


async def handle_run(req: Request, body: bodies.ForgeRun) -> bodies.ForgeRunReply:
    settings = req.ctx.settings
    generate = brick_generator(req.client, settings.llm_request_timeout) if body.generate_script else None
    active = _active_adapter(req.ctx, body.persona)
    if body.reason:
        log.info("forge of %s asked: %s", body.persona, body.reason)
    try:
        return await prepare_forge(
            settings, _caller(req), req.emit, persona=body.persona, mission_type=body.mission_type,
            epochs=body.epochs, max_steps=body.max_steps, generate=generate,
            previous_expert=active.meta.get("expert") if active is not None else None, cycle_id=body.cycle_id,
            format_prompts=body.format_prompts, logging_steps=body.logging_steps)
    except curation.CurationError as e:
        raise ServiceError(proto.ErrorCode.INTERNAL, f"curation failed: {e}") from e


async def handle_curate(req: Request, body: bodies.Curate) -> bodies.CurateReply:
    out_dir = Path(req.ctx.settings.var_dir) / "forge_datasets" / f"{body.persona.lower()}_{_stamp()}"
    try:
        result, dataset = await curate_dataset(_caller(req), body.persona, body.mission_type, out_dir,
                                               cap=body.cap, eval_percent=body.eval_percent)
    except curation.CurationError as e:
        raise ServiceError(proto.ErrorCode.BAD_ARGS, str(e)) from e
    await req.emit("progress", stage="curation", done=1, total=1, **result.counts())
    return msgspec.convert({"persona": body.persona, "mission_type": body.mission_type, "counts": result.counts(),
                            "dataset": dataset.describe()}, bodies.CurateReply)


async def handle_history(req: Request, body: bodies.History) -> bodies.HistoryReply:
    report = await history_audit.audit_cognitive_history(_caller(req), req.ctx.settings.forge_threshold)
    return msgspec.convert(report.describe(), bodies.HistoryReply)


HANDLERS: dict[str, Handler] = {
    "run": handle_run,
    "curate": handle_curate,
    "history": handle_history,
}


# -- incarnation at start-up -------------------------------------------------------------------------------


def incarnation_deps(ctx: Context, image: Image) -> incarnation.Deps | None:
    from services.forge.handlers_llm import ENGINE

    engine = ctx.state.get(ENGINE)
    if engine is None:
        return None

    async def activate(persona: str, path: str, meta: dict[str, Any]) -> None:
        await engine.activate_adapter(bodies.ActivateAdapter(persona=persona, path=path, meta=meta))

    def active(persona: str) -> dict[str, Any] | None:
        adapter = engine.adapter(persona)
        return msgspec.to_builtins(adapter) if adapter is not None else None

    async def record(event: dict[str, Any]) -> None:
        await ctx.client.call("kernel", "audit_event", {"event": event}, timeout=10.0)

    return incarnation.Deps(active=active, activate=activate,
                            read=image.read, transact=image.transact, record=record,
                            cache_dir=Path(ctx.settings.lora_dir))


async def _incarnation_loop(ctx: Context) -> None:
    image = None
    for delay in (0, *INCARNATION_RETRY_S):  # in the background: ZEO may come up after us
        await asyncio.sleep(delay)
        try:
            image = await Image(ctx.settings, pool_threads=1, do_awaken=False).open()
            break
        except Exception as e:
            log.warning("forge: the Living Image is not reachable yet (%s); LoRA experts wait", e)
    if image is None:
        return
    ctx.state[IMAGE] = image
    deps = incarnation_deps(ctx, image)
    if deps is None:
        log.warning("forge: the llm backend is not loaded; adapters are not incarnated")
        return
    restored = await incarnation.restore_active(deps)
    if restored:
        log.info("forge: adapters restored from the image: %s", restored)
    for delay in (0, *INCARNATION_RETRY_S):
        await asyncio.sleep(delay)
        try:
            done = await incarnation.incarnate_lora_experts(deps)
        except Exception:
            log.exception("forge: incarnation pass failed")
            continue
        if done:
            log.info("forge: incarnation pass: %s", [(d["name"], d["decision"], d.get("audited")) for d in done])
        if all(d.get("audited") for d in done):
            return
    log.warning("forge: some LoRA experts lack their audit event; retried at the next start")


async def startup(ctx: Context) -> None:
    # In the background: the llm service must register now, not after memory and the kernel answer.
    ctx.state[INCARNATION_TASK] = asyncio.create_task(_incarnation_loop(ctx), name="forge-incarnation")


async def shutdown(ctx: Context) -> None:
    task = ctx.state.pop(INCARNATION_TASK, None)
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    image = ctx.state.pop(IMAGE, None)
    if image is not None:
        await image.close()
