"""Table 1 dispatch: every kernel command is a typed request (proto.bodies.kernel) and the Table 1 object it
stands for, and one table per kind says who handles it.

A console convenience (`ask`, `send`, `search`...) arrives typed and its Table 1 object is written by
``proto.bodies.kernel.table1_of``; a raw ``command {Table 1}`` is read back into the convenience it stands for by
:func:`request_of` (its arguments checked by that convenience's type), so both paths behave the same:

    command                    mission_brief.type   what runs                       selector / args / kwargs
    initiate_cognitive_cycle   query                a question cycle (query.py)     ask / [question] / {persona?}
    initiate_cognitive_cycle   message              send: found method or DNU       SELECTOR / args / kwargs
    initiate_cognitive_cycle   unhandled_message    (the same as message: a found   SELECTOR / args / kwargs
                                                    method runs, a missing one is generated)
    initiate_cognitive_cycle   define_method        define (dnu.py)                 SELECTOR / [source] / {}
    initiate_cognitive_cycle   display_yourself     two-cycle genesis (genesis.py)  display_yourself / [] / {}
    ingest | search | inspect | stats | status | trace | audit | forge | verify   relays.py   (args / kwargs as below)
    watch                      -                    watch.py: events only, until       [] (everything) or [ID]
                                                    cancelled (or ID's end)            (an activity or cycle)

Every command but the read-only lookups (``QUIET``) is an *activity* the watch hub hears: dispatch taps its emit,
so any console's ``watch`` sees its begin, every event its requester gets, and its end (watch.py).

``target_oid`` is the object the command is about ("0" = the root); ``schema_version`` is checked by proto.
Replies are typed too: a cycle's reply body becomes its contract type (:func:`typed`) with ``status`` one of the
``Status`` values, and the worker runtime encodes it once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec

from batos.errors import ServiceError
from batos.uvm import normalize_oid
from proto import ErrorCode
from proto.bodies import kernel as K
from proto.bodies.kernel import Table1Command
from proto.contract import Call, Reply
from services.kernel import dnu, genesis, relays, watch
from services.kernel.env import Emit
from services.kernel.query import answered
from services.kernel.run import CycleRun, typed

if TYPE_CHECKING:
    from services.kernel.kernel import Kernel

CYCLE = K.CYCLE
# Read-only lookups are not activities: watching is about work in flight, and a console hammering `search`
# would drown everything else a watcher sees. `watch` itself is never watched (it would watch itself).
QUIET = frozenset({"watch", "status", "search", "inspect", "stats", "trace"})
# what a watcher is told of a mission, by the console command it came from
_MISSION_NAMES = {"query": "ask", "message": "send", "unhandled_message": "send", "define_method": "define"}

Relay = Callable[["Kernel", Emit, Any], Awaitable[Reply]]
Mission = Callable[["Kernel", Emit, Any, Table1Command], Awaitable[Reply]]


def request_of(cmd: Table1Command) -> Call[Any]:
    """The convenience a raw Table 1 object stands for (proto.bodies.kernel.request_of), refused as bad_args
    naming the field when its arguments break that convenience's type."""
    try:
        return K.request_of(cmd)
    except (msgspec.ValidationError, ValueError) as e:
        raise ServiceError(ErrorCode.BAD_ARGS, f"{_name(cmd)}: {e}") from None


def _check_depth(cmd: Table1Command) -> None:
    """Arguments nested deeper than any command needs are ``bad_args`` here, before any handler (or the
    sandbox's JSON copy, or memory's filters) meets them (issue 13: they used to end as ``internal``)."""
    stack: list[tuple[Any, int]] = [(cmd.mission_brief.args, 1), (cmd.mission_brief.kwargs, 1)]
    while stack:
        obj, depth = stack.pop()
        if depth > dnu.ARGS_MAX_DEPTH:
            raise ServiceError(ErrorCode.BAD_ARGS, f"{cmd.command}: arguments nest deeper than "
                                                   f"{dnu.ARGS_MAX_DEPTH} levels")
        children = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else ()
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))


def mission_of(cmd: Table1Command) -> dict[str, Any]:
    return msgspec.to_builtins(cmd)


# -- cognitive cycles ----------------------------------------------------------------------------


async def _query(kernel: Kernel, emit: Emit, req: K.Ask, cmd: Table1Command) -> K.AnswerReply:
    question = " ".join(req.question.split())  # K.Ask has checked it: not blank, at most MAX_QUESTION_CHARS
    persona = req.persona or "ROBIN"
    run = CycleRun(kernel.env, emit, mission_type="query", mission=mission_of(cmd), target_oid=req.oid,
                   persona=persona)
    return await answered(run, question, persona=persona)


async def _message(kernel: Kernel, emit: Emit, req: K.Send, cmd: Table1Command) -> K.SendReply:
    return typed(K.SendReply, await dnu.send(kernel.env, emit, mission_of(cmd), req.oid, req.selector,
                                             req.args, req.kwargs))


async def _define(kernel: Kernel, emit: Emit, req: K.Define, cmd: Table1Command) -> K.DefineReply:
    return typed(K.DefineReply, await dnu.define(kernel.env, emit, mission_of(cmd), req.oid, req.selector,
                                                 req.source))


