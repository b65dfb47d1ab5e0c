"""The broker with real processes: routing, isolation, dead workers, malformed frames, restarts."""

from __future__ import annotations

import asyncio
import os
import signal

import ormsgpack
import pytest
import zmq
import zmq.asyncio

import proto
from batos.client import Client
from batos.errors import ServiceError

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

EXTRA = {"BATOS_EXTRA_SERVICES": "echo"}


async def test_ping_and_unknown_service(system, client):
    pong = await client.call("broker", "ping")
    assert pong["pong"] is True and pong["boot_id"]
    with pytest.raises(ServiceError) as e:
        await client.call("nope", "x", timeout=5)
    assert e.value.code == proto.ErrorCode.UNKNOWN_SERVICE


async def test_three_clients_get_only_their_own_events(system):
    system.start_broker(**EXTRA)
    system.start_test_worker("echo")
    system.start_test_worker("echo")
    clients = [Client(system.settings, identity=f"c{i}") for i in range(3)]
    for c in clients:
        await c.start()
    try:
        await system.wait_registered(clients[0], {"echo": 2})

        async def run(i: int, c: Client) -> tuple[list, dict]:
            seen: list = []
            result = await c.call("echo", "slow", {"steps": 4, "delay": 0.05, "tag": i}, on_event=seen.append)
            return seen, result

        outcomes = await asyncio.gather(*(run(i, c) for i, c in enumerate(clients)))
        for seen, result in outcomes:
            assert [e["i"] for e in seen] == [0, 1, 2, 3]
            assert result["done"] == 4
        # each client's events come from the worker that served it, and only its own request
        for i, c in enumerate(clients):
            r = await c.call("echo", "echo", {"who": i})
            assert r["echo"] == {"who": i}
    finally:
        for c in clients:
            await c.close()


async def test_unknown_command_and_bad_args_are_errors(system):
    system.start_broker(**EXTRA)
    system.start_test_worker("echo")
    async with Client(system.settings) as c:
        await system.wait_registered(c, {"echo": 1})
        with pytest.raises(ServiceError) as e:
            await c.call("echo", "frobnicate")
        assert e.value.code == proto.ErrorCode.UNKNOWN_COMMAND and "echo" in e.value.message
        with pytest.raises(ServiceError) as e:
            await c.call("echo", "slow", {"steps": "many"})
        assert e.value.code == proto.ErrorCode.BAD_ARGS and "steps" in e.value.message
        assert (await c.call("echo", "ping"))["pong"] is True


@pytest.mark.parametrize("idempotent", [True, False])
async def test_worker_killed_mid_request(system, idempotent):
    system.start_broker(**EXTRA)
    first = system.start_test_worker("echo", name="first")
    async with Client(system.settings) as c:
        await system.wait_registered(c, {"echo": 1})
        call = await c.start_call("echo", "slow", {"steps": 30, "delay": 0.1}, idempotent=idempotent)
        events = call.events()
        first_event = await asyncio.wait_for(anext(events), 10)
        assert first_event.body["pid"] == first.pid
        system.start_test_worker("echo", name="second")
        first.signal(signal.SIGKILL)
        final = None
        async for env in events:
            final = env
        assert final is not None
        if idempotent:
            assert final.kind == proto.Kind.REPLY and final.body["pid"] != first.pid
        else:
            assert final.kind == proto.Kind.ERROR and final.body["code"] == proto.ErrorCode.WORKER_LOST


async def test_heartbeats_flow_while_handler_busy(system):
    system.start_broker(**EXTRA)
    system.start_test_worker("echo")
    async with Client(system.settings) as c:
        await system.wait_registered(c, {"echo": 1})
        # 6 s of CPU in a thread is longer than the broker's liveness window (3 s)
        r = await c.call("echo", "spin", {"seconds": 6.0}, timeout=30)
        assert r["iterations"] > 0
        table = await c.call("broker", "workers")
        assert table["broker"]["stats"]["worker_lost"] == 0


async def test_malformed_flood_leaves_broker_serving(system):
    system.start_broker(**EXTRA)
    system.start_test_worker("echo")
    ctx = zmq.asyncio.Context()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(system.endpoint)
    garbage = [b"", b"\xff\xfe", b"not msgpack at all", ormsgpack.packb([1, 2, 3]),
               ormsgpack.packb({"v": 99, "id": "x", "kind": "request"}),
               ormsgpack.packb({"v": 1, "id": "y", "kind": "teleport"}),
               ormsgpack.packb({"v": 1, "id": 5, "kind": "request", "body": "no"}),
               os.urandom(300)]
    try:
        for i in range(2000):
            await raw.send(garbage[i % len(garbage)])
        await raw.send_multipart([b"a", b"b", b"c"])
        answers = 0
        while await raw.poll(2000):
            frame = await raw.recv()
            env = proto.decode(frame)
            assert env.kind == proto.Kind.ERROR
            answers += 1
            if answers >= 2001:
                break
        assert answers == 2001
        async with Client(system.settings) as c:
            await system.wait_registered(c, {"echo": 1})
            assert (await c.call("echo", "echo", {"ok": 1}))["echo"] == {"ok": 1}
            stats = (await c.call("broker", "workers"))["broker"]["stats"]
            assert stats["malformed"] >= 2001
    finally:
        raw.close(0)
        ctx.term()


