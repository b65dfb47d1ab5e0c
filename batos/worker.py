"""The worker runtime every BAT OS service uses.

A service is a table of handlers (``command -> async fn(Request, TheRequestStruct) -> TheReplyStruct``),
each command typed in ``proto/`` (:mod:`proto.contract`): a table with a command proto has no type for is
refused before the process starts anything. This module decodes each body into its type once and encodes
the typed reply once, and hides the frames: READY, heartbeats both ways (they keep flowing while handlers work,
because handlers put CPU or blocking IO in threads), dispatch through the whitelist,
streamed events, exactly one reply or error per request, cancellation, reconnect with
backoff when the broker goes away, and a graceful drain on SIGTERM/SIGINT.

Restarts (issue 14): a worker that re-registers (the broker restarted, or went silent) lists in
its READY the requests it is still running, so their answers still reach their callers. A
graceful stop gives in-flight work ``SHUTDOWN_GRACE`` seconds and then leaves what is unfinished
to the broker, which re-queues it when it is retry-safe and otherwise says the worker restarted:
a ``cancelled`` answer only ever means somebody cancelled. While a handler waits on another
service's answer (``ctx.client.call``), its request holds no slot: heartbeats tell the broker
how many are waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, cast

import msgspec
import zmq
import zmq.asyncio

import proto
from batos import __version__, curve
from batos.client import CALL_WAIT, Client
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
from proto import Envelope, ErrorCode, Kind, contract
from proto.bodies import runtime

__all__ = ["Context", "Request", "ServiceError", "ServiceWorker", "run_service", "run_services", "typed_commands"]

log = logging.getLogger("batos.worker")

# ``async fn(Request, <the command's request Struct>) -> <its reply Struct>`` (proto.contract): the runtime
# checks at start-up that every command has those types (typed_commands), and decodes and encodes against them.
Handler = Callable[["Request", Any], Awaitable[contract.Reply]]
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


# Requests taken from the socket per wake-up before other callbacks (heartbeats, handlers) get a turn.
_BATCH = 256
# Outbound messages held while the broker is not reading; past this, ``_send`` callers wait.
_OUTBOX_MAX = 10_000
# Plain ints: pyzmq 27's enum flags cost more in Python operators than the socket calls themselves.
_POLLIN = int(zmq.POLLIN)
_POLLOUT = int(zmq.POLLOUT)
_NOBLOCK = int(zmq.NOBLOCK)
_EVENTS = zmq.EVENTS
_EVENT_LOCK = threading.Lock()


class Request:
    def __init__(self, env: Envelope, client_frame: bytes, worker: ServiceWorker):
        self.env = env
        self.id = env.id
        self.command = env.command
        self.args: dict[str, Any] = env.body  # the body as sent; the handler gets it decoded into its type
        self.ctx = worker.ctx
        self.client = worker.ctx.client
        self._worker = worker
        self._client_frame = client_frame
        self._loop = worker.loop
        self._cancelled: threading.Event | None = None
        self._started = False
        self._abandoned = False  # left to the broker by a graceful stop: no answer is sent
        self._waits = 0  # calls to other services this request is waiting on now

    @property
    def sender(self) -> str:
        return self._client_frame.decode("utf-8", "replace")

    @property
    def cancelled(self) -> threading.Event:
        """Set when the requester cancels or disconnects; safe to poll from threads."""
        # Made on first use: most requests never look at it and an Event costs more than the rest of a
        # Request. The lock keeps a thread and the loop from each making their own.
        ev = self._cancelled
        if ev is None:
            with _EVENT_LOCK:
                if self._cancelled is None:
                    self._cancelled = threading.Event()
                ev = self._cancelled
        return ev

    def _is_cancelled(self) -> bool:
        return self._cancelled is not None and self._cancelled.is_set()

    def _note_wait(self, delta: int) -> None:
        """Told by the client (CALL_WAIT) when this request starts or stops waiting on another service."""
        if proto.is_control(self._worker.service, self.command):
            return  # a control request holds no slot anyway
        self._waits += delta
        if (self._waits > 0) != (self.id in self._worker.waiting):
            self._worker._set_waiting(self.id, self._waits > 0)

    async def emit(self, name: str, **data: Any) -> None:
        """Stream an event to the requester (and only to it)."""
        if not self._is_cancelled():
            frame = self._worker._event_frame(self.env, name, data)
            if frame is not None:
                await self._worker._send(frame)

    def emit_threadsafe(self, name: str, **data: Any) -> None:
        """Emit from a worker thread: the socket is touched only by the event loop."""
        self._loop.call_soon_threadsafe(self._emit_now, name, data)

    def _emit_now(self, name: str, data: dict[str, Any]) -> None:
        if not self._is_cancelled():
            frame = self._worker._event_frame(self.env, name, data)
            if frame is not None:
                self._worker._post(frame)

    async def run_blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self._loop.run_in_executor(self.ctx.executor, fn, *args)


class ServiceWorker:
    """One DEALER connection serving one service.

    The socket is a plain (synchronous) pyzmq socket driven by the event loop: ``loop.add_reader``
    on its FD wakes :meth:`_pump`, which takes every queued message with non-blocking receives,
    and replies go out with non-blocking sends. That skips zmq.asyncio's future per operation,
    which cost more than the rest of a request. The ZeroMQ FD is edge-triggered and any socket
    call may consume its edge, so once per loop iteration after sending we ask the socket
    (``EVENTS``) whether input or room for output is waiting, and pump again if so.
    """

    def __init__(self, service: str, handlers: Mapping[str, Handler], ctx: Context, capacity: int):
        self.service = service
        self.handlers = handlers
        self.specs = typed_commands(service, handlers)
        self.ctx = ctx
        self.capacity = capacity
        self.max_frame = ctx.settings.max_frame_bytes
        self.identity = f"{service}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}".encode()
        self.zctx = zmq.asyncio.Context.instance()
        self.loop = asyncio.get_running_loop()
        self.sock: zmq.Socket[bytes] | None = None
        self._fd: int | None = None
        self.tasks: dict[str, tuple[asyncio.Task[None], Request]] = {}
        self.served = 0
        self.last_broker_msg = time.monotonic()
        self.draining = False
        self._outbox: deque[bytes] = deque()
        self._outbox_room = asyncio.Event()
        self._outbox_room.set()
        self._pump_scheduled = False
        self._rearm_scheduled = False
        self._registering = False
        self.waiting: set[str] = set()  # requests whose handler waits on another service
        self._beat_scheduled = False

    # -- connection ---------------------------------------------------------------------------

    def connect(self) -> None:
        self._close_socket()
        sock = zmq.Socket(self.zctx, zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, self.identity)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        if self.ctx.settings.curve_enabled:
            curve.configure_client(sock, self.ctx.settings, self.ctx.settings.curve_service_key)
        sock.connect(self.ctx.settings.broker_endpoint)
        self.sock = sock
        self._fd = sock.FD
        self.loop.add_reader(self._fd, self._pump)
        self._register()

    def _register(self) -> None:
        """READY: the service, and what it still runs (a new broker adopts them, the same one keeps them)."""
        self._registering = False
        self.last_broker_msg = time.monotonic()
        # what it still runs: a new broker adopts them, the same broker keeps routing them
        holding = [{"id": rid, "command": req.command, "client": req._client_frame}
                   for rid, (_, req) in self.tasks.items()
                   if not req._abandoned and req._client_frame][:proto.MAX_WORKER_CAPACITY]  # READY's bound
        self._post(proto.encode(proto.control(Kind.READY, service=self.service, body={
            "capacity": self.capacity, "version": __version__, "pid": os.getpid(), "holding": holding})))
        if self.waiting:
            self._beat()
        log.info("%s: READY sent to %s%s", self.identity.decode(), self.ctx.settings.broker_endpoint,
                 f" (still running {len(holding)} request(s))" if holding else "")

    def _close_socket(self) -> None:
        if self.sock is not None:
            if self._fd is not None:
                self.loop.remove_reader(self._fd)  # before close: the FD dies with the socket
            self.sock.close(linger=0)
            self.sock = self._fd = None
        # what was held for the old connection would reach a broker that no longer expects it
        self._outbox.clear()
        self._outbox_room.set()

    # -- the socket ---------------------------------------------------------------------------

    def _post(self, frame: bytes) -> None:
        """Send now if the socket takes it, else queue it behind what is already waiting (order kept)."""
        sock = self.sock
        if sock is None:
            return
        if self._outbox:
            self._outbox.append(frame)
            return
        try:
            sock.send(frame, _NOBLOCK)  # every message to the broker is one frame
        except zmq.Again:  # the broker is not reading: hold it until the socket has room
            self._outbox.append(frame)
        except zmq.ZMQError as e:
            log.warning("%s: send failed: %s", self.service, e)
            return
        if not self._rearm_scheduled:
            self._rearm_scheduled = True
            self.loop.call_soon(self._rearm)

    async def _send(self, frame: bytes) -> None:
        """:meth:`_post`, then wait while the outbox is over its bound (backpressure for emitters)."""
        self._post(frame)
        while len(self._outbox) >= _OUTBOX_MAX and self.sock is not None:  # rare: the broker is not reading
            self._outbox_room.clear()
            await self._outbox_room.wait()

    def _rearm(self) -> None:
        # Our sends may have consumed the FD's edge for input (or output room) that is now waiting.
        self._rearm_scheduled = False
        if self.sock is not None:
            events = cast(int, self.sock.get(_EVENTS))  # EVENTS is an int option; get() is typed for any
            if events & _POLLIN or (self._outbox and events & _POLLOUT):
                self._schedule_pump()

    def _schedule_pump(self) -> None:
        if not self._pump_scheduled:
            self._pump_scheduled = True
            self.loop.call_soon(self._pump)

    def _pump(self) -> None:
        self._pump_scheduled = False
        sock = self.sock
        if sock is None:
            return
        recv = sock.recv
        get = cast(Callable[[int], int], sock.get)  # only asks EVENTS, an int option
        got = 0
        # Ask EVENTS before each receive rather than receiving until zmq.Again: raising Again costs
        # far more than the question (10-30 µs against ~2 for a lone request after a quiet spell).
        while get(_EVENTS) & _POLLIN:
            if got == _BATCH:  # more is waiting: come back after the tasks just started had a turn
                self._schedule_pump()
                break
            # recv_multipart asks getsockopt(RCVMORE) per frame (slow in pyzmq 27); Frame.more is free
            try:
                part = recv(_NOBLOCK, copy=False)
            except zmq.Again:
                break
            frames = [part.bytes]
            while part.more:
                part = recv(_NOBLOCK, copy=False)
                frames.append(part.bytes)
            got += 1
            try:
                self._on_frames(frames)
            except Exception:  # never leave the socket half drained: its FD would not fire again
                log.exception("%s: failed to handle a message", self.service)
            if self.sock is not sock:
                return
        if got:
            self.last_broker_msg = time.monotonic()
        if self._outbox:
            self._flush(sock)

    def _flush(self, sock: zmq.Socket[bytes]) -> None:
        outbox = self._outbox
        while outbox:
            try:
                sock.send(outbox[0], _NOBLOCK)
            except zmq.Again:
                break
            except zmq.ZMQError as e:
                log.warning("%s: send failed: %s", self.service, e)
            outbox.popleft()
        if len(outbox) < _OUTBOX_MAX:
            self._outbox_room.set()
        if not self._rearm_scheduled:
            self._rearm_scheduled = True
            self.loop.call_soon(self._rearm)

    # -- loops --------------------------------------------------------------------------------

    async def run(self) -> None:
        self.connect()
        try:
            await self._heartbeat_loop()
        finally:
            self._close_socket()

    def _beat(self) -> None:
        body: dict[str, Any] = {"draining": True} if self.draining else {}
        if self.waiting:
            body["waiting"] = len(self.waiting)
        self._post(proto.encode(proto.control(Kind.HEARTBEAT, service=self.service, body=body)))

    def _set_waiting(self, req_id: str, waiting: bool) -> None:
        if waiting:
            self.waiting.add(req_id)
        else:
            self.waiting.discard(req_id)
        if not self._beat_scheduled:  # one heartbeat per loop turn however many requests changed
            self._beat_scheduled = True
            self.loop.call_soon(self._changed_beat)

    def _changed_beat(self) -> None:
        self._beat_scheduled = False
        self._beat()

    async def _heartbeat_loop(self) -> None:
        delay = RECONNECT_INITIAL
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL)
            self._beat()
            silent = time.monotonic() - self.last_broker_msg
            if silent > HEARTBEAT_INTERVAL * HEARTBEAT_LIVENESS and not self.draining:
                log.warning("%s: broker silent for %.1f s; reconnecting in %.1f s", self.service, silent, delay)
                await asyncio.sleep(delay)
                delay = min(RECONNECT_MAX, delay * 2)
                self.connect()
            else:
                delay = RECONNECT_INITIAL

    def _on_frames(self, frames: list[bytes]) -> None:
        try:
            env = proto.decode(frames[-1], self.max_frame)
        except proto.ProtocolError as e:
            log.warning("%s: dropped malformed frame from broker: %s", self.service, e.message)
            if len(frames) == 2:  # it came with a client frame: answer that client
                self._post(proto.encode(proto.error(
                    e.code, e.message, corr=e.partial.get("id", ""), service=self.service)))
            return
        match env.kind:
            case Kind.REQUEST if len(frames) == 2:
                self._start(env, frames[0])
            case Kind.CANCEL:
                entry = self.tasks.get(env.corr)
                if entry is not None:
                    task, req = entry
                    req.cancelled.set()
                    if req._started:  # a task cancelled before its first step would never run _serve
                        task.cancel()
            case Kind.DISCONNECT:
                # A new broker answers each message of ours with one: re-register once per burst, on this same
                # connection. A fresh socket would race the broker's notice that the old connection closed (its
                # descriptor reused by the new one): the broker would drop the worker it had just registered.
                if not self._registering:
                    log.info("%s: broker asked us to re-register", self.service)
                    self._registering = True
                    self.loop.call_soon(self._register)
            case Kind.ERROR:
                log.warning("%s: broker error: %s", self.service, env.body)
            case _:
                pass  # heartbeats only refresh liveness

    def _start(self, env: Envelope, client_frame: bytes) -> None:
        req = Request(env, client_frame, self)
        task = self.loop.create_task(self._serve(req), name=f"{self.service}.{env.command}.{env.id[:8]}")
        self.tasks[env.id] = (task, req)

    async def _serve(self, req: Request) -> None:
        env = req.env
        req._started = True
        CALL_WAIT.set(req._note_wait)  # this task's context (and its children's): see Client.call
        try:
            handler = self.handlers.get(env.command)
            if handler is None:
                raise ServiceError(ErrorCode.UNKNOWN_COMMAND,
                                   f"{self.service} does not understand {env.command!r}; it answers: "
                                   + ", ".join(sorted(self.handlers)))
            if req._is_cancelled():  # cancelled while it waited for its first step: do not start it
                out = self._cancelled_error(env)
            else:
                out = proto.reply(env, await self._run_handler(handler, req))
        except ServiceError as e:
            out = proto.error_for(env, e.code, e.message, e.details)
        except asyncio.CancelledError:
            req.cancelled.set()
            out = self._cancelled_error(env)
        except Exception as e:
            if req._abandoned:  # the failure is the graceful stop's doing, not the request's
                out = self._cancelled_error(env)
            else:
                ref = uuid.uuid4().hex[:8]
                log.error("%s.%s failed (ref %s):\n%s", self.service, env.command, ref, traceback.format_exc())
                code, message = explain_failure(self.service, env.command, e, ref)
                out = proto.error_for(env, code, message, {"ref": ref})
        finally:
            self.tasks.pop(env.id, None)
            if env.id in self.waiting:
                self._set_waiting(env.id, False)
        self.served += 1
        if req._abandoned:
            return  # left to the broker (drain): it re-queues the request or says the worker restarted
        try:
            frame = proto.encode(out)
        except (TypeError, ValueError) as e:  # an unencodable reply body
            log.error("%s.%s: reply not encodable: %s", self.service, env.command, e)
            frame = proto.encode(proto.error_for(env, ErrorCode.INTERNAL,
                                                 f"{self.service}.{env.command} produced an answer that cannot be "
                                                 "sent (a value of an unsupported type or nested too deep)"))
        if len(frame) > self.max_frame:  # the broker would refuse it and the caller would only time out
            log.warning("%s.%s: reply of %d bytes is over the %d-byte limit", self.service, env.command,
                        len(frame), self.max_frame)
            frame = proto.encode(proto.error_for(
                env, ErrorCode.TOO_LARGE, f"{self.service}.{env.command}'s answer is {len(frame)} bytes, over the "
                f"{self.max_frame}-byte message limit; ask for less (a smaller limit, or the next page)"))
        await self._send(frame)

    async def _run_handler(self, handler: Handler, req: Request) -> dict[str, Any]:
        """Decode the body into the command's request type, run the handler, encode its typed reply."""
        s = self.specs[req.command]
        try:
            args = contract.decode_request(s, req.args)
        except proto.ProtocolError as e:
            raise ServiceError(e.code, f"{self.service}.{req.command}: {e.message.partition(': ')[2]}") from None
        return contract.encode_reply(s, await handler(req, args))

    def _event_frame(self, env: Envelope, name: str, data: dict[str, Any]) -> bytes | None:
        """An encoded event, or None (logged) when it cannot be sent: the request itself goes on."""
        try:
            frame = proto.encode(proto.event(env, name, data))
        except (TypeError, ValueError) as e:
            log.warning("%s.%s: event %r not encodable: %s", self.service, env.command, name, e)
            return None
        if len(frame) > self.max_frame:
            log.warning("%s.%s: event %r of %d bytes dropped (limit %d)", self.service, env.command, name,
                        len(frame), self.max_frame)
            return None
        return frame

    def _cancelled_error(self, env: Envelope) -> Envelope:
        return proto.error_for(env, ErrorCode.CANCELLED, f"{self.service}.{env.command} was cancelled")

    async def drain(self, grace: float) -> None:
        """Take no new work, give in-flight work ``grace`` seconds, then stop what is left and leave it to
        the broker (DISCONNECT): it runs a retry-safe request again on the next worker and answers the others
        ``worker_lost`` ("restarted"), never ``cancelled``."""
        self.draining = True
        self._beat()
        pending = [t for t, _ in self.tasks.values()]
        if pending:
            _, late = await asyncio.wait(pending, timeout=grace)
            for _, req in list(self.tasks.values()):
                req._abandoned = True
                req.cancelled.set()  # handlers in threads poll it
            for t in late:
                t.cancel()
            if late:
                await asyncio.wait(late, timeout=1.0)
        self._post(proto.encode(proto.control(Kind.DISCONNECT, service=self.service)))
        self._close_socket()

    def describe(self) -> dict[str, Any]:
        return {"service": self.service, "identity": self.identity.decode(), "pid": os.getpid(),
                "version": __version__, "uptime_s": round(time.time() - self.ctx.started, 1),
                "served": self.served, "inflight": len(self.tasks), "commands": sorted(self.handlers)}


