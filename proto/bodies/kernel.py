"""The ``kernel`` service's bodies (services/kernel): Table 1, the console's commands, and their replies.

Table 1 (the blueprint's console command schema) is the request of ``kernel.command``. Each console convenience
(``ask``, ``send``, ``search``...) is a request type of its own, and each stands for one Table 1 object:
:func:`table1_of` writes that object, :func:`request_of` reads a Table 1 object back into the convenience it
stands for, so a raw ``{...}`` object and the convenience obey the same argument rules (these types, checked by
msgspec, errors naming the field) wherever they are checked: in the console before sending, in the kernel's
worker at the boundary.

    command                    mission_brief.type   convenience       selector / args / kwargs
    initiate_cognitive_cycle   query                Ask               ask / [question] / {persona?}
    initiate_cognitive_cycle   message              Send              SELECTOR / args / kwargs
    initiate_cognitive_cycle   unhandled_message    Send              (the same: a missing method is generated)
    initiate_cognitive_cycle   define_method        Define            SELECTOR / [source] / {}
    initiate_cognitive_cycle   display_yourself     DisplayYourself   display_yourself / [] / {}
    ingest | search | trace | forge | watch         the command's     its first field as args[0], the rest as
    inspect | stats | status | audit | verify       own type          kwargs; target_oid is the ``oid`` of those
                                                                      that have one (ask, send, define, inspect)

``kernel.command`` answers with the reply of the convenience its object stands for (:func:`reply_type`). A relayed
command takes and answers with its service's own types where the console may send what the service takes
(``ingest``, ``verify``), and answers with them where it narrows the request (``search``, ``inspect``). Requests leave
out the fields at their defaults on the wire (the receiver's type supplies the same default).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec

from batos import personas
from batos.audit import AuditEventStruct
from batos.audit import Status as Status  # a cycle's outcome, as Table 3 spells it (SUCCESS, SUCCESS_DEGRADED)
from proto.bodies import ingest, llm, memory
from proto.bodies.broker import WorkerTable
from proto.bodies.runtime import Status as RuntimeStatus
from proto.bodies.runtime import StatusReply
from proto.contract import Call, Reply, command, specs
from proto.schema import TABLE1_SCHEMA_VERSION, ErrorCode, ProtocolError

if TYPE_CHECKING:  # generated from the pydantic model at import (batos/audit.py): a class mypy cannot see
    Table3Event = msgspec.Struct
else:
    Table3Event = AuditEventStruct

CYCLE = "initiate_cognitive_cycle"
MAX_QUESTION_CHARS = 4000
MAX_SOURCE_CHARS = 256 * 1024  # a method is a few lines; the console refuses larger files before reading them

Identifier = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*\Z", max_length=128)]
HexId = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-fA-F-]{4,64}\Z")]  # a cycle or activity id, or its start
Oid = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]  # "0", "0x1a", "26": batos.uvm.normalize_oid
Text = Annotated[str, msgspec.Meta(pattern=r"\S")]  # not empty, not only blanks


# -- Table 1 ---------------------------------------------------------------------------------------------------


class MissionBrief(msgspec.Struct, forbid_unknown_fields=True):
    type: str
    selector: str
    args: list[Any]
    kwargs: dict[str, Any]


@command("kernel", "command")
class Table1Command(Call[Reply]):
    """Table 1 of the blueprint. ``schema_version`` is ours: the schema is versioned."""

    command: str
    target_oid: str
    mission_brief: MissionBrief
    schema_version: int = TABLE1_SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.schema_version != TABLE1_SCHEMA_VERSION:
            raise ValueError(f"Table 1 schema_version {self.schema_version} != {TABLE1_SCHEMA_VERSION}")


def parse_table1(obj: Any) -> Table1Command:
    """A Table 1 object, or ProtocolError(BAD_ARGS) naming what is wrong."""
    try:
        return msgspec.convert(obj, Table1Command)
    except msgspec.ValidationError as e:
        raise ProtocolError(ErrorCode.BAD_ARGS, f"malformed Table 1 command: {e}") from e


# -- replies ---------------------------------------------------------------------------------------------------


class Citation(msgspec.Struct, kw_only=True):
    """A piece of evidence an answer cites (or that REASONING also retrieved)."""

    label: str = ""
    oid: str = ""
    file_path: str = ""
    start_line: int | None = None
    end_line: int | None = None
    node_name: str = ""
    where: str = ""


class CycleReply(Reply, kw_only=True):
    """A cognitive cycle's reply; a cycle that FAILED is an error reply, never one of these."""

    cycle_id: str
    status: Status
    timing: dict[str, Any] = {}


