"""The BAT OS wire contract: version, envelope, kinds, services, error codes (Table 1: proto/bodies/kernel.py).

Wire format: ZeroMQ multipart. A ROUTER prepends the peer identity frame; after the
identity frame(s) comes exactly one frame holding an ormsgpack-encoded map that
decodes into :class:`Envelope`. Decoding validates once, here, and raises
:class:`ProtocolError`; past this module code trusts its types.

A request gets any number of ``event`` messages (state transitions, progress,
reasoning steps, streamed tokens) and then exactly one ``reply`` or ``error``,
each carrying ``corr`` = the request's ``id``.
"""

from __future__ import annotations

import enum
import os
from typing import Annotated, Any, TypeVar

import msgspec
import ormsgpack

PROTOCOL_VERSION = 1
TABLE1_SCHEMA_VERSION = 1

# A frame larger than this is refused before it is decoded (protects every peer);
# ``settings.max_frame_bytes`` passes a smaller limit where a process has one.
MAX_FRAME_BYTES = 64 * 1024 * 1024
# Limits on what a frame may hold, checked at decode. msgspec and ormsgpack have no depth
# option: a 2 KB frame nested 2,000 deep raised RecursionError out of the decoder and killed
# the broker. Bodies may nest at most MAX_BODY_DEPTH containers (ormsgpack cannot encode
# deeper than ~255 anyway); names and ids are short strings.
MAX_BODY_DEPTH = 64
MAX_ID_CHARS = 128
MAX_NAME_CHARS = 128
MAX_WORKER_CAPACITY = 10_000


class Kind(enum.StrEnum):
    REQUEST = "request"
    REPLY = "reply"
    EVENT = "event"
    ERROR = "error"
    READY = "ready"  # worker -> broker: "I serve this service"
    HEARTBEAT = "heartbeat"
    DISCONNECT = "disconnect"  # either side: "I am going away"
    CANCEL = "cancel"  # client -> broker -> worker: stop request ``corr``


class Service(enum.StrEnum):
    BROKER = "broker"  # answered by the broker itself (ping, workers)
    KERNEL = "kernel"
    MEMORY = "memory"
    INGEST = "ingest"
    LLM = "llm"
    FORGE = "forge"
    STEWARD = "steward"


class ErrorCode(enum.StrEnum):
    BAD_FRAME = "bad_frame"  # not msgpack, not a map, wrong field types
    BAD_VERSION = "bad_version"
    BAD_KIND = "bad_kind"
    UNKNOWN_SERVICE = "unknown_service"  # no worker has ever registered it
    UNKNOWN_COMMAND = "unknown_command"
    BAD_ARGS = "bad_args"
    BUSY = "busy"  # a bounded queue is full
    WORKER_LOST = "worker_lost"  # the worker died holding a non-idempotent request
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    NOT_FOUND = "not_found"
    UNAVAILABLE = "unavailable"  # service known but not reachable / not landed
    CONFLICT = "conflict"
    REJECTED = "rejected"  # validation or policy refused the work (e.g. generated code)
    SANDBOX = "sandbox"  # generated code failed or was contained in the sandbox
    LLM_UNUSABLE = "llm_unusable"
    INTERNAL = "internal"
    UNAUTHORIZED = "unauthorized"
    TOO_LARGE = "too_large"  # a message over the frame limit (ask for less: page the query)


class ProtocolError(Exception):
    """A frame that cannot be accepted; ``partial`` holds what could be read of it."""

    def __init__(self, code: ErrorCode, message: str, partial: dict[str, Any] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.partial = partial or {}


Id = Annotated[str, msgspec.Meta(max_length=MAX_ID_CHARS)]
Name = Annotated[str, msgspec.Meta(max_length=MAX_NAME_CHARS)]


class Envelope(msgspec.Struct, kw_only=True, omit_defaults=True):
    v: int
    id: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_CHARS)]
    kind: Kind
    service: Name = ""
    command: Name = ""
    corr: Id = ""  # the request this message belongs to
    sender: Annotated[str, msgspec.Meta(max_length=1024)] = ""  # identity of the original requester
    idempotent: bool = False  # may the broker re-dispatch it if its worker dies?
    body: dict[str, Any] = msgspec.field(default_factory=dict)


