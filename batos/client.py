"""Asynchronous client of the broker: requests, streamed events, cancellation, broker loss.

One DEALER socket per client; a reader task routes every incoming message to the pending
call it belongs to by ``corr``. The broker keeps no state across its own restart, so the
client watches it: it pings the broker every heartbeat interval, busy or idle, and so always
knows the broker's current ``boot_id``. Restarts are waited out, not reported: while the broker
does not answer, pending calls wait (up to ``settings.service_wait_s``, then ``unavailable``);
when its ``boot_id`` changes, the client asks the new broker which of its pending requests it
holds (``broker.held``; workers re-registering with the new broker hand it the requests they
still run), asking again for a few seconds while workers come back. What the new broker never
gets is sent again when it is retry-safe (``idempotent``, see proto.RETRY_SAFE; the caller sees a
``retrying`` event) and failed otherwise. A client that was idle through a restart therefore
never blames the restart for a request it sent afterwards.

Timeouts measure silence, not length: ``call(timeout=...)`` is the longest gap allowed without
a reply or an event (a request that keeps streaming tokens or progress is alive);
``total_timeout`` caps the whole call where a caller needs that.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar, cast

import zmq
import zmq.asyncio

import proto
from batos import curve
from batos.config import HEARTBEAT_INTERVAL, HEARTBEAT_LIVENESS, Settings, load
from batos.errors import ServiceError
from proto import Envelope, ErrorCode, Kind, contract
from proto.bodies.broker import BrokerPing, BrokerPingReply, Held
from proto.contract import Call, Reply

R = TypeVar("R", bound=Reply)

log = logging.getLogger("batos.client")

EventCallback = Callable[[dict[str, Any]], Awaitable[None] | None]
_FINAL = (Kind.REPLY, Kind.ERROR)
# How long after a new broker boot the client keeps asking it for requests it does not hold yet: workers
# re-register (and hand over what they still run) within a heartbeat or two, or after their own silence
# timeout and a reconnect backoff when the broker was down for longer.
RESUME_GRACE = HEARTBEAT_INTERVAL * HEARTBEAT_LIVENESS * 2
# Set by the worker runtime while a handler runs: told +1 / -1 when a call made on that request's behalf
# starts and stops waiting, so the broker does not count the wait as one of the worker's slots (issue 14).
CALL_WAIT: contextvars.ContextVar[Callable[[int], None] | None] = contextvars.ContextVar("batos_call_wait",
                                                                                         default=None)


class PendingCall:
    """A request in flight: its events arrive on a queue, ending with a reply or error."""

    def __init__(self, client: Client, req: Envelope):
        self.client = client
        self.request = req
        self.id = req.id
        self.queue: asyncio.Queue[Envelope] = asyncio.Queue()
        self.done = False

    async def events(self) -> AsyncIterator[Envelope]:
        """Every event, then the final reply or error (the iterator ends after it)."""
        while True:
            env = await self.queue.get()
            yield env
            if env.kind in _FINAL:
                return

    async def result(self, on_event: EventCallback | None = None) -> dict[str, Any]:
        async for env in self.events():
            if env.kind == Kind.EVENT:
                if on_event is not None:
                    out = on_event(env.body)
                    if asyncio.iscoroutine(out):
                        await out
            elif env.kind == Kind.ERROR:
                raise ServiceError.from_body(env.body)
            else:
                return env.body
        raise ServiceError(ErrorCode.INTERNAL, "call ended without a reply")

    async def cancel(self) -> None:
        await self.client.cancel(self.id)


class Client:
    def __init__(self, settings: Settings | None = None, *, endpoint: str | None = None,
                 identity: str | None = None, ctx: zmq.asyncio.Context | None = None,
                 curve_key: str | None = None):
        self.settings = settings or load()
        self.endpoint = endpoint or self.settings.broker_endpoint
        self.identity = identity or f"client-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.curve_key = curve_key
        self.sock: zmq.asyncio.Socket | None = None
        self.pending: dict[str, PendingCall] = {}
        self.broker_boot_id: str | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._unreachable_since: float | None = None  # when the broker stopped answering pings
        self._settle: set[str] = set()  # requests a new broker may not hold yet (it restarted)
        self._settle_until = 0.0

    async def __aenter__(self) -> Client:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        if self.sock is not None:
            return
        self.sock = self._connect()
        # a fresh context: a client started inside a handler must not charge its pings to that request
        fresh = contextvars.Context()
        self._tasks = [asyncio.create_task(self._reader(), name=f"{self.identity}-reader", context=fresh),
                       asyncio.create_task(self._watch_broker(), name=f"{self.identity}-watch", context=fresh)]

    def _connect(self) -> zmq.asyncio.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, self.identity.encode())
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        if self.settings.curve_enabled:
            curve.configure_client(sock, self.settings, self.curve_key)
        sock.connect(self.endpoint)
        return sock

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks = []
        if self.sock is not None:
            self._send_nowait(proto.control(Kind.DISCONNECT))
            self.sock.close(linger=0)
            self.sock = None
        self._fail_all(ErrorCode.CANCELLED, "client closed")

    # -- calls --------------------------------------------------------------------------------

    async def start_call(self, service: str, command: str, body: dict[str, Any] | None = None,
                         *, idempotent: bool | None = None) -> PendingCall:
        await self.start()
        if self.broker_boot_id is None and service != proto.Service.BROKER:
            # learn which broker incarnation will hold this request, to notice if it restarts
            with contextlib.suppress(ServiceError):
                self.broker_boot_id = (await self.ping(timeout=HEARTBEAT_INTERVAL)).boot_id
        req = proto.request(service, command, body, idempotent=idempotent)
        call = PendingCall(self, req)
        self.pending[req.id] = call
        try:
            await self._send(req)
        except BaseException:  # timed out or cancelled while the send waited: nobody will collect it
            self.pending.pop(req.id, None)
            raise
        return call

    async def call(self, service: str, command: str, body: dict[str, Any] | None = None, *,
                   on_event: EventCallback | None = None, timeout: float | None = 60.0,
                   total_timeout: float | None = None, idempotent: bool | None = None) -> dict[str, Any]:
        """One request and its answer. ``timeout``: the longest silence (no reply, no event) allowed;
        every event restarts it. ``total_timeout``: an optional cap on the whole call."""
        loop = asyncio.get_running_loop()
        end = None if total_timeout is None else loop.time() + total_timeout

        def next_deadline() -> float | None:
            quiet = None if timeout is None else loop.time() + timeout
            return end if quiet is None else quiet if end is None else min(quiet, end)

        # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation that arrives
        # as the reply does (the caller, e.g. close() cancelling the watcher, then waits forever),
        # and it costs a Task per call.
        deadline = asyncio.timeout_at(next_deadline())
        call: PendingCall | None = None
        note_wait = CALL_WAIT.get()
        if note_wait is not None:
            note_wait(1)
        try:
            async with deadline:
                # the send is inside the timeout too: with no reachable broker a DEALER send waits
                call = await self.start_call(service, command, body, idempotent=idempotent)
                async for env in call.events():
                    if env.kind == Kind.REPLY:
                        return env.body
                    if env.kind == Kind.ERROR:
                        raise ServiceError.from_body(env.body)
                    deadline.reschedule(next_deadline())  # an event: the request is alive
                    if on_event is not None:
                        out = on_event(env.body)
                        if asyncio.iscoroutine(out):
                            await out
                        deadline.reschedule(next_deadline())
                raise ServiceError(ErrorCode.INTERNAL, "call ended without a reply")
        except TimeoutError:
            if not deadline.expired():
                raise  # a TimeoutError of the caller's own (e.g. from on_event), not ours
            if call is not None:
                await self.cancel(call.id)
            if end is not None and loop.time() >= end:
                message = f"{service}.{command} did not finish within {total_timeout} s; it was cancelled"
            else:
                message = (f"{service}.{command} gave no reply and no sign of progress for {timeout} s; "
                           "it was cancelled")
            raise ServiceError(ErrorCode.TIMEOUT, message) from None
        except asyncio.CancelledError:
            if call is not None:
                await self.cancel(call.id)
            raise
        finally:
            if note_wait is not None:
                note_wait(-1)
            if call is not None:
                self.pending.pop(call.id, None)

    async def request(self, body: Call[R], *, service: str = "", on_event: EventCallback | None = None,
                      timeout: float | None = 60.0, total_timeout: float | None = None,
                      idempotent: bool | None = None) -> R:
        """:meth:`call` with a typed body (proto.contract): the service and command are the type's, and the
        answer comes back decoded into the command's reply type, checked once here instead of by every
        caller. A reply outside the contract is an INTERNAL error naming the field. ``service`` names the
        worker for the runtime's own commands (``ping``, ``status``), which every service answers."""
        s = contract.spec_of(body)
        if s.service == contract.ANY_SERVICE and not service:
            raise ValueError(f"{type(body).__name__} is answered by every service: say which (service=...)")
        raw = await self.call(service or s.service, s.command, contract.encode(body), on_event=on_event,
                              timeout=timeout, total_timeout=total_timeout, idempotent=idempotent)
        try:
            return cast(R, contract.decode_reply(s, raw))
        except proto.ProtocolError as e:
            raise ServiceError(e.code, e.message) from None

    async def cancel(self, request_id: str) -> None:
        if request_id in self.pending and self.sock is not None:
            self._send_nowait(proto.control(Kind.CANCEL, corr=request_id))

    async def ping(self, timeout: float = 2.0) -> BrokerPingReply:
        return await self.request(BrokerPing(), timeout=timeout)

    async def wait_for_broker(self, timeout: float = 30.0) -> BrokerPingReply:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                return await self.ping(timeout=min(1.0, max(0.05, deadline - loop.time())))
            except ServiceError:
                if loop.time() >= deadline:
                    raise

    # -- internals ----------------------------------------------------------------------------

    async def _send(self, env: Envelope) -> None:
        if self.sock is None:
            raise ServiceError(ErrorCode.UNAVAILABLE, "client is closed")
        try:
            await self.sock.send(proto.encode(env))
        except zmq.ZMQError as e:
            log.warning("client %s: send failed: %s", self.identity, e)
            raise ServiceError(ErrorCode.UNAVAILABLE, "could not send the request to the broker: this client's "
                               "connection is closed") from None

    def _send_nowait(self, env: Envelope) -> None:
        """Best effort (cancel, disconnect): never wait for a broker that is not there."""
        if self.sock is None:
            return
        with contextlib.suppress(zmq.ZMQError):
            zmq.Socket.send(self.sock, proto.encode(env), zmq.NOBLOCK)

    async def _reader(self) -> None:
        assert self.sock is not None
        limit = self.settings.max_frame_bytes
        while True:
            try:
                frames = await self.sock.recv_multipart()
            except zmq.ZMQError as e:  # the socket is unusable: say so to every waiting call, plainly
                log.warning("client %s: receive failed: %s", self.identity, e)
                self._fail_all(ErrorCode.UNAVAILABLE, "this client's connection to the broker failed; "
                               "the request may or may not have run")
                return
            try:
                env = proto.decode(frames[-1], limit)
            except proto.ProtocolError as e:
                log.warning("client %s dropped a malformed message: %s", self.identity, e.message)
                continue
            call = self.pending.get(env.corr)
            if call is None:
                if env.kind == Kind.ERROR and not env.corr:
                    log.warning("broker error without request id: %s", env.body)
                continue
            if env.kind in _FINAL:
                call.done = True
            call.queue.put_nowait(env)

    async def _watch_broker(self) -> None:
        """Keep ``broker_boot_id`` current, busy or idle, and settle calls a broker restart lost."""
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL)
            try:
                await self._check_broker()
            except asyncio.CancelledError:
                raise
            except Exception:  # the watcher must outlive any surprise, or calls would hang
                log.exception("client %s: broker watch failed; retrying", self.identity)

    def _waiting(self) -> list[PendingCall]:
        return [c for c in self.pending.values() if not c.done and c.request.service != proto.Service.BROKER]

    async def _check_broker(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            pong = await self.ping(timeout=HEARTBEAT_INTERVAL * HEARTBEAT_LIVENESS)
        except ServiceError:
            # probably restarting (supervisord brings it back in ~2 s): wait it out, within limits
            now = loop.time()
            if self._unreachable_since is None:
                self._unreachable_since = now
            elif now - self._unreachable_since >= self.settings.service_wait_s:
                self._fail_all(ErrorCode.UNAVAILABLE, f"the broker has not answered for "
                               f"{now - self._unreachable_since:.0f} s; the request was not answered and may or "
                               "may not have run. Is the broker running? `make status` shows it",
                               only=self._waiting())
            return
        self._unreachable_since = None
        boot = pong.boot_id
        previous, self.broker_boot_id = self.broker_boot_id, boot
        if previous is not None and boot != previous:
            # A new broker: it holds only what was sent to it, and what workers hand over as they
            # re-register. Ask rather than guess, so a request sent after the restart (by a client that
            # was idle through it) is not failed for it.
            self._settle = {c.id for c in self._waiting()}
            self._settle_until = loop.time() + RESUME_GRACE
        if self._settle:
            await self._settle_after_restart(loop.time() >= self._settle_until)

    async def _settle_after_restart(self, final: bool) -> None:
        calls = [c for i in self._settle if (c := self.pending.get(i)) is not None and not c.done]
        if not calls:
            self._settle = set()
            return
        try:
            held = set((await self.request(Held(ids=[c.id for c in calls]),
                                           timeout=HEARTBEAT_INTERVAL * HEARTBEAT_LIVENESS)).held)
        except ServiceError:
            held = set()
        missing = [c for c in calls if c.id not in held]
        self._settle = {c.id for c in missing}
        if not final or not missing:
            return
        self._settle = set()
        lost = [c for c in missing if not c.request.idempotent]
        for call in missing:
            if call.request.idempotent:  # safe to run again: the new broker gets it as if it were new
                call.queue.put_nowait(proto.event(call.request, "retrying", {
                    "source": "client", "message": "the broker restarted and lost this request; it was sent "
                    "again (partial output is void)"}))
                with contextlib.suppress(ServiceError):
                    await self._send(call.request)
        self._fail_all(ErrorCode.UNAVAILABLE, "the broker restarted while this request was in flight and no "
                       "worker still held it; it may or may not have run, and was not sent again because "
                       "it is not safe to repeat", only=lost)

    def _fail_all(self, code: ErrorCode, message: str, only: list[PendingCall] | None = None) -> None:
        for call in only if only is not None else list(self.pending.values()):
            if not call.done:
                call.done = True
                call.queue.put_nowait(proto.error_for(call.request, code, message))