async def _display(kernel: Kernel, emit: Emit, req: K.DisplayYourself, cmd: Table1Command) -> K.DisplayReply:
    return await genesis.display_yourself(kernel.env, emit, mission_of(cmd), cmd.target_oid)


async def _watch(kernel: Kernel, emit: Emit, req: K.Watch) -> K.WatchReply:
    return await watch.watch(kernel, emit, req.id.strip().lower())


MISSIONS: dict[type[Call[Any]], Mission] = {
    K.Ask: _query,
    K.Send: _message,
    K.Define: _define,
    K.DisplayYourself: _display,
}

COMMANDS: dict[type[Call[Any]], Relay] = {
    K.Ingest: relays.ingest,
    K.Search: relays.search,
    K.Inspect: relays.inspect,
    K.Stats: relays.stats,
    K.Verify: relays.verify,
    K.KernelStatus: relays.status,
    K.Trace: relays.trace,
    K.Audit: relays.audit,
    K.Forge: relays.forge,
    K.Watch: _watch,
}


async def dispatch(kernel: Kernel, emit: Emit, body: Call[Any]) -> Reply:
    """Run one kernel request: a raw Table 1 object, or a convenience (then its Table 1 object is written here: a
    cycle records it as its mission, a watcher is told its name and what it is about). Bad input is a
    ServiceError naming what is wrong."""
    if isinstance(body, Table1Command):
        _check_depth(body)
        return await _run(kernel, emit, request_of(body), body)
    cmd = K.table1_of(body)
    _check_depth(cmd)
    return await _run(kernel, emit, body, cmd)


async def _run(kernel: Kernel, emit: Emit, req: Call[Any], cmd: Table1Command) -> Reply:
    if hasattr(req, "oid"):
        try:
            oid = normalize_oid(req.oid)
        except ValueError as e:
            raise ServiceError(ErrorCode.BAD_ARGS, str(e)) from None
        req.oid = oid
        cmd = msgspec.structs.replace(cmd, target_oid=oid)
    mission = MISSIONS.get(type(req))
    relay = COMMANDS.get(type(req))

    async def run(tapped: Emit) -> Reply:
        if mission is not None:
            return await mission(kernel, tapped, req, cmd)
        if relay is None:
            raise ServiceError(ErrorCode.UNKNOWN_COMMAND, f"the kernel has no command {type(req).__name__}")
        return await relay(kernel, tapped, req)

    if cmd.command in QUIET:
        return await run(emit)
    return await _watched(kernel, emit, cmd, run)


def _name(cmd: Table1Command) -> str:
    """What a console calls the command (ask, send...), or the Table 1 command's own name."""
    return _MISSION_NAMES.get(cmd.mission_brief.type, cmd.mission_brief.type) if cmd.command == CYCLE else cmd.command


async def _watched(kernel: Kernel, emit: Emit, cmd: Table1Command,
                   run: Callable[[Emit], Awaitable[Reply]]) -> Reply:
    """Run a command as an activity of the watch hub: its begin, every event, its end."""
    hub = watch.hub_of(kernel.env)
    tapped, activity = hub.tap(emit, _name(cmd), about=_about(cmd), by=_requester(emit))
    try:
        reply = await run(tapped)
    except ServiceError as e:
        hub.end(activity, {"ok": False, "code": str(e.code), "message": e.message})
        raise
    except asyncio.CancelledError:
        hub.end(activity, {"ok": False, "code": str(ErrorCode.CANCELLED),
                           "message": "cancelled by its requester or by shutdown"})
        raise
    except Exception as e:
        hub.end(activity, {"ok": False, "code": str(ErrorCode.INTERNAL), "message": type(e).__name__})
        raise
    # a reply may report its own failure (a forge run that failed, verify's problems)
    ok = getattr(reply, "ok", None)
    hub.end(activity, {**_outcome(reply), "ok": ok if isinstance(ok, bool) else True})
    return reply


_ABOUT_CHARS = 200
_OUTCOME_CHARS = 600


def _about(cmd: Table1Command) -> str:
    """A watcher's one-line idea of what was asked."""
    brief = cmd.mission_brief
    if cmd.command == CYCLE and brief.type in ("message", "unhandled_message", "define_method"):
        return f"{cmd.target_oid} {brief.selector}"
    first = next((a for a in brief.args if isinstance(a, str)), "")
    return " ".join(first.split())[:_ABOUT_CHARS]


def _requester(emit: Emit) -> str:
    """Who asked, as a tag: the worker runtime's emit is a bound method of the request, which knows its sender."""
    sender = getattr(getattr(emit, "__self__", None), "sender", "")
    return watch.requester_tag(sender) if isinstance(sender, str) else ""


def _outcome(reply: Reply) -> dict[str, Any]:
    """What a watcher is told of a reply: its plain values, the answer's start, and how many of each list."""
    out: dict[str, Any] = {}
    for key, value in list(msgspec.structs.asdict(reply).items())[:40]:
        if key in ("ok", "event", "activity", "command"):
            continue
        if isinstance(value, bool | int | float) or value is None:
            out[key] = value
        elif isinstance(value, str):
            out[key] = value[:_OUTCOME_CHARS]
        elif isinstance(value, list):
            out[f"{key}_count"] = len(value)
    return out
