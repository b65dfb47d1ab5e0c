"""Hostile frames against a real broker: each is answered or dropped and counted, never fatal.

Before the decode limits, one 2 KB frame nested 2,000 levels deep killed the broker (RecursionError
out of header decoding), and so did a READY whose capacity was a float, infinity, a string, or whose
body was a list. Each test below sends such frames from a raw socket, then proves the same broker
process (same pid, same boot id) still routes real requests.
"""

from __future__ import annotations

import os
import time

import ormsgpack
import pytest
import zmq

import proto
from batos.client import Client
from batos.errors import ServiceError

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

EXTRA = {"BATOS_EXTRA_SERVICES": "echo"}


class RawPeer:
    """A bare DEALER: sends any bytes, reads whatever comes back."""

    def __init__(self, endpoint: str, identity: bytes | None = None):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        if identity is not None:
            self.sock.setsockopt(zmq.IDENTITY, identity)
        self.sock.connect(endpoint)

    def send(self, *frames: bytes) -> None:
        self.sock.send_multipart(list(frames))

    def recv_all(self, wait_ms: int = 0) -> list[list[bytes]]:
        out: list[list[bytes]] = []
        while self.sock.poll(wait_ms if not out else 0):
            out.append(self.sock.recv_multipart())
        return out

    def call(self, service: str, command: str, body: dict | None = None, timeout: float = 10.0) -> proto.Envelope:
        """A request from this raw socket; skips unrelated messages until its answer comes."""
        req = proto.request(service, command, body)
        self.sock.send(proto.encode(req))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not self.sock.poll(int(left * 1000)):
                break
            env = _try_decode(self.sock.recv_multipart()[-1])
            if env is not None and env.corr == req.id:
                return env
        raise TimeoutError(f"no answer to broker.{command} within {timeout} s")

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def _try_decode(frame: bytes) -> proto.Envelope | None:
    try:
        return proto.decode(frame)
    except proto.ProtocolError:
        return None


def broker_status(peer: RawPeer) -> dict:
    env = peer.call("broker", "status")
    assert env.kind == proto.Kind.REPLY, env.body
    return env.body


def nested(depth: int) -> bytes:
    """A msgpack value ``depth`` arrays deep, written byte by byte (ormsgpack refuses to build it)."""
    return b"\x91" * depth + b"\xc0"


def envelope_with_raw_body(kind: str, body: bytes, **fields: object) -> bytes:
    head = {"v": 1, "id": proto.new_id(), "kind": kind, **fields}
    packed = ormsgpack.packb(head)
    assert packed[0] & 0xF0 == 0x80 and len(head) < 15  # a fixmap: one more entry is one more count
    return bytes([packed[0] + 1]) + packed[1:] + ormsgpack.packb("body") + body


def ready(body: object, service: str = "echo") -> bytes:
    return ormsgpack.packb({"v": 1, "id": proto.new_id(), "kind": "ready", "service": service, "body": body})


HOSTILE = {
    "2KB nested 2000 deep in the body": envelope_with_raw_body("request", nested(2000), service="echo",
                                                               command="echo"),
    "nested 2000 deep as the whole frame": nested(2000),
    "maps nested 3000 deep": envelope_with_raw_body("request", b"\x81\xa1k" * 3000 + b"\xc0", service="echo"),
    "READY nested 2000 deep": envelope_with_raw_body("ready", nested(2000), service="echo"),
    "HEARTBEAT nested 2000 deep": envelope_with_raw_body("heartbeat", nested(2000), service="echo"),
    "READY capacity float": ready({"capacity": 2.5}),
    "READY capacity infinite": ready({"capacity": float("inf")}),
    "READY capacity NaN": ready({"capacity": float("nan")}),
    "READY capacity string": ready({"capacity": "8"}),
    "READY capacity huge": ready({"capacity": 2**62}),
    "READY capacity negative": ready({"capacity": -5}),
    "READY pid string": ready({"pid": "1; rm -rf /"}),
    "READY version map": ready({"version": {"a": 1}}),
    "READY list body": ready([1, 2, 3]),
    "READY string body": ready("capacity"),
    "HEARTBEAT list body": ormsgpack.packb({"v": 1, "id": "h", "kind": "heartbeat", "service": "echo",
                                           "body": [True]}),
    "id of 100 KB": ormsgpack.packb({"v": 1, "id": "i" * 100_000, "kind": "request", "service": "echo"}),
    "service of 100 KB": ormsgpack.packb({"v": 1, "id": "s", "kind": "request", "service": "e" * 100_000}),
    "empty id": ormsgpack.packb({"v": 1, "id": "", "kind": "request", "service": "echo", "command": "echo"}),
    "held ids not a list": ormsgpack.packb({"v": 1, "id": "q", "kind": "request", "service": "broker",
                                           "command": "held", "body": {"ids": {"a": 1}}}),
    "held ids nested deep": envelope_with_raw_body("request", b"\x81\xa3ids" + nested(2000), service="broker",
                                                  command="held"),
    "random bytes": os.urandom(2048),
}


