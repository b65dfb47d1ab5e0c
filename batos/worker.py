"""The worker runtime every BAT OS service uses.

A service is a table of handlers (``command -> async fn(Request) -> dict``); this module
hides the frames: READY, heartbeats both ways (they keep flowing while handlers work,
because handlers put CPU or blocking IO in threads), dispatch through the whitelist,
streamed events, exactly one reply or error per request, cancellation, reconnect with
backoff when the broker goes away, and a graceful drain on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

import proto
from batos import __version__, curve
from batos.client import Client
from batos.config import (
    HEARTBEAT_INTERVAL,
    HEARTBEAT_LIVENESS,
    RECONNECT_INITIAL,
    RECONNECT_MAX,
    SHUTDOWN_GRACE,
    Settings,
    load,
)
from batos.errors import ServiceError
from proto import Envelope, ErrorCode, Kind

__all__ = ["Context", "Request", "ServiceError", "ServiceWorker", "run_service", "run_services"]

log = logging.getLogger("batos.worker")

Handler = Callable[["Request"], Awaitable[dict[str, Any]]]
Hook = Callable[["Context"], Awaitable[None]]


@dataclass
class Context:
    """What a process's handlers share: settings, a client for calling other services, state."""

    settings: Settings
    client: Client
    executor: ThreadPoolExecutor
    state: dict[str, Any] = field(default_factory=dict)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    started: float = field(default_factory=time.time)


class Request:
    def __init__(self, env: Envelope, client_frame: bytes, worker: ServiceWorker):
        self.env = env
        self.id = env.id
        self.command = env.command
        self.args: dict[str, Any] = env.body
        self.sender = client_frame.decode("utf-8", "replace")
        self.ctx = worker.ctx
        self.client = worker.ctx.client
        self.cancelled = threading.Event()
        self._worker = worker
        self._client_frame = client_frame
        self._loop = asyncio.get_running_loop()

    async def emit(self, name: str, **data: Any) -> None:
        """Stream an event to the requester (and only to it)."""
        if not self.cancelled.is_set():
            await self._worker.send_to_client(self._client_frame, proto.event(self.env, name, data))

    def emit_threadsafe(self, name: str, **data: Any) -> None:
        """Emit from a worker thread: the socket is touched only by the event loop."""
        self._loop.call_soon_threadsafe(self._worker._spawn, self.emit(name, **data))

    async def run_blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self._loop.run_in_executor(self.ctx.executor, fn, *args)

    def arg(self, name: str, kind: type | tuple[type, ...], default: Any = ..., *, required: bool = False) -> Any:
        """A typed argument, or a clear ``bad_args`` error naming it."""
        if name not in self.args or self.args[name] is None:
            if required or default is ...:
                raise ServiceError(ErrorCode.BAD_ARGS, f"{self.command}: missing argument {name!r}")
            return default
        value = self.args[name]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float)):
            expected = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise ServiceError(ErrorCode.BAD_ARGS,
                               f"{self.command}: argument {name!r} must be {expected}, got {type(value).__name__}")
        return value