async def test_broker_restart_is_survived(system):
    broker = system.start_broker(**EXTRA)
    system.start_test_worker("echo")
    endpoint = system.endpoint
    async with Client(system.settings) as c:
        await system.wait_registered(c, {"echo": 1})
        call = await c.start_call("echo", "slow", {"steps": 50, "delay": 0.1})
        await asyncio.wait_for(anext(call.events()), 10)
        broker.kill()
        system.start_broker(endpoint, **EXTRA)
        with pytest.raises(ServiceError) as e:
            await asyncio.wait_for(call.result(), 20)
        assert e.value.code == proto.ErrorCode.UNAVAILABLE
        await system.wait_registered(c, {"echo": 1}, timeout=20)
        assert (await c.call("echo", "echo", {"again": True}))["echo"] == {"again": True}


async def test_busy_when_queue_full(system):
    system.start_broker(BATOS_SERVICE_QUEUE_MAX="3", **EXTRA)
    system.start_test_worker("echo", BATOS_TEST_CAPACITY="1")
    async with Client(system.settings) as c:
        await system.wait_registered(c, {"echo": 1})
        calls = [await c.start_call("echo", "slow", {"steps": 3, "delay": 0.1}) for _ in range(6)]
        outcomes = await asyncio.gather(*(x.result() for x in calls), return_exceptions=True)
        busy = [o for o in outcomes if isinstance(o, ServiceError) and o.code == proto.ErrorCode.BUSY]
        done = [o for o in outcomes if isinstance(o, dict)]
        assert len(busy) == 2 and len(done) == 4


async def test_cancel_stops_the_handler(system):
    system.start_broker(**EXTRA)
    system.start_test_worker("echo")
    async with Client(system.settings) as c:
        await system.wait_registered(c, {"echo": 1})
        call = await c.start_call("echo", "slow", {"steps": 100, "delay": 0.1})
        await asyncio.wait_for(anext(call.events()), 10)
        await call.cancel()
        with pytest.raises(ServiceError) as e:
            await asyncio.wait_for(call.result(), 10)
        assert e.value.code == proto.ErrorCode.CANCELLED


async def test_reconnecting_client_with_same_identity_keeps_working(system):
    system.start_broker(**EXTRA)
    system.start_test_worker("echo")
    async with Client(system.settings, identity="architect-console-same") as c:
        await system.wait_registered(c, {"echo": 1})
        assert (await c.call("echo", "echo", {"n": 1}))["echo"] == {"n": 1}
    async with Client(system.settings, identity="architect-console-same") as c:
        assert (await c.call("echo", "echo", {"n": 2}))["echo"] == {"n": 2}


async def test_curve_allows_listed_keys_only(system):
    import zmq.auth

    from batos.curve import ensure_keys

    settings = system.settings.model_copy(update={"curve_enabled": True})
    keys = ensure_keys(settings)
    zmq.auth.create_certificates(str(keys), "intruder")  # a key pair nobody listed in authorized/
    system.start_broker(BATOS_CURVE_ENABLED="1", **EXTRA)
    system.start_test_worker("echo", BATOS_CURVE_ENABLED="1")
    settings = settings.model_copy(update={"broker_endpoint": system.endpoint})
    async with Client(settings, identity="service-listed", curve_key="services") as c:
        await system.wait_registered(c, {"echo": 1})
        assert (await c.call("echo", "echo", {"secret": 1}))["echo"] == {"secret": 1}
    async with Client(settings, identity="architect-console-listed") as c:  # listed, but a console key
        with pytest.raises(ServiceError) as e:
            await c.call("echo", "echo", {"secret": 1}, timeout=5)
        assert e.value.code == proto.ErrorCode.UNAUTHORIZED  # the handshake passed; the role did not
    async with Client(settings, identity="architect-console-intruder", curve_key="intruder") as c:
        with pytest.raises(ServiceError) as e:
            await c.call("echo", "echo", {"secret": 2}, timeout=3)
        assert e.value.code == proto.ErrorCode.TIMEOUT  # no handshake: not even an error comes back
