"""The client and broker under faults, with real processes: restarts, long streams, dead workers, words.

- A client idle through a broker restart must not report "the broker restarted while this request
  was in flight" for a request it sends afterwards (it used to, while the work ran anyway).
- Timeouts measure silence: a request that keeps streaming events is alive past ``timeout``.
- A handler's library exception reaches the caller as plain words, never its raw text.
- A killed worker stops being listed within one heartbeat interval (its connection closes at once).
- A request lost with the broker (its worker died too) is sent again when retry-safe, and otherwise fails
  saying why it was not (issue 14 item 4).
"""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

import proto
from batos.client import Client
from batos.config import HEARTBEAT_INTERVAL
from batos.errors import ServiceError

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

EXTRA = {"BATOS_EXTRA_SERVICES": "echo"}


async def test_idle_client_does_not_blame_a_broker_restart(system):
    broker = system.start_broker(**EXTRA)
    system.start_test_worker("echo")
    endpoint = system.endpoint
    async with Client(system.settings, identity="idle-through-restart") as c:
        await system.wait_registered(c, {"echo": 1})
        assert (await c.call("echo", "echo", {"n": 1}))["echo"] == {"n": 1}
        old_boot = c.broker_boot_id
        assert old_boot
        broker.kill()
        system.start_broker(endpoint, **EXTRA)
        # at once, before the worker is back and maybe before the watcher noticed: a long streamed request
        seen: list[dict] = []
        result = await c.call("echo", "slow", {"steps": 20, "delay": 0.1}, on_event=seen.append, timeout=30)
        assert result["done"] == 20 and len(seen) == 20
        assert c.broker_boot_id not in (None, old_boot)
        # and a second one after a quiet spell longer than the watcher's interval
        await asyncio.sleep(HEARTBEAT_INTERVAL * 3)
        assert (await c.call("echo", "slow", {"steps": 15, "delay": 0.1}, timeout=30))["done"] == 15


async def test_timeouts_measure_silence_not_length(system):
    system.start_broker(**EXTRA)
    system.start_test_worker("echo")
    async with Client(system.settings) as c:
        await system.wait_registered(c, {"echo": 1})
        # 4 s of work streaming an event every 0.4 s: alive all along under a 1.5 s silence limit
        started = time.monotonic()
        result = await c.call("echo", "slow", {"steps": 10, "delay": 0.4}, timeout=1.5)
        assert result["done"] == 10 and time.monotonic() - started > 1.5
        # 4 s of silent work: times out on the silence
        with pytest.raises(ServiceError) as e:
            await c.call("echo", "spin", {"seconds": 4.0}, timeout=1.5)
        assert e.value.code == proto.ErrorCode.TIMEOUT and "no sign of progress for 1.5 s" in e.value.message
        # a caller that needs a cap on the whole call still has one
        with pytest.raises(ServiceError) as e:
            await c.call("echo", "slow", {"steps": 20, "delay": 0.2}, timeout=2.0, total_timeout=1.5)
        assert e.value.code == proto.ErrorCode.TIMEOUT and "did not finish within 1.5 s" in e.value.message
        assert (await c.call("echo", "echo", {"after": 1}))["echo"] == {"after": 1}


async def test_library_exceptions_reach_the_caller_in_plain_words(system):
    system.start_broker(**EXTRA)
    worker = system.start_test_worker("echo")
    async with Client(system.settings) as c:
        await system.wait_registered(c, {"echo": 1})
        with pytest.raises(ServiceError) as e:
            await c.call("echo", "fail", {"kind": "zeo"})
        assert e.value.code == proto.ErrorCode.UNAVAILABLE
        for raw in ("Errno", "ClientDisconnected", "Connection reset"):
            assert raw not in e.value.message
        assert "object store" in e.value.message and "try again" in e.value.message
        with pytest.raises(ServiceError) as e:
            await c.call("echo", "fail", {"kind": "bug"})
        assert e.value.code == proto.ErrorCode.INTERNAL
        assert "ValueError" not in e.value.message and "/srv/secret" not in e.value.message
        ref = e.value.details["ref"]
        assert ref in e.value.message
        deadline = time.monotonic() + 5
        while ref not in worker.tail(200):  # the raw text is kept for whoever reads the log
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        assert "/srv/secret" in worker.tail(200)


async def test_a_killed_worker_is_unlisted_within_one_heartbeat_interval(system):
    system.start_broker(**EXTRA)
    system.start_test_worker("echo", name="survivor")
    doomed = system.start_test_worker("echo", name="doomed")
    async with Client(system.settings) as c:
        await system.wait_registered(c, {"echo": 2})
        pids = {w["pid"] for w in (await c.call("broker", "workers"))["services"]["echo"]}
        assert doomed.pid in pids
        doomed.signal(signal.SIGKILL)
        killed = time.monotonic()
        while True:
            table = await c.call("broker", "workers")
            alive = [w["pid"] for w in table["services"].get("echo", []) if w["alive"]]
            if doomed.pid not in alive:
                break
            assert time.monotonic() - killed < HEARTBEAT_INTERVAL * 1.5, (
                f"the killed worker was still listed alive {time.monotonic() - killed:.1f} s after its death")
            await asyncio.sleep(0.05)
        assert len(alive) == 1


async def test_a_retry_safe_request_lost_with_the_broker_is_sent_again(system):
    """Broker and worker die together: no worker hands the request to the new broker, so the client, after
    giving workers time to re-register, sends it again because it is retry-safe (and says so)."""
    broker = system.start_broker(**EXTRA)
    first = system.start_test_worker("echo", name="first")
    endpoint = system.endpoint
    async with Client(system.settings, identity="resends-after-restart") as c:
        await system.wait_registered(c, {"echo": 1})
        seen: list[dict] = []
        call = asyncio.create_task(c.call("echo", "slow", {"steps": 30, "delay": 0.1}, on_event=seen.append,
                                          idempotent=True, timeout=30))
        while not seen:
            await asyncio.sleep(0.05)
        first.signal(signal.SIGKILL)
        broker.kill()
        system.start_broker(endpoint, **EXTRA)
        second = system.start_test_worker("echo", name="second")
        result = await asyncio.wait_for(call, 60)
        assert result == {"done": 30, "pid": second.pid}
        retry = [e for e in seen if e.get("event") == "retrying"]
        assert len(retry) == 1 and retry[0]["source"] == "client" and "broker restarted" in retry[0]["message"]


async def test_a_request_no_worker_holds_after_a_broker_restart_fails_in_plain_words(system):
    """The same, not retry-safe: it fails `unavailable`, saying why it was not sent again."""
    broker = system.start_broker(**EXTRA)
    first = system.start_test_worker("echo", name="first")
    endpoint = system.endpoint
    async with Client(system.settings, identity="fails-after-restart") as c:
        await system.wait_registered(c, {"echo": 1})
        call = await c.start_call("echo", "slow", {"steps": 30, "delay": 0.1})
        await asyncio.wait_for(anext(call.events()), 10)
        first.signal(signal.SIGKILL)
        broker.kill()
        system.start_broker(endpoint, **EXTRA)
        system.start_test_worker("echo", name="second")
        with pytest.raises(ServiceError) as e:
            await asyncio.wait_for(call.result(), 30)
        assert e.value.code == proto.ErrorCode.UNAVAILABLE and "not safe to repeat" in e.value.message