class AnswerReply(CycleReply, kw_only=True):
    """``ask``: the validated answer (answer.py, query.py); every field but ``reason`` is always sent."""

    answer: str
    citations: list[Citation]
    also_retrieved: list[Citation]
    notes: list[str]
    evidence: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    rewritten: bool  # the answer is not the text that was streamed
    model_text: str
    reason: str = ""  # why SUCCESS_DEGRADED
    steps: int
    thoughts: int
    stop: str
    fallback: str | None
    persona: str
    query_morph: str
    prompt_budget: dict[str, Any]


class SendReply(CycleReply, kw_only=True):
    """``send``: a found method's result, or a generated one's (``generated``, ``method_source``)."""

    result: Any = None
    kind: str = "method"  # "method", or the kind of a slot or builtin that answered
    generated: bool = False
    method_version: int | None = None
    method_source: str | None = None
    stdout: str = ""
    slot_updates: list[str] = []
    context: list[str] = []
    attempts: int = 0


class DefineReply(CycleReply, kw_only=True):
    oid: str
    selector: str
    version: int
    params: list[str] = []


class DisplayReply(CycleReply, kw_only=True):
    """``display_yourself``: cycle 2's answer; ``cycle_ids`` holds both cycles (genesis.py)."""

    answer: str
    cycle_ids: list[str] = []
    plan_cycle_id: str = ""
    parent_cycle: str = ""
    meta_prompt: str = ""
    plan_status: Status | None = None
    citations: list[Citation] = []
    notes: list[str] = []


class CycleCounts(msgspec.Struct, kw_only=True):
    total: int
    unfinished: int


class StatsReply(memory.StatsReply, kw_only=True):
    """memory's figures and the kernel's cycles."""

    cycles: CycleCounts


class TraceReply(Reply, kw_only=True):
    cycle: dict[str, Any]
    events: list[dict[str, Any]] = []
    notes: list[str] = []
    next: str | None = None  # the page cursor: the same request with ``after: next`` gives the next page


class AuditReply(Reply, kw_only=True):
    ingest: dict[str, Any] = {}
    log: dict[str, Any] = {}
    recent: list[dict[str, Any]] = []


class ForgeReply(Reply, kw_only=True):
    """The forge service's preparation (its ``run`` reply, less the instruction it hands the steward) and the
    steward's run as the kernel followed it (forge_follow.py)."""

    persona: str
    ok: bool
    instruction_id: str
    dataset: llm.DatasetInfo
    counts: llm.CurationCounts
    script: llm.ScriptChoice
    reason: str | None = None
    returncode: int | None = None
    expert: str | None = None
    expert_oid: str | None = None
    seconds: float | None = None
    restarted: bool | None = None
    metrics: dict[str, Any] | None = None
    activated: bool = False
    decision: str | None = None
    decision_reason: str | None = None
    events: int = 0  # the steward's events relayed


class WatchReply(Reply, kw_only=True):
    """How a watch of one activity or cycle ended (a watch of everything ends only when cancelled)."""

    watched: str = ""
    kind: str = ""
    command: str = ""
    state: str | None = None
    missed: int = 0
    note: str | None = None
    ok: bool | None = None
    code: str | None = None
    message: str | None = None
    status: str | None = None


class ActiveCycle(msgspec.Struct, kw_only=True):
    cycle_id: str
    state: str | None
    mission_type: str
    persona: str
    age_s: float


class KernelInfo(msgspec.Struct, kw_only=True):
    instance: str
    uptime_s: float
    active_cycles: list[ActiveCycle] = []
    autotelic: dict[str, Any] = {}
    recovered_at_start: list[str] = []
    sandbox_available: bool | None = None
    audit_log: dict[str, Any] = {}


class KernelState(Reply, kw_only=True):
    """What a Table 1 ``status`` object answers: the kernel's own view (``kernel.status`` adds the runtime's)."""

    broker: WorkerTable | None = None  # the broker's worker table
    broker_error: str | None = None  # why there is none
    kernel: KernelInfo | Literal["starting"] | None = None  # "starting" while the kernel wakes


class KernelStatusReply(StatusReply, kw_only=True):
    """The runtime's ``status`` with the kernel's view (KernelState's fields: msgspec structs take fields from one
    base only)."""

    broker: WorkerTable | None = None
    broker_error: str | None = None
    kernel: KernelInfo | Literal["starting"] | None = None


