"""The broker's restart and slot rules (issue 14 items 4-5), driven message by message with a fake socket.

- a dead or restarting worker's retry-safe request is re-queued, its caller told, and its wait for a worker
  counted from the re-queue; one that is not safe to repeat is `worker_lost`, "restarted" after a drain;
- control commands are dispatched past a worker's capacity, never to a draining worker;
- requests a worker reports waiting on another service hold no slot;
- a re-registering worker's READY hands over what it still runs (a broker restart): adopted, and a copy
  the client re-sent meanwhile is attached to it rather than run twice; its output before the client has
  reconnected to the new broker is dropped, not taken as the client having gone.
"""

from __future__ import annotations

import time
from typing import Any

import zmq

import proto
from batos.config import Settings
from broker.broker import Broker
from proto import Kind


class FakeSocket:
    """Collects what the broker sends: (identity, [frames]) per message."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, list[bytes]]] = []
        self._parts: list[bytes] = []
        self.unreachable: set[bytes] = set()  # peers not connected (ROUTER_MANDATORY: EHOSTUNREACH)

    def send(self, data: bytes, flags: int = 0) -> None:
        if not self._parts and bytes(data) in self.unreachable:
            raise zmq.ZMQError(zmq.EHOSTUNREACH)
        self._parts.append(bytes(data))
        if not flags & zmq.SNDMORE:
            self.sent.append((self._parts[0], self._parts[1:]))
            self._parts = []

    def to(self, identity: bytes) -> list[proto.Envelope]:
        return [proto.decode(frames[-1]) for who, frames in self.sent if who == identity]


def make_broker(**settings: Any) -> tuple[Broker, FakeSocket]:
    sock = FakeSocket()
    return Broker(Settings(extra_services="echo", **settings), sock), sock  # type: ignore[arg-type]


def ready(b: Broker, worker: bytes, capacity: int = 1, holding: list[dict] | None = None) -> None:
    b.handle(worker, proto.encode(proto.control(Kind.READY, service="echo", body={
        "capacity": capacity, "holding": holding or []})))


def request(b: Broker, client: bytes, command: str = "slow", *, idempotent: bool = False, id: str = "") -> str:
    env = proto.request("echo", command, {}, idempotent=idempotent, id=id)
    b.handle(client, proto.encode(env))
    return env.id


def heartbeat(b: Broker, worker: bytes, **body: Any) -> None:
    b.handle(worker, proto.encode(proto.control(Kind.HEARTBEAT, service="echo", body=body)))


def reply(b: Broker, worker: bytes, req_id: str) -> None:
    env = proto.request("echo", "slow", id=req_id)
    b.handle(worker, proto.encode(proto.reply(env, {"ok": True})))


def requests_to(sock: FakeSocket, worker: bytes) -> list[str]:
    return [e.id for e in sock.to(worker) if e.kind == Kind.REQUEST]


def test_retry_safe_request_is_requeued_and_waits_from_the_requeue() -> None:
    b, sock = make_broker(service_wait_s=30.0)
    ready(b, b"w1")
    rid = request(b, b"c", idempotent=True)
    b.pending[rid].queued_at -= 25.0  # in flight for 25 s already
    b.remove_worker(b.workers[b"w1"])  # killed
    told = [e.body for e in sock.to(b"c") if e.kind == Kind.EVENT]
    assert told and told[0]["event"] == "retrying" and "died" in told[0]["message"]
    b.expire_queued(time.monotonic() + 10.0)  # 35 s since it was sent, 10 since the re-queue
    assert rid in b.pending
    ready(b, b"w2")
    assert requests_to(sock, b"w2") == [rid]
    b.remove_worker(b.workers[b"w2"])
    b.expire_queued(time.monotonic() + 31.0)
    errors = [e.body for e in sock.to(b"c") if e.kind == Kind.ERROR]
    assert rid not in b.pending and errors[0]["code"] == "unavailable" and "service_wait_s" in errors[0]["message"]


def test_a_request_not_safe_to_repeat_is_worker_lost_and_a_drain_says_restarted() -> None:
    b, sock = make_broker()
    ready(b, b"w1")
    rid = request(b, b"c")
    heartbeat(b, b"w1", draining=True)
    b.handle(b"w1", proto.encode(proto.control(Kind.DISCONNECT, service="echo")))  # the drain's end
    error = next(e.body for e in sock.to(b"c") if e.kind == Kind.ERROR)
    assert error["code"] == "worker_lost" and "restarted" in error["message"] and rid not in b.pending


def test_waiting_requests_emit_waiting_events_while_no_worker_serves() -> None:
    b, sock = make_broker()
    rid = request(b, b"c", idempotent=True)
    b.expire_queued(time.monotonic() + 6.0)
    waiting = [e.body for e in sock.to(b"c") if e.kind == Kind.EVENT]
    assert waiting[0]["event"] == "waiting" and waiting[0]["source"] == "broker" and rid in b.pending


def test_control_commands_pass_a_full_worker_but_not_a_draining_one() -> None:
    b, sock = make_broker()
    ready(b, b"w1")
    work = request(b, b"c")
    queued = request(b, b"c", "echo")
    status = request(b, b"c", "status")
    assert requests_to(sock, b"w1") == [work, status]  # status went past the one busy slot
    assert list(b.queues["echo"]) == [queued]
    heartbeat(b, b"w1", draining=True)
    late = request(b, b"c", "ping")
    assert late not in requests_to(sock, b"w1") and list(b.control_queues["echo"]) == [late]
    ready(b, b"w2")
    assert requests_to(sock, b"w2") == [late, queued]  # control first


def test_a_request_waiting_on_another_service_holds_no_slot() -> None:
    b, sock = make_broker()
    ready(b, b"w1")
    first = request(b, b"c")
    second = request(b, b"c")
    assert requests_to(sock, b"w1") == [first]
    heartbeat(b, b"w1", waiting=1)  # `first` waits on memory
    assert requests_to(sock, b"w1") == [first, second]
    assert b.describe().services["echo"][0].waiting_on_others == 1
    reply(b, b"w1", first)
    heartbeat(b, b"w1", waiting=5)  # more than it holds: capped
    assert b.workers[b"w1"].waiting == 1


def test_a_new_broker_adopts_what_a_worker_still_runs() -> None:
    b, sock = make_broker()
    resent = request(b, b"c", idempotent=True)  # a client re-sent it; no worker yet: queued
    ready(b, b"w1", holding=[{"id": "a" * 32, "command": "slow", "client": b"c"},
                             {"id": resent, "command": "slow", "client": b"c"}])
    assert set(b.workers[b"w1"].inflight) == {"a" * 32, resent}
    assert requests_to(sock, b"w1") == []  # nothing dispatched twice
    assert b.stats.adopted == 1
    b.handle(b"c", proto.encode(proto.request("broker", "held", {"ids": ["a" * 32, resent]})))
    assert set(sock.to(b"c")[-1].body["held"]) == {"a" * 32, resent}
    request(b, b"c", idempotent=True, id=resent)  # re-sent again, racing the hand-over: no second run, no error
    assert requests_to(sock, b"w1") == [] and not [e for e in sock.to(b"c") if e.kind == Kind.ERROR]
    reply(b, b"w1", "a" * 32)
    assert [e.body for e in sock.to(b"c") if e.kind == Kind.REPLY][-1] == {"ok": True}


def test_a_worker_re_registering_keeps_its_requests_and_another_workers_are_not_taken() -> None:
    b, sock = make_broker()
    ready(b, b"w1")
    ready(b, b"w2")
    one = request(b, b"c")
    two = request(b, b"c")
    holder = {rid: w for w in (b"w1", b"w2") for rid in requests_to(sock, w)}
    w = holder[one]
    other = holder[two]
    ready(b, w, holding=[{"id": one, "command": "slow", "client": b"c"},
                         {"id": two, "command": "slow", "client": b"c"}])  # a confused worker claims both
    assert b.pending[one].worker == w and b.pending[two].worker == other
    assert not [e for e in sock.to(b"c") if e.kind == Kind.ERROR]


def event(b: Broker, worker: bytes, req_id: str) -> None:
    env = proto.request("echo", "slow", id=req_id)
    b.handle(worker, proto.encode(proto.event(env, "step", {"n": 1})))


def test_an_adopted_requests_output_waits_for_its_client_to_reconnect() -> None:
    b, sock = make_broker()
    sock.unreachable.add(b"c")  # the worker re-registered before the client reconnected to the new broker
    rid = "b" * 32
    ready(b, b"w1", holding=[{"id": rid, "command": "slow", "client": b"c"}])
    event(b, b"w1", rid)
    assert rid in b.pending and not [e for e in sock.to(b"w1") if e.kind == Kind.CANCEL]  # work goes on
    sock.unreachable.clear()  # the client is back
    b.handle(b"c", proto.encode(proto.request("broker", "held", {"ids": [rid]})))
    assert sock.to(b"c")[-1].body["held"] == [rid]
    reply(b, b"w1", rid)
    assert [e.body for e in sock.to(b"c") if e.kind == Kind.REPLY][-1] == {"ok": True}


def test_an_adopted_requests_client_that_never_comes_back_stops_the_work() -> None:
    b, sock = make_broker()
    sock.unreachable.add(b"gone")
    rid = "c" * 32
    ready(b, b"w1", holding=[{"id": rid, "command": "slow", "client": b"gone"}])
    b.pending[rid].adopted_at = time.monotonic() - 60.0  # long past the grace
    event(b, b"w1", rid)
    assert [e.corr for e in sock.to(b"w1") if e.kind == Kind.CANCEL] == [rid]