def new_id() -> str:
    # 128 random bits as 32 hex digits, the format of uuid4().hex at less than half its cost
    return os.urandom(16).hex()


def encode(env: Envelope) -> bytes:
    # bytes stay msgpack bin (to_builtins would make them base64 text, a third larger)
    return ormsgpack.packb(msgspec.to_builtins(env, builtin_types=(bytes, bytearray, memoryview)),
                           option=ormsgpack.OPT_NON_STR_KEYS)


class EnvelopeHeader(msgspec.Struct, kw_only=True):
    """The routing part of an envelope: what the broker reads (it never interprets bodies)."""

    v: int
    id: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_CHARS)]
    kind: Kind
    service: Name = ""
    command: Name = ""
    corr: Id = ""
    idempotent: bool = False


class HeldRequest(msgspec.Struct, kw_only=True):
    """A request a (re-)registering worker is still running: the broker keeps routing its answer."""

    id: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_CHARS)]
    command: Name = ""
    client: Annotated[bytes, msgspec.Meta(min_length=1, max_length=255)]  # the requester's routing identity
    idempotent: bool = False


class ReadyBody(msgspec.Struct, kw_only=True):
    """What a worker announces in READY; typed so a hostile READY is refused, not crashed on."""

    capacity: Annotated[int, msgspec.Meta(ge=0, le=MAX_WORKER_CAPACITY)] | None = None
    version: Annotated[str, msgspec.Meta(max_length=MAX_NAME_CHARS)] = ""
    pid: Annotated[int, msgspec.Meta(ge=0, le=2**31)] = 0
    # requests it was running when it lost its broker (a broker restart): the new broker adopts them
    holding: Annotated[list[HeldRequest], msgspec.Meta(max_length=MAX_WORKER_CAPACITY)] = msgspec.field(
        default_factory=list)


class HeartbeatBody(msgspec.Struct, kw_only=True):
    draining: bool = False
    # how many of the worker's requests are waiting on another service's answer: they hold no slot
    waiting: Annotated[int, msgspec.Meta(ge=0, le=MAX_WORKER_CAPACITY * 100)] = 0


class _ReadyFrame(msgspec.Struct):
    body: ReadyBody = msgspec.field(default_factory=ReadyBody)


class _HeartbeatFrame(msgspec.Struct):
    body: HeartbeatBody = msgspec.field(default_factory=HeartbeatBody)


# msgspec decodes msgpack and validates types in one pass; the bytes are the same msgpack
# ormsgpack writes. The slow path below only runs to explain a frame that failed.
_envelope_decoder = msgspec.msgpack.Decoder(Envelope)
_header_decoder = msgspec.msgpack.Decoder(EnvelopeHeader)
_ready_decoder = msgspec.msgpack.Decoder(_ReadyFrame)
_heartbeat_decoder = msgspec.msgpack.Decoder(_HeartbeatFrame)
# RecursionError: msgspec (even when it only skips a field) recurses once per nesting level and
# stops at the interpreter's recursion limit; that is a malformed frame, not a crash. ValueError
# covers what msgspec lets through from Python itself (UnicodeDecodeError on a bad UTF-8 string,
# found by the fuzz test).
_DECODE_ERRORS = (msgspec.MsgspecError, ValueError, OverflowError, RecursionError)
# The first byte of every msgpack map or array header (fixmap, fixarray, array16/32, map16/32).
_CONTAINER_MARKS = bytes(range(0x80, 0xA0)) + b"\xdc\xdd\xde\xdf"
_DEPTH_SCAN_MAX = 1 << 20  # above this size the exact walk is cheaper than copying the frame


def _check_size(frame: bytes, max_bytes: int) -> None:
    if len(frame) > max_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"frame of {len(frame)} bytes exceeds the {max_bytes}-byte limit")


def decode(frame: bytes, max_bytes: int = MAX_FRAME_BYTES) -> Envelope:
    """Decode and validate one payload frame; raise ProtocolError, never anything else."""
    _check_size(frame, max_bytes)
    try:
        env = _envelope_decoder.decode(frame)
        if env.v != PROTOCOL_VERSION:
            env = _explain(frame)
    except _DECODE_ERRORS:
        env = _explain(frame)
    if not _depth_within(frame, env.body, MAX_BODY_DEPTH):
        raise ProtocolError(ErrorCode.BAD_FRAME, f"body nested deeper than {MAX_BODY_DEPTH} levels",
                            {"id": env.id, "service": env.service, "command": env.command})
    return env


