"""Table 1 dispatch: every kernel command is a Table 1 object, and one table says who handles it.

The console's conveniences (`ask`, `send`, `search`...) are turned into Table 1 objects by :func:`from_console`
and dispatched exactly like a raw ``command {Table 1}``, so both paths behave the same:

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
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec

import proto
from batos.errors import ServiceError
from batos.uvm import normalize_oid
from proto import ErrorCode, MissionBrief, Table1Command
from services.kernel import dnu, genesis, relays, watch
from services.kernel.env import Emit
from services.kernel.query import check_question, run_query
from services.kernel.run import CycleRun, execute

if TYPE_CHECKING:
    from services.kernel.kernel import Kernel

CYCLE = "initiate_cognitive_cycle"
_WATCH_ID = re.compile(r"^[0-9a-f-]{4,64}$")
# Read-only lookups are not activities: watching is about work in flight, and a console hammering `search`
# would drown everything else a watcher sees. `watch` itself is never watched (it would watch itself).
QUIET = frozenset({"watch", "status", "search", "inspect", "stats", "trace"})
# what a watcher is told of a mission, by the console command it came from
_MISSION_NAMES = {"query": "ask", "message": "send", "unhandled_message": "send", "define_method": "define"}

Handler = Callable[["Kernel", Emit, Table1Command], Awaitable[dict[str, Any]]]


def table1(command: str, *, target_oid: str = "0", type: str = "", selector: str = "",
           args: list[Any] | None = None, kwargs: dict[str, Any] | None = None) -> Table1Command:
    return Table1Command(command=command, target_oid=target_oid,
                         mission_brief=MissionBrief(type=type or command, selector=selector or type or command,
                                                    args=list(args or []), kwargs=dict(kwargs or {})))


def _need(args: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = args.get(name)
    if value is None or not isinstance(value, kind):
        raise ServiceError(ErrorCode.BAD_ARGS, f"missing or malformed argument {name!r}")
    return value


def from_console(command: str, args: dict[str, Any]) -> Table1Command:
    """The Table 1 object a console convenience stands for."""
    match command:
        case "ask":
            kw = {"persona": args["persona"]} if args.get("persona") else {}
            return table1(CYCLE, target_oid=str(args.get("oid", "0")), type="query", selector="ask",
                          args=[_need(args, "question", str)], kwargs=kw)
        case "send":
            return table1(CYCLE, target_oid=_need(args, "oid", str), type="message",
                          selector=_need(args, "selector", str), args=args.get("args") or [],
                          kwargs=args.get("kwargs") or {})
        case "define":
            return table1(CYCLE, target_oid=_need(args, "oid", str), type="define_method",
                          selector=_need(args, "selector", str), args=[_need(args, "source", str)])
        case "display_yourself":
            return table1(CYCLE, type="display_yourself")
        case "ingest":
            kw = {k: args[k] for k in ("max_chunk_tokens",) if args.get(k) is not None}
            return table1("ingest", args=[_need(args, "path", str)], kwargs=kw)
        case "search":
            kw = {k: args[k] for k in ("k", "level", "filters", "within", "after") if args.get(k) is not None}
            return table1("search", args=[_need(args, "text", str)], kwargs=kw)
        case "inspect":
            return table1("inspect", target_oid=_need(args, "oid", str))
        case "trace":
            kw = {"after": args["after"]} if args.get("after") is not None else {}  # a page cursor (batos.paging)
            return table1("trace", args=[_need(args, "cycle_id", str)], kwargs=kw)
        case "forge":
            return table1("forge", args=[_need(args, "persona", str)])
        case "stats" | "status" | "audit":
            return table1(command)
        case "verify":
            return table1("verify", kwargs={"repair": bool(args.get("repair"))})
        case "watch":
            ident = args.get("id")
            return table1("watch", args=[ident] if ident else [])
    raise ServiceError(ErrorCode.UNKNOWN_COMMAND, f"kernel has no console command {command!r}")


def parse(body: dict[str, Any]) -> Table1Command:
    try:
        return proto.parse_table1(body)
    except proto.ProtocolError as e:
        raise ServiceError(e.code, e.message) from None


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


async def _query(kernel: Kernel, emit: Emit, cmd: Table1Command) -> dict[str, Any]:
    brief = cmd.mission_brief
    question = check_question(brief.args[0] if brief.args else brief.kwargs.get("question"))
    persona = relays.persona_arg(brief.kwargs.get("persona", "ROBIN"))
    run = CycleRun(kernel.env, emit, mission_type="query", mission=mission_of(cmd), target_oid=cmd.target_oid,
                   persona=persona)
    return await execute(run, lambda r: run_query(r, question, persona=persona))


async def _message(kernel: Kernel, emit: Emit, cmd: Table1Command) -> dict[str, Any]:
    brief = cmd.mission_brief
    return await dnu.send(kernel.env, emit, mission_of(cmd), cmd.target_oid, brief.selector, list(brief.args),
                          dict(brief.kwargs))


async def _define(kernel: Kernel, emit: Emit, cmd: Table1Command) -> dict[str, Any]:
    brief = cmd.mission_brief
    source = brief.args[0] if brief.args else brief.kwargs.get("source")
    return await dnu.define(kernel.env, emit, mission_of(cmd), cmd.target_oid, brief.selector, source)


async def _display(kernel: Kernel, emit: Emit, cmd: Table1Command) -> dict[str, Any]:
    return await genesis.display_yourself(kernel.env, emit, mission_of(cmd), cmd.target_oid)


async def _watch(kernel: Kernel, emit: Emit, cmd: Table1Command) -> dict[str, Any]:
    brief = cmd.mission_brief
    ident = brief.args[0] if brief.args else brief.kwargs.get("id", "")
    if not isinstance(ident, str) or (ident and not _WATCH_ID.match(ident.strip().lower())):
        raise ServiceError(ErrorCode.BAD_ARGS, f"watch takes nothing or an activity or cycle id (hex), not {ident!r}")
    return await watch.watch(kernel, emit, ident.strip().lower())


MISSIONS: dict[str, Handler] = {
    "query": _query,
    "message": _message,
    "unhandled_message": _message,
    "define_method": _define,
    "display_yourself": _display,
}

COMMANDS: dict[str, Handler] = {
    "ingest": relays.ingest,
    "search": relays.search,
    "inspect": relays.inspect,
    "stats": relays.stats,
    "verify": relays.verify,
    "status": relays.status,
    "trace": relays.trace,
    "audit": relays.audit,
    "forge": relays.forge,
    "watch": _watch,
}


async def dispatch(kernel: Kernel, emit: Emit, cmd: Table1Command) -> dict[str, Any]:
    """Run one validated Table 1 command; bad input is a ServiceError naming what was wrong."""
    _check_depth(cmd)
    try:
        target = normalize_oid(cmd.target_oid)
    except ValueError as e:
        raise ServiceError(ErrorCode.BAD_ARGS, str(e)) from None
    if target != cmd.target_oid:
        cmd = msgspec.structs.replace(cmd, target_oid=target)
    if cmd.command == CYCLE:
        handler = MISSIONS.get(cmd.mission_brief.type)
        if handler is None:
            raise ServiceError(ErrorCode.BAD_ARGS, f"unknown mission_brief.type {cmd.mission_brief.type!r}; "
                                                   f"known: {', '.join(MISSIONS)}")
    else:
        handler = COMMANDS.get(cmd.command)
        if handler is None:
            raise ServiceError(ErrorCode.BAD_ARGS, f"unknown Table 1 command {cmd.command!r}; known: "
                                                   f"{', '.join([CYCLE, *COMMANDS])}")
    if cmd.command in QUIET:
        return await handler(kernel, emit, cmd)
    return await _watched(kernel, emit, cmd, handler)


async def _watched(kernel: Kernel, emit: Emit, cmd: Table1Command, handler: Handler) -> dict[str, Any]:
    """Run ``handler`` as an activity of the watch hub: its begin, every event, its end."""
    hub = watch.hub_of(kernel.env)
    name = _MISSION_NAMES.get(cmd.mission_brief.type, cmd.mission_brief.type) if cmd.command == CYCLE else cmd.command
    tapped, activity = hub.tap(emit, name, about=_about(cmd), by=_requester(emit))
    try:
        reply = await handler(kernel, tapped, cmd)
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
    ok = reply.get("ok") if isinstance(reply, dict) else None
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


def _outcome(reply: dict[str, Any]) -> dict[str, Any]:
    """What a watcher is told of a reply: its plain values, the answer's start, and how many of each list."""
    out: dict[str, Any] = {}
    if not isinstance(reply, dict):  # the runtime sends a handler's other values as {"result": value}
        return out
    for key, value in list(reply.items())[:40]:
        if key in ("ok", "event", "activity", "command"):
            continue
        if isinstance(value, bool | int | float) or value is None:
            out[key] = value
        elif isinstance(value, str):
            out[key] = value[:_OUTCOME_CHARS]
        elif isinstance(value, list):
            out[f"{key}_count"] = len(value)
    return out
