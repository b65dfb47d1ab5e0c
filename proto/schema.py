"""The BAT OS wire contract: version, envelope, kinds, services, error codes, Table 1.

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
from typing import Any

import msgspec
import ormsgpack

PROTOCOL_VERSION = 1
TABLE1_SCHEMA_VERSION = 1

# A frame larger than this is refused before it is decoded (protects every peer).
MAX_FRAME_BYTES = 64 * 1024 * 1024


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


class ProtocolError(Exception):
    """A frame that cannot be accepted; ``partial`` holds what could be read of it."""

    def __init__(self, code: ErrorCode, message: str, partial: dict[str, Any] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.partial = partial or {}


class Envelope(msgspec.Struct, kw_only=True, omit_defaults=True):
    v: int
    id: str
    kind: Kind
    service: str = ""
    command: str = ""
    corr: str = ""  # the request this message belongs to
    sender: str = ""  # identity of the original requester (set by the broker)
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
    id: str
    kind: Kind
    service: str = ""
    command: str = ""
    corr: str = ""
    idempotent: bool = False


# msgspec decodes msgpack and validates types in one pass; the bytes are the same msgpack
# ormsgpack writes. The slow path below only runs to explain a frame that failed.
_envelope_decoder = msgspec.msgpack.Decoder(Envelope)
_header_decoder = msgspec.msgpack.Decoder(EnvelopeHeader)


def decode(frame: bytes) -> Envelope:
    """Decode and validate one payload frame; raise ProtocolError, never anything else."""
    if len(frame) > MAX_FRAME_BYTES:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"frame of {len(frame)} bytes exceeds {MAX_FRAME_BYTES}")
    try:
        env = _envelope_decoder.decode(frame)
        if env.v == PROTOCOL_VERSION:
            return env
    except (msgspec.DecodeError, msgspec.ValidationError):
        pass
    return _explain(frame)


def decode_header(frame: bytes) -> EnvelopeHeader:
    """Like :func:`decode` for routing only: the body is skipped, not validated."""
    if len(frame) > MAX_FRAME_BYTES:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"frame of {len(frame)} bytes exceeds {MAX_FRAME_BYTES}")
    try:
        head = _header_decoder.decode(frame)
        if head.v == PROTOCOL_VERSION:
            return head
    except (msgspec.DecodeError, msgspec.ValidationError):
        pass
    env = _explain(frame)
    return EnvelopeHeader(v=env.v, id=env.id, kind=env.kind, service=env.service, command=env.command,
                          corr=env.corr, idempotent=env.idempotent)


def _explain(frame: bytes) -> Envelope:
    """The slow path: find out what is wrong with a frame, keeping what can be read of it."""
    try:
        raw = ormsgpack.unpackb(frame)
    except Exception as e:  # ormsgpack raises MsgpackDecodeError / ValueError / TypeError
        raise ProtocolError(ErrorCode.BAD_FRAME, f"not msgpack: {e}") from e
    if not isinstance(raw, dict):
        raise ProtocolError(ErrorCode.BAD_FRAME, f"envelope must be a map, got {type(raw).__name__}")
    partial = {k: raw.get(k) for k in ("id", "kind", "service", "command") if isinstance(raw.get(k), str)}
    if raw.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(
            ErrorCode.BAD_VERSION, f"protocol version {raw.get('v')!r} != {PROTOCOL_VERSION}", partial
        )
    if raw.get("kind") not in Kind._value2member_map_:
        raise ProtocolError(ErrorCode.BAD_KIND, f"unknown kind {raw.get('kind')!r}", partial)
    try:
        return msgspec.convert(raw, Envelope)
    except msgspec.ValidationError as e:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"invalid envelope: {e}", partial) from e


# -- constructors: every message in the system is made by one of these ---------------------


def request(
    service: str, command: str, body: dict[str, Any] | None = None, *, idempotent: bool = False, id: str = ""
) -> Envelope:
    return Envelope(
        v=PROTOCOL_VERSION,
        id=id or new_id(),
        kind=Kind.REQUEST,
        service=service,
        command=command,
        idempotent=idempotent,
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


class MissionBrief(msgspec.Struct, forbid_unknown_fields=True):
    type: str
    selector: str
    args: list[Any]
    kwargs: dict[str, Any]


class Table1Command(msgspec.Struct, forbid_unknown_fields=True):
    """Table 1 of the blueprint. ``schema_version`` is ours: the schema is versioned."""

    command: str
    target_oid: str
    mission_brief: MissionBrief
    schema_version: int = TABLE1_SCHEMA_VERSION


def parse_table1(obj: Any) -> Table1Command:
    """Validate a Table 1 object; raise ProtocolError(BAD_ARGS) with the reason."""
    try:
        cmd = msgspec.convert(obj, Table1Command)
    except msgspec.ValidationError as e:
        raise ProtocolError(ErrorCode.BAD_ARGS, f"malformed Table 1 command: {e}") from e
    if cmd.schema_version != TABLE1_SCHEMA_VERSION:
        raise ProtocolError(
            ErrorCode.BAD_VERSION, f"Table 1 schema_version {cmd.schema_version} != {TABLE1_SCHEMA_VERSION}"
        )
    return cmd
