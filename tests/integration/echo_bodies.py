"""The request and reply types of the test worker's commands (tests/integration/echo_worker.py).

Test-only: nothing in production serves these. They are registered for whatever service name the test worker
runs as (``BATOS_TEST_SERVICE``: ``echo``, ``neighbour``, or a production name in the role tests) by
:func:`register`, at that worker's start, so that importing this module changes no process's contract.
"""

from __future__ import annotations

from typing import Any

from proto import contract
from proto.contract import Call, Reply


class EchoReply(Reply):
    echo: dict[str, Any]
    pid: int


class Echo(Call[EchoReply], forbid_unknown_fields=False):
    """Any fields: ``echo`` is the broker tests' probe and answers with the body it was sent, whatever it holds
    (the one request type that takes fields it does not name)."""


class SlowReply(Reply):
    done: int
    pid: int


class Slow(Call[SlowReply]):
    """``steps`` ``tick`` events, ``delay`` seconds apart."""

    steps: int = 5
    delay: float = 0.2
    tag: int | None = None  # tells concurrent calls apart in a test; unused here


class SpinReply(Reply):
    iterations: int
    pid: int


class Spin(Call[SpinReply]):
    """Blocking work in a thread for ``seconds``."""

    seconds: float = 5.0


class BigReply(Reply):
    data: bytes
    pid: int


class Big(Call[BigReply]):
    """A reply of ``size`` bytes."""

    size: int = 1024


class Fail(Call[Reply]):
    """Raise: ``zeo`` as a lost ZEO connection, anything else as a bug."""

    kind: str = "bug"


class RelayReply(Reply):
    relayed: dict[str, Any]
    pid: int


class Relay(Call[RelayReply]):
    """Call ``echo`` on ``service`` and answer with its reply."""

    service: str


COMMANDS: dict[str, type[Call[Any]]] = {"echo": Echo, "slow": Slow, "spin": Spin, "big": Big, "fail": Fail,
                                        "relay": Relay}


def register(service: str) -> None:
    """Declare the test commands as ``service``'s (in the test worker's process only)."""
    for name, request in COMMANDS.items():
        contract.command(service, name)(request)