class ServiceWorker:
    """One DEALER connection serving one service."""

    def __init__(self, service: str, handlers: dict[str, Handler], ctx: Context, capacity: int):
        self.service = service
        self.handlers = handlers
        self.ctx = ctx
        self.capacity = capacity
        self.identity = f"{service}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}".encode()
        self.zctx = zmq.asyncio.Context.instance()
        self.sock: zmq.asyncio.Socket | None = None
        self.tasks: dict[str, tuple[asyncio.Task, Request]] = {}
        self.served = 0
        self.last_broker_msg = time.monotonic()
        self.draining = False
        self._background: set[asyncio.Future] = set()

    def _spawn(self, coro: Awaitable[Any]) -> None:
        fut = asyncio.ensure_future(coro)
        self._background.add(fut)
        fut.add_done_callback(self._background.discard)

    # -- connection ---------------------------------------------------------------------------

    async def connect(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
        sock = self.zctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, self.identity)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        if self.ctx.settings.curve_enabled:
            curve.configure_client(sock, self.ctx.settings, "services")
        sock.connect(self.ctx.settings.broker_endpoint)
        self.sock = sock
        self.last_broker_msg = time.monotonic()
        await self._send([proto.encode(proto.control(Kind.READY, service=self.service, body={
            "capacity": self.capacity, "version": __version__, "pid": os.getpid()}))])
        log.info("%s: READY sent to %s", self.identity.decode(), self.ctx.settings.broker_endpoint)

    async def _send(self, frames: list[bytes]) -> None:
        if self.sock is None:
            return
        # no lock: multipart sends from many tasks on one socket do not interleave (FIELD_NOTES).
        # Try the plain non-blocking send first: it skips the future machinery on the hot path.
        try:
            zmq.Socket.send_multipart(self.sock, frames, zmq.NOBLOCK)
            return
        except zmq.Again:
            pass
        except zmq.ZMQError as e:
            log.warning("%s: send failed: %s", self.service, e)
            return
        try:
            await self.sock.send_multipart(frames)
        except zmq.ZMQError as e:
            log.warning("%s: send failed: %s", self.service, e)

    async def send_to_client(self, client_frame: bytes, env: Envelope) -> None:
        # Routed by the broker through ``corr``; the client frame is not needed on the wire.
        await self._send([proto.encode(env)])

    # -- loops --------------------------------------------------------------------------------

    async def run(self) -> None:
        await self.connect()
        heartbeat = asyncio.create_task(self._heartbeat_loop())
        try:
            while not self.ctx.stopping.is_set():
                assert self.sock is not None
                sock = self.sock
                try:
                    frames = await sock.recv_multipart()
                    batch = [frames]
                    while len(batch) < 256:  # drain what is queued before yielding to the loop
                        try:
                            batch.append(await sock.recv_multipart(zmq.NOBLOCK))
                        except zmq.Again:
                            break
                except asyncio.CancelledError:
                    # closing a socket cancels its pending recv: that is a reconnect, not a stop
                    task = asyncio.current_task()
                    if self.sock is sock or (task is not None and task.cancelling()):
                        raise
                    continue
                except zmq.ZMQError:
                    if self.sock is sock:  # closed under us by a reconnect
                        raise
                    continue
                self.last_broker_msg = time.monotonic()
                for frames in batch:
                    self._on_frames(frames)
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat

    async def _heartbeat_loop(self) -> None:
        delay = RECONNECT_INITIAL
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL)
            body = {"draining": True} if self.draining else {}
            await self._send([proto.encode(proto.control(Kind.HEARTBEAT, service=self.service, body=body))])
            silent = time.monotonic() - self.last_broker_msg
            if silent > HEARTBEAT_INTERVAL * HEARTBEAT_LIVENESS and not self.draining:
                log.warning("%s: broker silent for %.1f s; reconnecting in %.1f s", self.service, silent, delay)
                await asyncio.sleep(delay)
                delay = min(RECONNECT_MAX, delay * 2)
                await self.connect()
            else:
                delay = RECONNECT_INITIAL

    def _on_frames(self, frames: list[bytes]) -> None:
        try:
            env = proto.decode(frames[-1])
        except proto.ProtocolError as e:
            log.warning("%s: dropped malformed frame from broker: %s", self.service, e.message)
            if len(frames) == 2:  # it came with a client frame: answer that client
                self._spawn(self._send([proto.encode(proto.error(
                    e.code, e.message, corr=e.partial.get("id", ""), service=self.service))]))
            return
        match env.kind:
            case Kind.REQUEST if len(frames) == 2:
                self._start(env, frames[0])
            case Kind.CANCEL:
                entry = self.tasks.get(env.corr)
                if entry is not None:
                    entry[1].cancelled.set()
                    entry[0].cancel()
            case Kind.DISCONNECT:
                log.info("%s: broker asked us to re-register", self.service)
                self._spawn(self.connect())
            case Kind.ERROR:
                log.warning("%s: broker error: %s", self.service, env.body)
            case _:
                pass  # heartbeats only refresh liveness

    def _start(self, env: Envelope, client_frame: bytes) -> None:
        req = Request(env, client_frame, self)
        task = asyncio.create_task(self._serve(req), name=f"{self.service}.{env.command}.{env.id[:8]}")
        self.tasks[env.id] = (task, req)
        task.add_done_callback(lambda _t, rid=env.id: self.tasks.pop(rid, None))

    async def _serve(self, req: Request) -> None:
        env = req.env
        try:
            handler = self.handlers.get(env.command)
            if handler is None:
                raise ServiceError(ErrorCode.UNKNOWN_COMMAND,
                                   f"{self.service} does not understand {env.command!r}; it answers: "
                                   + ", ".join(sorted(self.handlers)))
            body = await handler(req)
            out = proto.reply(env, body if isinstance(body, dict) else {"result": body})
        except ServiceError as e:
            out = proto.error_for(env, e.code, e.message, e.details)
        except asyncio.CancelledError:
            req.cancelled.set()
            out = proto.error_for(env, ErrorCode.CANCELLED, f"{self.service}.{env.command} was cancelled")
        except Exception as e:  # a bug in a handler must not kill the worker; the caller learns what
            log.error("%s.%s failed:\n%s", self.service, env.command, traceback.format_exc())
            out = proto.error_for(env, ErrorCode.INTERNAL, f"{type(e).__name__}: {e}")
        self.served += 1
        try:
            await self._send([proto.encode(out)])
        except (TypeError, ValueError) as e:  # an unencodable reply body
            await self._send([proto.encode(proto.error_for(env, ErrorCode.INTERNAL, f"reply not encodable: {e}"))])

    async def drain(self, grace: float) -> None:
        """Take no new work, give in-flight work ``grace`` seconds, then cancel what is left."""
        self.draining = True
        await self._send([proto.encode(proto.control(Kind.HEARTBEAT, service=self.service,
                                                     body={"draining": True}))])
        pending = [t for t, _ in self.tasks.values()]
        if pending:
            _, late = await asyncio.wait(pending, timeout=grace)
            for t in late:
                t.cancel()
            if late:
                await asyncio.wait(late, timeout=1.0)
        await self._send([proto.encode(proto.control(Kind.DISCONNECT, service=self.service))])
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None

    def describe(self) -> dict[str, Any]:
        return {"service": self.service, "identity": self.identity.decode(), "pid": os.getpid(),
                "version": __version__, "uptime_s": round(time.time() - self.ctx.started, 1),
                "served": self.served, "inflight": len(self.tasks), "commands": sorted(self.handlers)}