class AuditEventReply(Reply, kw_only=True):
    logged: bool
    event_id: str
    event_type: str
    cycle_id: str


# -- requests --------------------------------------------------------------------------------------------------


def _persona(value: str | None) -> str | None:
    """The canonical persona name (batos.personas: the one list), or ValueError naming the choices."""
    if value is None:
        return None
    try:
        return personas.normalize(value)
    except personas.UnknownPersona as e:
        raise ValueError(str(e)) from None


@command("kernel", "ask")
class Ask(Call[AnswerReply], omit_defaults=True):
    question: Annotated[str, msgspec.Meta(pattern=r"\S", max_length=MAX_QUESTION_CHARS)]
    persona: str | None = None  # ROBIN answers when none is named
    oid: Oid = "0"  # the object the question is about

    def __post_init__(self) -> None:
        self.persona = _persona(self.persona)


@command("kernel", "send")
class Send(Call[SendReply], omit_defaults=True):
    oid: Oid
    selector: Identifier
    args: list[Any] = []
    kwargs: dict[str, Any] = {}


@command("kernel", "define")
class Define(Call[DefineReply], omit_defaults=True):
    oid: Oid
    selector: Identifier
    source: Annotated[str, msgspec.Meta(pattern=r"\S", max_length=MAX_SOURCE_CHARS)]


@command("kernel", "display_yourself")
class DisplayYourself(Call[DisplayReply], omit_defaults=True):
    pass


@command("kernel", "ingest")
class Ingest(ingest.Ingest, omit_defaults=True):
    """The ingest service's own request (and reply), relayed: its path is absolute (the kernel and the ingestor
    run elsewhere, in another working directory), and progress events go to the requester."""


@command("kernel", "search")
class Search(Call[memory.SearchReply], omit_defaults=True):
    """memory's search as a console may ask it: text only, at most 100 hits, code and summaries (not the audit
    history); answered with memory's own reply."""

    text: Text
    k: Annotated[int, msgspec.Meta(ge=1, le=100)] = 8
    level: memory.SearchLevel = "both"
    filters: memory.Filters | None = None
    within: list[str] | None = None
    after: str | None = None  # the page cursor a previous reply's ``next`` gave


@command("kernel", "inspect")
class Inspect(Call[memory.InspectReply], omit_defaults=True):
    oid: Oid


@command("kernel", "stats")
class Stats(Call[StatsReply], omit_defaults=True):
    pass


@command("kernel", "trace")
class Trace(Call[TraceReply], omit_defaults=True):
    cycle_id: HexId
    after: str | None = None


@command("kernel", "audit")
class Audit(Call[AuditReply], omit_defaults=True):
    pass


@command("kernel", "forge")
class Forge(llm.ForgeRun, omit_defaults=True):
    """The forge service's own ``run`` request (and its options), relayed; then the steward's upgrade."""


@command("kernel", "verify")
class Verify(memory.Verify, omit_defaults=True):
    """memory's own request and reply, relayed."""


@command("kernel", "watch")
class Watch(Call[WatchReply], omit_defaults=True):
    # nothing: everything; else one activity or cycle (its first characters will do)
    id: Annotated[str, msgspec.Meta(pattern=r"^([0-9a-fA-F-]{4,64})?\Z")] = ""


@command("kernel", "status")
class KernelStatus(RuntimeStatus, Call[KernelStatusReply]):
    pass


@command("kernel", "audit_event")
class AuditEvent(Call[AuditEventReply]):
    """A Table 3 event from another process (the forge worker); the kernel is the audit log's one writer.

    ``event`` is checked against ``batos.audit.AuditEventStruct`` (generated from the pydantic model: Table 3's one
    definition) and kept as sent: the Struct would drop ``event_data``'s extra keys, which Table 3 allows."""

    event: dict[str, Any]

    def __post_init__(self) -> None:
        msgspec.convert(self.event, Table3Event)


# -- Table 1 <-> the conveniences ------------------------------------------------------------------------------

