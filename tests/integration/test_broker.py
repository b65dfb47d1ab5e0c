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
from tests.waiting import until

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
    """kill -9 of the broker mid-request: the worker hands what it still runs to the new broker on
    re-registering, so the request completes instead of failing (issue 14: restarts are waited out)."""
    broker = system.start_broker(**EXTRA)
    worker = system.start_test_worker("echo")
    endpoint = system.endpoint
    async with Client(system.settings) as c:
        await system.wait_registered(c, {"echo": 1})
        # not retry-safe; long enough (20 s) that the worker re-registers before it finishes, even on a loaded
        # machine: a reply sent before its request was adopted reaches a broker that does not hold it
        call = await c.start_call("echo", "slow", {"steps": 200, "delay": 0.1})
        await asyncio.wait_for(anext(call.events()), 10)
        broker.kill()
        system.start_broker(endpoint, **EXTRA)
        result = await asyncio.wait_for(call.result(), 60)
        assert result == {"done": 200, "pid": worker.pid}
        stats = (await c.call("broker", "workers"))["broker"]["stats"]
        assert stats["adopted"] == 1  # (events sent before it re-registered were lost: late_replies)
        assert (await c.call("echo", "echo", {"again": True}))["echo"] == {"again": True}


async def streaming_call(c: Client, *, steps: int, idempotent: bool, timeout: float,
                         after_events: int) -> tuple[asyncio.Task, list[dict]]:
    """An echo.slow call (an event every 0.1 s) running in a task, once ``after_events`` events came."""
    seen: list[dict] = []
    call = asyncio.create_task(c.call("echo", "slow", {"steps": steps, "delay": 0.1}, on_event=seen.append,
                                      idempotent=idempotent, timeout=timeout))
    await until(lambda: len(seen) >= after_events, what=f"{after_events} events of echo.slow")
    return call, seen


async def queued_at_broker(c: Client, service: str) -> int:
    return int((await c.call("broker", "workers"))["broker"]["queued"].get(service, 0))


async def waiting_on_others(c: Client, n: int = 3) -> bool:
    return (await c.call("broker", "workers"))["services"]["echo"][0]["waiting_on_others"] >= n


async def test_retry_safe_request_waits_for_the_next_worker(system):
    """A worker killed mid-request, none other running: a retry-safe request is re-queued, its caller is
    told, and it completes on the worker that comes back; the wait counts from the re-queue (here the
    whole call outlasts service_wait_s, the wait after the re-queue does not)."""
    system.start_broker(BATOS_SERVICE_WAIT_S="4", **EXTRA)
    first = system.start_test_worker("echo", name="first")
    async with Client(system.settings) as c:
        await system.wait_registered(c, {"echo": 1})
        call, seen = await streaming_call(c, steps=40, idempotent=True, timeout=10, after_events=30)  # 3 s in
        first.signal(signal.SIGKILL)
        # the next worker starts once the broker has re-queued the request (the wait counts from there)
        await until(lambda: any(e.get("event") == "retrying" for e in seen), what="the broker's re-queue")
        second = system.start_test_worker("echo", name="second")
        result = await asyncio.wait_for(call, 30)
        assert result == {"done": 40, "pid": second.pid}
        retry = [e for e in seen if e.get("event") == "retrying"]
        assert len(retry) == 1 and retry[0]["source"] == "broker" and "died" in retry[0]["message"]
        assert [e["i"] for e in seen[seen.index(retry[0]) + 1:]] == list(range(40))  # the whole step again


@pytest.mark.parametrize("idempotent", [True, False])
async def test_graceful_restart_is_never_reported_as_cancelled(system, idempotent):
    """SIGTERM (supervisorctl restart): after the drain grace, unfinished work goes back to the broker, which
    runs a retry-safe request on the next worker and says `worker_lost` (restarted) for the others."""
    system.start_broker(**EXTRA)
    first = system.start_test_worker("echo", name="first")
    async with Client(system.settings) as c:
        await system.wait_registered(c, {"echo": 1})
        call, seen = await streaming_call(c, steps=100, idempotent=idempotent, timeout=30, after_events=1)
        first.signal(signal.SIGTERM)
        second = system.start_test_worker("echo", name="second")
        if idempotent:
            result = await asyncio.wait_for(call, 60)
            assert result["pid"] == second.pid
            assert any(e.get("event") == "retrying" and "restarted" in e["message"] for e in seen)
        else:
            with pytest.raises(ServiceError) as e:
                await asyncio.wait_for(call, 60)
            assert e.value.code == proto.ErrorCode.WORKER_LOST and "restarted" in e.value.message
        assert first.popen.wait(10) == 0  # the drain ended cleanly


async def test_control_commands_never_queue_behind_work(system):
    """A worker's slots all busy: `status` (proto.CONTROL) is answered at once; ordinary work queues."""
    system.start_broker(**EXTRA)
    system.start_test_worker("echo", BATOS_TEST_CAPACITY="1")
    async with Client(system.settings) as c:
        await system.wait_registered(c, {"echo": 1})
        started: list[dict] = []
        slow = asyncio.create_task(c.call("echo", "slow", {"steps": 40, "delay": 0.1}, on_event=started.append))
        await until(lambda: started, what="the slow request running")
        status = await c.call("echo", "status", timeout=2.0)
        assert status["inflight"] == 2 and not slow.done()  # the slow request and this status
        queued = asyncio.create_task(c.call("echo", "echo", {"n": 1}))
        await until(lambda: queued_at_broker(c, "echo"), what="the echo request queued at the broker")
        assert not queued.done()  # capacity still bounds work
        assert (await slow)["done"] == 40
        assert (await queued)["echo"] == {"n": 1}


async def test_waiting_on_a_dead_neighbour_holds_no_slot(system):
    """The kernel's case: its request waits on memory, which is down. The wait holds no slot, so other work
    and control commands go on; the relayed request completes when the neighbour comes back."""
    system.start_broker(BATOS_EXTRA_SERVICES="echo,neighbour")
    system.start_test_worker("echo", BATOS_TEST_CAPACITY="1")
    async with Client(system.settings) as c:
        await system.wait_registered(c, {"echo": 1})
        seen: list[dict] = []
        relays = [asyncio.create_task(c.call("echo", "relay", {"service": "neighbour"}, on_event=seen.append,
                                             timeout=30)) for _ in range(3)]
        await until(lambda: waiting_on_others(c), what="three requests waiting on the neighbour")
        assert not any(r.done() for r in relays)
        assert (await c.call("echo", "echo", {"n": 2}, timeout=3.0))["echo"] == {"n": 2}
        table = await c.call("broker", "workers")
        assert table["services"]["echo"][0]["waiting_on_others"] == 3
        neighbour = system.start_test_worker("neighbour")
        for r in relays:
            assert (await asyncio.wait_for(r, 30))["relayed"]["pid"] == neighbour.pid


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
