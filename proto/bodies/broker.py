"""The broker's own commands (``service="broker"``): ping, status, workers, held.

The broker is not a worker: it answers these itself, building the reply Structs below, and decodes the
``held`` body straight from the frame (:func:`decode_held`) without a whole-envelope decode.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from proto.contract import Call, Reply, command
from proto.schema import _DECODE_ERRORS, ErrorCode, Id, ProtocolError, _short

MAX_HELD_IDS = 100_000


class BrokerStats(msgspec.Struct, kw_only=True):
    """The broker's counters: it increments these fields directly (one object, no copy per message)."""

    received: int = 0
    malformed: int = 0
    dropped_no_return: int = 0
    late_replies: int = 0  # replies/events for requests no longer pending
    busy: int = 0
    redispatched: int = 0
    adopted: int = 0  # requests a re-registering worker was still running, kept routed
    worker_lost: int = 0
    unroutable: int = 0
    expired: int = 0
    oversized: int = 0  # messages over the frame limit (a reply's request is failed)
    internal_errors: int = 0  # a message whose handling raised: logged, counted, survived
    clients_refused: int = 0  # new client identities answered `busy` at the cap
    clients_expired: int = 0
    unauthorized: int = 0  # refused by role (Curve on)


class BrokerPingReply(Reply):
    pong: bool
    version: str
    boot_id: str  # changes when the broker restarts: clients settle their pending calls then


@command("broker", "ping")
class BrokerPing(Call[BrokerPingReply]):
    pass


class BrokerStatusReply(Reply):
    pid: int
    boot_id: str
    version: str
    uptime_s: float
    clients: int
    workers: int
    pending: int
    stats: BrokerStats


@command("broker", "status")
class BrokerStatus(Call[BrokerStatusReply]):
    pass


class WorkerInfo(Reply):
    identity: str  # empty for consoles (Curve on): nothing to impersonate
    pid: int
    version: str
    uptime_s: float
    last_seen_s: float
    alive: bool
    inflight: int
    waiting_on_others: int
    capacity: int
    served: int


class BrokerSummary(Reply):
    version: str
    uptime_s: float
    pending: int
    queued: dict[str, int]  # service -> requests waiting for a worker (services with none are left out)
    stats: BrokerStats


class WorkerTable(Reply):
    broker: BrokerSummary
    services: dict[str, list[WorkerInfo]]


@command("broker", "workers")
class Workers(Call[WorkerTable]):
    pass


class HeldReply(Reply):
    held: list[str]  # those of the asked ids this broker holds for the caller
    boot_id: str


@command("broker", "held")
class Held(Call[HeldReply]):
    """Which of these request ids of the caller's does this broker hold (asked after a broker restart)."""

    ids: Annotated[list[Id], msgspec.Meta(max_length=MAX_HELD_IDS)] = []


class _HeldFrame(msgspec.Struct):
    body: Held = msgspec.field(default_factory=Held)


_held_decoder = msgspec.msgpack.Decoder(_HeldFrame)


def decode_held(frame: bytes) -> Held:
    """The ``held`` request's body, decoded from the whole frame (the broker reads only this field)."""
    try:
        return _held_decoder.decode(frame).body
    except _DECODE_ERRORS as e:
        raise ProtocolError(ErrorCode.BAD_ARGS, f"malformed broker.held body: {_short(e)}") from None