MISSIONS: dict[str, type[Call[Any]]] = {
    "query": Ask, "message": Send, "unhandled_message": Send, "define_method": Define,
    "display_yourself": DisplayYourself,
}
COMMANDS: dict[str, type[Call[Any]]] = {
    "ingest": Ingest, "search": Search, "inspect": Inspect, "stats": Stats, "status": KernelStatus,
    "trace": Trace, "audit": Audit, "forge": Forge, "verify": Verify, "watch": Watch,
}
# the field a Table 1 object's args[0] fills (the rest come from kwargs)
_FIRST: dict[type[Call[Any]], str] = {Ask: "question", Define: "source", Ingest: "path", Search: "text",
                                      Trace: "cycle_id", Forge: "persona", Watch: "id"}
_MISSION_OF: dict[type[Call[Any]], str] = {Ask: "query", Send: "message", Define: "define_method",
                                           DisplayYourself: "display_yourself"}
KernelCall = Ask | Send | Define | DisplayYourself | Ingest | Search | Inspect | Stats | KernelStatus | Trace | \
    Audit | Forge | Verify | Watch


def request_type(cmd: Table1Command) -> type[Call[Any]]:
    """The convenience a Table 1 object stands for; ValueError naming the known ones."""
    if cmd.command == CYCLE:
        kind = MISSIONS.get(cmd.mission_brief.type)
        if kind is None:
            raise ValueError(f"unknown mission_brief.type {cmd.mission_brief.type!r}; known: {', '.join(MISSIONS)}")
        return kind
    kind = COMMANDS.get(cmd.command)
    if kind is None:
        raise ValueError(f"unknown Table 1 command {cmd.command!r}; known: {', '.join([CYCLE, *COMMANDS])}")
    return kind


def reply_type(cmd: Table1Command) -> type[Reply]:
    """What ``kernel.command`` answers for this object: the reply of the convenience it stands for."""
    kind = request_type(cmd)
    if kind is KernelStatus:  # the worker runtime's own fields come only with the runtime's `status`
        return KernelState
    return next(s.reply for s in specs() if s.request is kind)


def request_of(cmd: Table1Command) -> Call[Any]:
    """The convenience request a Table 1 object stands for, checked by its type.

    Raises msgspec.ValidationError naming the field (``$.question``), or ValueError for an unknown command."""
    kind = request_type(cmd)
    brief = cmd.mission_brief
    fields = set(kind.__struct_fields__)
    body: dict[str, Any] = {}
    if kind is Send:
        body = {"selector": brief.selector, "args": brief.args, "kwargs": brief.kwargs}
    else:
        if "selector" in fields:
            body["selector"] = brief.selector
        first = _FIRST.get(kind)
        if len(brief.args) > (1 if first else 0):
            raise msgspec.ValidationError(f"{cmd.command} takes at most {1 if first else 0} positional argument"
                                          f"{'s' if not first else ''} - at `$.mission_brief.args`")
        if first and brief.args:
            body[first] = brief.args[0]
        body.update(brief.kwargs)
    if "oid" in fields:
        body["oid"] = cmd.target_oid
    call: Call[Any] = msgspec.convert(body, kind)
    return call


def table1_of(req: Call[Any]) -> Table1Command:
    """The Table 1 object a convenience request stands for (what a cycle records as its mission)."""
    kind = type(req)
    values = {f: getattr(req, f) for f in kind.__struct_fields__}
    target = str(values.pop("oid", "0"))
    if kind in _MISSION_OF:
        mission = _MISSION_OF[kind]
        selector = str(values.pop("selector", "ask" if kind is Ask else mission))
        if kind is Send:
            return _table1(CYCLE, target, mission, selector, values["args"], values["kwargs"])
        first = _FIRST.get(kind)
        args = [values.pop(first)] if first else []
        return _table1(CYCLE, target, mission, selector, args, _set(kind, values))
    name = next(n for n, t in COMMANDS.items() if t is kind)
    first = _FIRST.get(kind)
    value = values.pop(first, None) if first else None
    return _table1(name, target, name, name, [value] if value else [], _set(kind, values))


def _set(kind: type[Call[Any]], values: dict[str, Any]) -> dict[str, Any]:
    """Only the options given: a field at its default is what the receiver assumes anyway."""
    defaults = {f.name: f.default for f in msgspec.structs.fields(kind) if f.default is not msgspec.NODEFAULT}
    return {k: v for k, v in values.items() if k not in defaults or v != defaults[k]}


def _table1(name: str, target: str, kind: str, selector: str, args: list[Any], kwargs: dict[str, Any]) -> Table1Command:
    return Table1Command(command=name, target_oid=target,
                         mission_brief=MissionBrief(type=kind, selector=selector, args=list(args), kwargs=dict(kwargs)))