def typed_commands(service: str, handlers: Mapping[str, Handler]) -> dict[str, contract.CommandSpec]:
    """Each command's request and reply types (proto.contract); TypeError naming every command without them.

    There is no untyped path: a body is decoded into its type before any handler runs, so a table that serves a
    command proto does not describe is a programming error, refused at start-up rather than at the first request."""
    specs = {name: contract.spec(service, name) for name in handlers}
    missing = sorted(name for name, s in specs.items() if s is None)
    if missing:
        raise TypeError(f"{service}: no request/reply type in proto/ for {', '.join(f'{service}.{m}' for m in missing)}"
                        f"; every command a worker serves is typed: declare its request with "
                        f"@proto.contract.command({service!r}, name) on a Call subclass (proto/bodies/<service>.py)")
    return {name: s for name, s in specs.items() if s is not None}


# Exceptions that mean "a connection this service needs went away", by class name so that this
# runtime need not import ZEO or ZODB: the fix is to wait for it to come back, not a bug to report.
_STORAGE_LOST = {"ClientDisconnected", "DisconnectedError", "ClientStorageError"}
_CONFLICT = {"ConflictError", "ReadConflictError", "WriteConflictError"}


def explain_failure(service: str, command: str, exc: BaseException, ref: str) -> tuple[ErrorCode, str]:
    """Plain words for an exception a handler did not expect; the raw text stays in the log (``ref``)."""
    names = {c.__name__ for c in type(exc).__mro__}
    what = f"{service}.{command}"
    if names & _STORAGE_LOST:
        return ErrorCode.UNAVAILABLE, (f"{what} could not finish: {service} lost its connection to the object "
                                       "store (ZEO), which is probably restarting. It reconnects by itself; "
                                       "try again in a few seconds.")
    if names & _CONFLICT:
        return ErrorCode.CONFLICT, f"{what} collided with a concurrent change to the same objects; try again."
    if isinstance(exc, ConnectionError):
        return ErrorCode.UNAVAILABLE, (f"{what} could not finish: a connection it needed was closed or refused. "
                                       "If a service is restarting, try again in a few seconds.")
    if isinstance(exc, TimeoutError):
        return ErrorCode.TIMEOUT, f"{what} gave up waiting for something it needed; try again."
    if isinstance(exc, MemoryError):
        return ErrorCode.INTERNAL, f"{what} ran out of memory; try a smaller request."
    return ErrorCode.INTERNAL, (f"{what} failed with an internal error (reference {ref} in the {service} log); "
                                f"{service} is still running.")


