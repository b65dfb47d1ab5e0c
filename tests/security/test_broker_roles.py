"""Roles on the wire with CurveZMQ on, against a real broker and worker (issue 13 item 7).

Before: any listed key could register as a worker for any service, answer the kernel's requests,
call internal commands (``kernel.audit_event`` forges audit events that feed the forge's training
data) and read worker identities to take one over. Now the console key is a console: it may call
the kernel's console commands and the broker's read-only ones, nothing else.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import zmq
import zmq.auth

import proto
from batos import curve
from batos.client import Client
from batos.errors import ServiceError
from tests.waiting import until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CURVE = {"BATOS_CURVE_ENABLED": "1", "BATOS_EXTRA_SERVICES": "echo"}


@pytest.fixture
def curve_system(system):
    curve.ensure_keys(system.settings.model_copy(update={"curve_enabled": True}))
    system.start_broker(**CURVE)
    system.start_test_worker("echo", **CURVE)
    return system


def _settings(system):
    return system.settings.model_copy(update={"curve_enabled": True, "broker_endpoint": system.endpoint})


def _raw_dealer(system, key: str, identity: bytes) -> tuple[zmq.Context, zmq.Socket]:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, identity)
    curve.configure_client(sock, _settings(system), key)
    sock.connect(system.endpoint)
    return ctx, sock


async def test_console_key_reaches_only_console_commands(curve_system):
    system = curve_system
    async with Client(_settings(system), identity="svc-client", curve_key="services") as svc, \
            Client(_settings(system), identity="console-client", curve_key="console") as con:
        await system.wait_registered(svc, {"echo": 1})
        assert (await svc.call("echo", "echo", {"n": 1}))["echo"] == {"n": 1}  # a service may call anything
        for service, command in (("echo", "echo"), ("kernel", "audit_event"), ("memory", "delete_file"),
                                 ("llm", "generate"), ("forge", "run"), ("broker", "shutdown")):
            with pytest.raises(ServiceError) as e:
                await con.call(service, command, {"event": {"forged": True}}, timeout=5)
            assert e.value.code == proto.ErrorCode.UNAUTHORIZED, (service, command, e.value)
        assert (await con.call("broker", "ping"))["pong"] is True
        table = await con.call("broker", "workers")
        assert [w["identity"] for w in table["services"]["echo"]] == [""]  # nothing to impersonate
        assert (await svc.call("broker", "workers"))["services"]["echo"][0]["identity"]
        with pytest.raises(ServiceError) as e:  # allowed by role: it waits for a kernel that is not running
            await con.call("kernel", "ask", {"question": "q"}, timeout=1.0)
        assert e.value.code == proto.ErrorCode.TIMEOUT
        status = await svc.call("broker", "status")
        assert status["stats"]["unauthorized"] >= 6


async def test_console_key_cannot_register_or_answer(curve_system):
    system = curve_system
    ctx, fake = _raw_dealer(system, "console", b"memory-fake-worker")
    try:  # sent at once: the DEALER queues it until its Curve handshake is done
        fake.send(proto.encode(proto.control(proto.Kind.READY, service="memory", body={"capacity": 4})))
        assert fake.poll(5000), "no answer to the READY"
        env = proto.decode(fake.recv())
        assert env.kind == proto.Kind.ERROR and env.body["code"] == "unauthorized"
        async with Client(_settings(system), curve_key="services") as svc:
            table = await svc.call("broker", "workers")
            assert "memory" not in table["services"]
    finally:
        fake.close(0)
        ctx.term()


async def unauthorized(client: Client) -> int:
    return int((await client.call("broker", "status"))["stats"]["unauthorized"])


async def test_a_worker_identity_taken_over_by_another_key_is_not_served(curve_system):
    system = curve_system
    async with Client(_settings(system), curve_key="services") as svc:
        table = await system.wait_registered(svc, {"echo": 1})
        victim = table["services"]["echo"][0]
        ctx, thief = _raw_dealer(system, "console", victim["identity"].encode())
        try:  # delivered after the handshake, when ROUTER_HANDOVER has given the thief the identity's routing
            thief.send(proto.encode(proto.control(proto.Kind.HEARTBEAT, service="echo")))
            await until(lambda: unauthorized(svc), what="the thief's heartbeat refused by the broker")
            deadline = time.monotonic() + 20
            while True:  # the broker dropped the worker; the real one re-registers and serves again
                try:
                    r = await svc.call("echo", "echo", {"n": 2}, timeout=3)
                    break
                except ServiceError:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.2)
            assert r["pid"] == victim["pid"] and r["echo"] == {"n": 2}
            stolen = []
            while thief.poll(0):
                frames = thief.recv_multipart()
                env = proto.decode(frames[-1])
                if env.kind == proto.Kind.REQUEST:
                    stolen.append(env)
            assert stolen == []
            assert (await svc.call("broker", "status"))["stats"]["unauthorized"] >= 1
        finally:
            thief.close(0)
            ctx.term()


@pytest.fixture
def listed_system(system):
    """Curve on with a key for a remote memory host, allowed to serve `memory` only."""
    settings = system.settings.model_copy(update={"curve_enabled": True})
    curve.ensure_keys(settings)
    curve.add_key(settings, "memory-host", ["memory"])
    curve.add_key(settings, "service-nolist", None)  # named like a service key, but no list: a console
    system.start_broker(**CURVE)
    return system


def _ready(sock: zmq.Socket, service: str) -> None:
    sock.send(proto.encode(proto.control(proto.Kind.READY, service=service, body={"capacity": 1})))


async def test_a_service_key_serves_only_the_services_on_its_list(listed_system):
    system = listed_system
    async with Client(_settings(system), curve_key="services") as svc:
        for key, service in (("memory-host", "llm"), ("memory-host", "kernel"), ("service-nolist", "memory")):
            ctx, sock = _raw_dealer(system, key, f"{key}-as-{service}".encode())
            try:
                _ready(sock, service)  # queued by the DEALER until its handshake is done
                assert sock.poll(5000), f"no answer to {key}'s READY for {service}"
                env = proto.decode(sock.recv())
                assert env.kind == proto.Kind.ERROR and env.body["code"] == "unauthorized", (key, service, env)
            finally:
                sock.close(0)
                ctx.term()
        ctx, sock = _raw_dealer(system, "memory-host", b"memory-host-worker")
        try:
            _ready(sock, "memory")
            table = await system.wait_registered(svc, {"memory": 1}, timeout=20)
            assert [w["pid"] for w in table["services"]["memory"]] and "llm" not in table["services"]
        finally:
            sock.close(0)
            ctx.term()


async def test_a_real_worker_presents_its_configured_service_key(listed_system):
    system = listed_system
    system.start_test_worker("memory", BATOS_CURVE_SERVICE_KEY="memory-host", **CURVE)
    system.start_test_worker("llm", BATOS_CURVE_SERVICE_KEY="memory-host", **CURVE)
    async with Client(_settings(system), curve_key="services") as svc:
        await system.wait_registered(svc, {"memory": 1})
        assert (await svc.call("memory", "echo", {"n": 3}))["echo"] == {"n": 3}
        stats = (await svc.call("broker", "status"))["stats"]
        deadline = time.monotonic() + 10
        while stats["unauthorized"] < 1 and time.monotonic() < deadline:  # the llm worker's READY, refused
            await asyncio.sleep(0.2)
            stats = (await svc.call("broker", "status"))["stats"]
        assert stats["unauthorized"] >= 1
        assert "llm" not in (await svc.call("broker", "workers"))["services"]


def test_grants_from_the_allow_list(tmp_path):
    from batos.config import load
    from broker.roles import ANY_SERVICE, key_grants, parse_services
    from proto.roles import Role

    assert parse_services("# hosts\nmemory, llm  forge\n\n*  # any\n") == {"memory", "llm", "forge", ANY_SERVICE}
    settings = load(var_dir=tmp_path / "var", curve_enabled=True)
    keys = curve.ensure_keys(settings)
    curve.add_key(settings, "gpu-host", ["llm", "forge"])
    curve.add_key(settings, "laptop", None)
    grants = {path.stem: key_grants(keys / "authorized")[zmq.auth.load_certificate(str(path))[0].decode()]
              for path in (keys / "authorized").glob("*.key")}
    assert grants["services"].serves("anything") and grants["services"].role == Role.SERVICE
    assert grants["gpu-host"].serves("llm") and not grants["gpu-host"].serves("memory")
    assert grants["console"].role == grants["laptop"].role == Role.CONSOLE
    assert not grants["console"].serves("kernel")
    assert oct((keys / "authorized" / "gpu-host.services").stat().st_mode & 0o777) == "0o600"