def decode_header(frame: bytes, max_bytes: int = MAX_FRAME_BYTES) -> EnvelopeHeader:
    """Like :func:`decode` for routing only: the body is skipped, not validated."""
    _check_size(frame, max_bytes)
    return peek_header(frame)


def peek_header(frame: bytes) -> EnvelopeHeader:
    """The header of a frame of any size (the broker reads an oversized reply's ``corr`` with it)."""
    try:
        head = _header_decoder.decode(frame)
        if head.v == PROTOCOL_VERSION:
            return head
    except _DECODE_ERRORS:
        pass
    env = _explain(frame)
    return EnvelopeHeader(v=env.v, id=env.id, kind=env.kind, service=env.service, command=env.command,
                          corr=env.corr, idempotent=env.idempotent)


def decode_ready(frame: bytes) -> ReadyBody:
    """The typed body of a READY frame (already known to be a valid envelope)."""
    return _decode_body(_ready_decoder, frame, "READY").body


def decode_heartbeat(frame: bytes) -> HeartbeatBody:
    return _decode_body(_heartbeat_decoder, frame, "HEARTBEAT").body


_Frame = TypeVar("_Frame")


def _decode_body(decoder: msgspec.msgpack.Decoder[_Frame], frame: bytes, what: str) -> _Frame:
    try:
        return decoder.decode(frame)
    except _DECODE_ERRORS as e:
        raise ProtocolError(ErrorCode.BAD_ARGS, f"malformed {what} body: {_short(e)}") from None


def _short(e: BaseException) -> str:
    return "nested too deep" if isinstance(e, RecursionError) else str(e)[:200]


def _depth_within(frame: bytes, body: Any, limit: int) -> bool:
    """Whether ``body`` nests at most ``limit`` containers (itself counted as one)."""
    # A body cannot nest deeper than the containers the frame holds, and every container header
    # starts with one of a few byte values: counting them (in C) clears almost every frame.
    if len(frame) <= _DEPTH_SCAN_MAX and len(frame) - len(frame.translate(None, _CONTAINER_MARKS)) <= limit:
        return True
    stack: list[tuple[Any, int]] = [(body, 1)]
    while stack:
        obj, depth = stack.pop()
        children = obj.values() if type(obj) is dict else obj
        for child in children:
            if type(child) is dict or type(child) is list:
                if depth >= limit:
                    return False
                stack.append((child, depth + 1))
    return True


def _explain(frame: bytes) -> Envelope:
    """The slow path: find out what is wrong with a frame, keeping what can be read of it."""
    try:
        raw = ormsgpack.unpackb(frame)
    except Exception as e:  # ormsgpack raises MsgpackDecodeError / ValueError / TypeError (depth too)
        raise ProtocolError(ErrorCode.BAD_FRAME, f"not msgpack: {_short(e)}") from None
    if not isinstance(raw, dict):
        raise ProtocolError(ErrorCode.BAD_FRAME, f"envelope must be a map, got {type(raw).__name__}")
    partial = {k: v for k in ("id", "kind", "service", "command")
               if isinstance(v := raw.get(k), str) and 0 < len(v) <= MAX_ID_CHARS}
    if raw.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(
            ErrorCode.BAD_VERSION, f"protocol version {raw.get('v')!r} != {PROTOCOL_VERSION}", partial
        )
    kind = raw.get("kind")
    if not isinstance(kind, str) or kind not in Kind._value2member_map_:
        raise ProtocolError(ErrorCode.BAD_KIND, f"unknown kind {raw.get('kind')!r}", partial)
    try:
        return msgspec.convert(raw, Envelope)
    except (*_DECODE_ERRORS, TypeError) as e:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"invalid envelope: {_short(e)}", partial) from None


# -- what each command may do across a restart, and which commands never wait for a slot -------
#
# The one place that says so. ``retry_safe``: running the command twice does no harm (a read, or a
# write that lands the same state again: memory's writes are keyed by file and content hash, an
# ingest skips unchanged files, an LLM call of a cycle step is simply asked again and its partial
# output discarded). A request for one of these carries ``idempotent=True`` (set by :func:`request`),
# so the broker hands it to the next worker when its worker dies or restarts, and the client sends
# it again when the broker itself restarted. ``control``: cheap commands that must answer while a
# service's slots are all busy; the broker dispatches them past its capacity.