def _builtin_handlers(worker_ref: list[ServiceWorker], status_hook: Callable[[Context], Awaitable[dict]] | None):
    async def ping(req: Request) -> dict[str, Any]:
        return {"pong": True, "service": worker_ref[0].service}

    async def status(req: Request) -> dict[str, Any]:
        out = worker_ref[0].describe()
        if status_hook is not None:
            out.update(await status_hook(req.ctx))
        return out

    return {"ping": ping, "status": status}


def configure_logging(name: str) -> None:
    logging.basicConfig(level=os.environ.get("BATOS_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format=f"%(asctime)s {name}[%(process)d] %(levelname)s %(name)s: %(message)s")


async def serve(
    services: Sequence[tuple[str, dict[str, Handler], int]],
    *,
    settings: Settings | None = None,
    startup: Hook | None = None,
    shutdown: Hook | None = None,
    status: Callable[[Context], Awaitable[dict]] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    settings = settings or load()
    executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="batos-work")
    client = Client(settings, identity=f"{services[0][0]}-client-{os.getpid()}-{uuid.uuid4().hex[:6]}",
                    curve_key="services")
    ctx = Context(settings=settings, client=client, executor=executor, stopping=stop or asyncio.Event())
    loop = asyncio.get_running_loop()

    def handle_signal(signum: int) -> None:
        log.info("signal %s: draining and stopping", signal.Signals(signum).name)
        ctx.stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, handle_signal, sig)
    workers: list[ServiceWorker] = []
    try:
        await client.start()
        if startup is not None:
            await startup(ctx)
        for name, handlers, capacity in services:
            ref: list[ServiceWorker] = []
            w = ServiceWorker(name, {**_builtin_handlers(ref, status), **handlers}, ctx, capacity)
            ref.append(w)
            workers.append(w)
        runs = [asyncio.create_task(w.run(), name=f"worker-{w.service}") for w in workers]
        stopper = asyncio.create_task(ctx.stopping.wait())
        done, _ = await asyncio.wait([*runs, stopper], return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if t is not stopper and not t.cancelled() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
        ctx.stopping.set()
        await asyncio.gather(*(w.drain(SHUTDOWN_GRACE) for w in workers))
        for t in runs:
            t.cancel()
        await asyncio.gather(*runs, return_exceptions=True)
        stopper.cancel()
    finally:
        if shutdown is not None:
            await shutdown(ctx)
        await client.close()
        executor.shutdown(wait=False, cancel_futures=True)


def run_services(services: Sequence[tuple[str, dict[str, Handler], int]], **kwargs: Any) -> None:
    """Entry point for a process serving one or more services; exits 0 after a clean drain."""
    configure_logging("+".join(s for s, _, _ in services))
    asyncio.run(serve(services, **kwargs))


def run_service(service: str, handlers: dict[str, Handler], *, capacity: int = 8, **kwargs: Any) -> None:
    run_services([(service, handlers, capacity)], **kwargs)