# A heartbeat body is only read from a registered worker: these register the attacker first.
AS_WORKER = {"HEARTBEAT list body"}


@pytest.fixture(scope="module")
def one_broker(tmp_path_factory):
    """One broker for every hostile frame: it must survive them all, one after the other."""
    from tests.conftest import System

    system = System(tmp_path_factory.mktemp("hostile"))
    try:
        broker = system.start_broker(**EXTRA)
        observer = RawPeer(system.endpoint)
        yield system, broker, observer, broker_status(observer)
        observer.close()
    finally:
        system.stop_all()


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_frame_is_answered_and_broker_lives(one_broker, name):
    system, broker, observer, first = one_broker
    identity = b"attacker-" + name.encode()[:40].replace(b" ", b"-")
    attacker = RawPeer(system.endpoint, identity=identity)
    try:
        before = broker_status(observer)
        if name in AS_WORKER:
            attacker.send(ready({"capacity": 1}))
            deadline = time.monotonic() + 5
            while identity.decode() not in _worker_identities(observer):  # another socket: no ordering
                assert time.monotonic() < deadline, "the valid READY did not register"
                time.sleep(0.05)
        attacker.send(HOSTILE[name])
        answers = attacker.recv_all(wait_ms=5000)
        errors = [e for a in answers if (e := _try_decode(a[-1])) is not None and e.kind == proto.Kind.ERROR]
        assert errors, f"{name}: no error answer, got {answers!r:.300}"
        env = errors[0]
        assert env.body["code"] in {"bad_frame", "bad_args", "bad_version", "bad_kind"}, env.body
        after = broker_status(observer)
        assert broker.alive()
        assert (after["pid"], after["boot_id"]) == (first["pid"], first["boot_id"]) == (broker.pid, after["boot_id"])
        assert after["stats"]["malformed"] > before["stats"]["malformed"]
        assert after["stats"]["internal_errors"] == 0
        if name not in AS_WORKER:  # no hostile READY registered a worker
            assert identity.decode() not in _worker_identities(observer)
    finally:
        attacker.close()


def _worker_identities(observer: RawPeer) -> set[str]:
    env = observer.call("broker", "workers")
    return {w["identity"] for ws in env.body["services"].values() for w in ws}


async def test_broker_still_routes_after_every_hostile_frame(system):
    broker = system.start_broker(**EXTRA)
    system.start_test_worker("echo")
    attacker = RawPeer(system.endpoint)
    try:
        async with Client(system.settings) as c:
            await system.wait_registered(c, {"echo": 1})
            boot = (await c.ping()).boot_id
            for frame in HOSTILE.values():
                attacker.send(frame)
            assert len(attacker.recv_all(wait_ms=5000)) >= 1
            assert (await c.call("echo", "echo", {"after": "attack"}))["echo"] == {"after": "attack"}
            status = await c.call("broker", "status")
            assert status["boot_id"] == boot and status["pid"] == broker.pid
            assert status["stats"]["internal_errors"] == 0 and status["workers"] == 1
    finally:
        attacker.close()


async def test_a_body_past_the_depth_limit_is_refused_by_the_worker_with_its_request_id(system):
    system.start_broker(**EXTRA)
    system.start_test_worker("echo", BATOS_TEST_CAPACITY="1")
    async with Client(system.settings) as c:
        await system.wait_registered(c, {"echo": 1})
        body: object = "leaf"
        for _ in range(proto.MAX_BODY_DEPTH + 5):
            body = [body]
        for _ in range(2):  # twice on a capacity-1 worker: the refusal frees the slot
            with pytest.raises(ServiceError) as e:
                await c.call("echo", "echo", {"deep": body}, timeout=10)
            assert e.value.code == proto.ErrorCode.BAD_FRAME and "nested deeper" in e.value.message
        assert (await c.call("echo", "echo", {"shallow": [[1]]}))["echo"] == {"shallow": [[1]]}