_ANY = "*"  # every service: the worker runtime's own commands
RETRY_SAFE: frozenset[tuple[str, str]] = frozenset({
    (_ANY, "ping"), (_ANY, "status"),
    *(("kernel", c) for c in ("search", "inspect", "stats", "trace", "help", "ingest", "verify", "audit", "watch")),
    *(("memory", c) for c in ("search", "inspect", "stats", "file_hashes", "audit_offset", "query_fractals",
                              "verify", "replace_files", "create_fractals", "delete_file")),
    ("ingest", "ingest"), ("ingest", "chunk"),
    *(("llm", c) for c in ("generate", "action", "count_tokens", "adapters", "info")),
})
CONTROL: frozenset[tuple[str, str]] = frozenset({
    (_ANY, "ping"), (_ANY, "status"),
    *(("kernel", c) for c in ("help", "inspect", "trace", "cancel", "stats", "watch")),
})


def retry_safe(service: str, command: str) -> bool:
    return (service, command) in RETRY_SAFE or (_ANY, command) in RETRY_SAFE


def is_control(service: str, command: str) -> bool:
    return (service, command) in CONTROL or (_ANY, command) in CONTROL


# -- constructors: every message in the system is made by one of these ---------------------


def request(
    service: str, command: str, body: dict[str, Any] | None = None, *, idempotent: bool | None = None, id: str = ""
) -> Envelope:
    """``idempotent``: None = what :data:`RETRY_SAFE` says; a caller may vouch for a command proto does not
    list (an extension service's), or opt out."""
    return Envelope(
        v=PROTOCOL_VERSION,
        id=id or new_id(),
        kind=Kind.REQUEST,
        service=service,
        command=command,
        idempotent=retry_safe(service, command) if idempotent is None else idempotent,
        body=body or {},
    )


def reply(req: Envelope | EnvelopeHeader, body: dict[str, Any] | None = None) -> Envelope:
    return Envelope(
        v=PROTOCOL_VERSION, id=new_id(), kind=Kind.REPLY, service=req.service, command=req.command,
        corr=req.id, sender=getattr(req, "sender", ""), body=body or {},
    )


def event(req: Envelope, name: str, data: dict[str, Any] | None = None) -> Envelope:
    """A streamed event; ``body = {"event": name, **data}``."""
    return Envelope(
        v=PROTOCOL_VERSION, id=new_id(), kind=Kind.EVENT, service=req.service, command=req.command,
        corr=req.id, sender=req.sender, body={"event": name, **(data or {})},
    )


def error(
    code: ErrorCode | str,
    message: str,
    *,
    corr: str = "",
    service: str = "",
    command: str = "",
    sender: str = "",
    details: dict[str, Any] | None = None,
) -> Envelope:
    body: dict[str, Any] = {"code": str(code), "message": message}
    if details:
        body["details"] = details
    return Envelope(
        v=PROTOCOL_VERSION, id=new_id(), kind=Kind.ERROR, service=service, command=command,
        corr=corr, sender=sender, body=body,
    )


def error_for(
    req: Envelope | EnvelopeHeader, code: ErrorCode | str, message: str, details: dict[str, Any] | None = None
) -> Envelope:
    return error(code, message, corr=req.id, service=req.service, command=req.command,
                 sender=getattr(req, "sender", ""), details=details)


def control(kind: Kind, *, service: str = "", corr: str = "", body: dict[str, Any] | None = None) -> Envelope:
    """READY, HEARTBEAT, DISCONNECT and CANCEL messages."""
    return Envelope(v=PROTOCOL_VERSION, id=new_id(), kind=kind, service=service, corr=corr, body=body or {})


# -- Table 1: the Architect's Console command schema ------------------------------------------
# Table 1 is the body of the kernel's ``command``: it lives with the kernel's other bodies in
# proto/bodies/kernel.py (Table1Command, MissionBrief, parse_table1), next to the typed commands each
# Table 1 object stands for. TABLE1_SCHEMA_VERSION above is its version.
