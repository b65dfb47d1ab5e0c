"""Bounded broker state and oversized replies, against a real broker.

- An identity flood (thousands of distinct client identities, each with a live connection) must
  not leave the broker at its peak memory once the flood is gone (it used to keep ~17-28 KB per
  identity for good), and past ``broker_max_clients`` a new client gets ``busy``.
- A reply over the frame limit fails the request it answers and frees the worker's slot: before,
  the caller only timed out and a capacity-2 worker was wedged after two such replies.
"""

from __future__ import annotations

import asyncio
import resource
import time

import ormsgpack
import psutil
import pytest
import zmq

import proto
from batos.client import Client
from batos.errors import ServiceError
from tests.security.test_broker_frames import RawPeer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

EXTRA = {"BATOS_EXTRA_SERVICES": "echo"}
MB = 1024 * 1024


def _raise_fd_limit(want: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))  # the broker inherits it
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def test_identity_flood_leaves_memory_flat(system):
    fds = _raise_fd_limit(8192)
    flood = min(3000, fds // 2 - 200)  # both ends hold a descriptor per connection
    assert flood >= 500, f"fd limit {fds} too low for a meaningful flood"
    broker = system.start_broker(BATOS_BROKER_CLIENT_IDLE_S="1", **EXTRA)
    observer = RawPeer(system.endpoint)
    ctx = zmq.Context()
    ctx.max_sockets = 2 * flood + 100  # a closed wave is reaped in the background
    try:
        assert observer.call("broker", "ping").body["pong"] is True
        baseline = _rss(broker.pid)
        peak = baseline
        for wave in range(2):
            socks = []
            for i in range(flood):
                s = ctx.socket(zmq.DEALER)
                s.setsockopt(zmq.LINGER, 0)
                s.setsockopt(zmq.IDENTITY, f"flood-{wave}-{i}".encode())
                s.connect(system.endpoint)
                s.send(proto.encode(proto.request("echo", "echo", {"i": i})))  # no worker: queued or busy
                socks.append(s)
            for s in socks:  # every identity has reached the broker
                assert s.poll(20_000), "no answer"
            peak = max(peak, _rss(broker.pid))
            for s in socks:
                s.close(0)
        grew = peak - baseline
        assert grew > 20 * MB, f"the flood cost only {grew / MB:.1f} MB: not a meaningful test"
        deadline = time.monotonic() + 30
        while (now := _rss(broker.pid)) - baseline > 15 * MB:
            assert time.monotonic() < deadline, (
                f"broker RSS stayed at {now / MB:.0f} MB after the flood left (baseline {baseline / MB:.0f} MB, "
                f"peak {peak / MB:.0f} MB)")
            time.sleep(0.5)
        assert broker.alive() and observer.call("broker", "ping").body["pong"] is True
    finally:
        observer.close()
        ctx.destroy(linger=0)


async def test_clients_past_the_cap_get_busy_until_idle_ones_expire(system):
    system.start_broker(BATOS_BROKER_MAX_CLIENTS="4", BATOS_BROKER_CLIENT_IDLE_S="0.5", **EXTRA)
    system.start_test_worker("echo", BATOS_TEST_CAPACITY="8")
    clients = [Client(system.settings, identity=f"capped-{i}") for i in range(5)]
    for c in clients:
        await c.start()
    try:
        await system.wait_registered(clients[0], {"echo": 1})
        # the worker's own client identities count too; four slow callers fill the table
        calls = [await c.start_call("echo", "slow", {"steps": 10, "delay": 0.2}) for c in clients[:4]]
        with pytest.raises(ServiceError) as e:
            await clients[4].call("echo", "echo", {"late": True}, timeout=10)
        assert e.value.code == proto.ErrorCode.BUSY and "maximum of 4 clients" in e.value.message
        results = [await asyncio.wait_for(c.result(), 20) for c in calls]
        assert [r["done"] for r in results] == [10] * 4
        status = await clients[4].call("broker", "status")
        assert status["clients"] <= 4 and status["stats"]["clients_refused"] >= 1
        # finished clients go idle, expire, and make room (the broker sweeps every few seconds)
        deadline = time.monotonic() + 15
        while True:
            try:
                assert (await clients[4].call("echo", "echo", {"late": True}))["echo"] == {"late": True}
                break
            except ServiceError as err:
                assert err.code == proto.ErrorCode.BUSY and time.monotonic() < deadline
                await asyncio.sleep(0.3)
    finally:
        for c in clients:
            await c.close()


async def test_worker_replaces_an_oversized_reply_with_an_error(system):
    limit = {"BATOS_MAX_FRAME_BYTES": "200000"}
    system.start_broker(**limit, **EXTRA)
    system.start_test_worker("echo", BATOS_TEST_CAPACITY="2", **limit)
    async with Client(system.settings.model_copy(update={"max_frame_bytes": 200_000})) as c:
        await system.wait_registered(c, {"echo": 1})
        for _ in range(3):  # more than the worker's capacity: a leaked slot would wedge it
            with pytest.raises(ServiceError) as e:
                await c.call("echo", "big", {"size": 500_000}, timeout=15)
            assert e.value.code == proto.ErrorCode.TOO_LARGE and "ask for less" in e.value.message
        assert (await c.call("echo", "big", {"size": 1000}, timeout=15))["data"] == b"x" * 1000
        table = await c.call("broker", "workers")
        assert [w["inflight"] for w in table["services"]["echo"]] == [0]


def test_broker_fails_the_request_an_oversized_reply_answers_and_frees_the_slot(system):
    """A worker that ignores the limit: the broker still answers the caller and frees the slot."""
    system.start_broker(BATOS_MAX_FRAME_BYTES="100000", **EXTRA)
    worker = RawPeer(system.endpoint, identity=b"echo-raw-worker")
    caller = RawPeer(system.endpoint, identity=b"caller")
    try:
        worker.send(proto.encode(proto.control(proto.Kind.READY, service="echo", body={"capacity": 2})))
        reqs = [proto.request("echo", "echo", {"n": i}) for i in range(3)]
        for r in reqs:
            caller.send(proto.encode(r))
        got = _requests(worker, 2)
        assert len(got) == 2
        for _client, env in got:  # answer both with replies far over the broker's limit
            worker.send(proto.encode(proto.reply(env, {"data": b"y" * 300_000})))
        errors = {}
        deadline = time.monotonic() + 10
        while len(errors) < 2 and time.monotonic() < deadline:
            for msg in caller.recv_all(wait_ms=500):
                env = proto.decode(msg[-1])
                errors[env.corr] = env
        assert set(errors) == {env.id for _, env in got}
        assert all(e.kind == proto.Kind.ERROR and e.body["code"] == "too_large" for e in errors.values())
        third = _requests(worker, 1)  # the freed slot takes the request that was waiting
        assert [env.id for _, env in third] == [reqs[2].id]
    finally:
        worker.close()
        caller.close()


def _requests(worker: RawPeer, n: int, timeout: float = 10.0) -> list[tuple[bytes, proto.Envelope]]:
    out: list[tuple[bytes, proto.Envelope]] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        for msg in worker.recv_all(wait_ms=200):
            if len(msg) == 2:
                env = proto.decode(msg[1])
                if env.kind == proto.Kind.REQUEST:
                    out.append((msg[0], env))
            elif ormsgpack.unpackb(msg[-1]).get("kind") == "heartbeat":
                worker.send(proto.encode(proto.control(proto.Kind.HEARTBEAT, service="echo")))
    return out