def _builtin_handlers(worker_ref: list[ServiceWorker],
                      status_hook: Callable[[Context], Awaitable[dict[str, Any]]] | None) -> dict[str, Handler]:
    async def ping(req: Request, _: runtime.Ping) -> runtime.PingReply:
        return runtime.PingReply(pong=True, service=worker_ref[0].service)

    async def status(req: Request, _: runtime.Status) -> runtime.StatusReply:
        out = worker_ref[0].describe()
        if status_hook is not None:
            out.update(await status_hook(req.ctx))
        # A service's own status type (a StatusReply subclass) says what its hook adds.
        reply_type = contract.spec(worker_ref[0].service, "status").reply  # type: ignore[union-attr]
        return cast(runtime.StatusReply, msgspec.convert(out, reply_type))

    return {"ping": ping, "status": status}


def configure_logging(name: str, settings: Settings | None = None) -> None:
    logging.basicConfig(level=(settings or load()).log_level, stream=sys.stderr,
                        format=f"%(asctime)s {name}[%(process)d] %(levelname)s %(name)s: %(message)s")


async def serve(
    services: Sequence[tuple[str, Mapping[str, Handler], int]],
    *,
    settings: Settings | None = None,
    startup: Hook | None = None,
    shutdown: Hook | None = None,
    status: Callable[[Context], Awaitable[dict[str, Any]]] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    for name, handlers, _ in services:  # refuse an untyped table before starting anything
        typed_commands(name, handlers)
    settings = settings or load()
    executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="batos-work")
    client = Client(settings, identity=f"{services[0][0]}-client-{os.getpid()}-{uuid.uuid4().hex[:6]}",
                    curve_key=settings.curve_service_key)
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
        # Everything made so far (modules, settings, models loaded by startup) lives as long as the
        # process: freeze it out of the collector, or each full collection walks all of it (12-15 ms
        # pauses in the echo worker, more with a model loaded) while requests wait.
        gc.collect()
        gc.freeze()
        runs = [asyncio.create_task(w.run(), name=f"worker-{w.service}") for w in workers]
        stopper = asyncio.create_task(ctx.stopping.wait())
        done, _ = await asyncio.wait([*runs, stopper], return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            exc = None if t is stopper or t.cancelled() else t.exception()
            if exc is not None:
                raise exc
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


def run_services(services: Sequence[tuple[str, Mapping[str, Handler], int]], **kwargs: Any) -> None:
    """Entry point for a process serving one or more services; exits 0 after a clean drain."""
    configure_logging("+".join(s for s, _, _ in services), kwargs.get("settings"))
    asyncio.run(serve(services, **kwargs))


def run_service(service: str, handlers: Mapping[str, Handler], *, capacity: int = 8, **kwargs: Any) -> None:
    run_services([(service, handlers, capacity)], **kwargs)
