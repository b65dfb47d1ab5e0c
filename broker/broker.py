"""The BAT OS broker: one ROUTER relaying envelopes by service name and identity.

Design notes (why, not what):
- Requests are forwarded as the client's original payload frame, preceded by the client's
  identity frame, so the broker decodes each message once and never re-encodes a body.
- Every request the broker accepts is tracked in ``pending`` until exactly one reply or
  error has gone back: a dead or restarting worker's requests are re-queued when retry-safe
  (``idempotent``, which proto sets per command) and the caller is told (a ``retrying``
  event), otherwise answered with ``worker_lost``. A queued request waits
  ``settings.service_wait_s`` for a worker, counted from when it was (re-)queued, and the
  caller hears ``waiting`` events meanwhile (so silence timeouts do not fire); then
  ``unavailable``.
- Restarts are waited out: a worker that re-registers (after this broker restarted, or after
  it lost its connection) lists the requests it is still running, and the broker adopts them,
  so their answers still reach their callers.
- Slots measure work: control commands (proto.CONTROL: status, help, inspect, trace, ...)
  are dispatched past a worker's capacity and never queue behind long work, and requests a
  worker reports as waiting on another service's answer (its heartbeats carry the count) do
  not count against its capacity.
- Queues are bounded; a full queue answers ``busy`` at once.
- Sends use ROUTER_MANDATORY + DONTWAIT, so an unknown peer is an error we see
  (EHOSTUNREACH) rather than a silent drop.
- No frame can stop the loop: decoding has explicit limits (proto), a message that fails is
  answered with an error (with its request id when one can be read) or dropped and counted,
  and anything unexpected in handling one message is logged, counted and survived.
- Per-client state is bounded: at most ``broker_max_clients`` identities hold state, idle
  ones expire, and a newcomer past the cap is answered ``busy``. libzmq keeps ~28 KB per live
  connection and glibc keeps what it frees, so after peers leave the broker hands freed heap
  back to the OS (``malloc_trim``) instead of holding a flood's peak forever.
- A dead worker is noticed when its connection closes, not only when heartbeats stop: a
  socket monitor reports the closed connection's file descriptor, and each worker's READY
  carried the descriptor it came on (``SRCFD``). So a killed worker stops being listed
  within one heartbeat interval; the missed-heartbeat rule still covers a hung one.
- Roles (broker/roles.py): with Curve on, a sender's key decides what it may do (READY and worker
  output only from service keys, consoles limited to console commands, a worker's identity pinned
  to its key and connection). With Curve off the checks are skipped and cost nothing.
- The hot path calls pyzmq's single-frame ``send``/``recv`` rather than its multipart helpers:
  in pyzmq 27 those spend more time on ``getsockopt(RCVMORE)`` (an enum conversion per call)
  and flag arithmetic than on moving the message. ``Frame.more`` tells whether parts follow.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq
from zmq.utils.monitor import parse_monitor_message

import proto
from batos.config import HEARTBEAT_INTERVAL, HEARTBEAT_LIVENESS, Settings
from broker.roles import Access
from proto import EnvelopeHeader, ErrorCode, Kind, contract
from proto.bodies import broker as bodies
from proto.contract import Reply
from proto.roles import Role

log = logging.getLogger("batos.broker")

BROKER_VERSION = "1.0"
KNOWN_SERVICES = {s.value for s in proto.Service}
# The receive timeout: how late housekeeping (heartbeats, expiry) and a stop request may run when idle.
RECV_TIMEOUT_MS = 100
_MORE = int(zmq.SNDMORE | zmq.DONTWAIT)  # plain ints: enum flag arithmetic costs more than the send
_LAST = int(zmq.DONTWAIT)
# how long an adopted request's client may take to reconnect to a restarted broker before its work is
# stopped (clients notice a new broker within a heartbeat or two and reconnect in ~0.1 s)
ADOPTED_CLIENT_GRACE = 10.0
CLIENT_SWEEP_INTERVAL = 5.0  # how often idle client state is expired and freed heap returned
LOG_BURST = 20  # warnings about bad input per LOG_WINDOW; the rest are counted, not logged
LOG_WINDOW = 10.0
WAITING_EVENT_INTERVAL = 5.0  # a request queued for a service with no worker hears `waiting` this often
CONTROL_MAX = 64  # control requests one worker may hold beyond its capacity (a flood of `status` is bounded)


def _malloc_trim() -> Callable[[], None]:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to hand back
        return lambda: None
    return lambda: trim(0)


@dataclass(slots=True)
class ClientState:
    last_seen: float
    load: int = 0  # requests of this client the broker holds


@dataclass(slots=True, eq=False)  # workers compare by identity (list membership)
class Worker:
    identity: bytes
    service: str
    capacity: int
    version: str
    pid: int
    registered_at: float
    last_seen: float
    inflight: set[str] = field(default_factory=set)
    served: int = 0
    fd: int = -1  # the connection its READY came on (-1: unknown)
    user: str = ""  # the Curve key it registered with ("" with Curve off)
    control: int = 0  # how many of ``inflight`` are control requests (outside its capacity)
    waiting: int = 0  # how many of ``inflight`` wait on another service (its last heartbeat said)
    draining: bool = False  # shutting down: finishes what it holds, takes nothing new

    def load(self) -> int:
        """Slots in use: work requests that are not waiting on another service."""
        return len(self.inflight) - self.control - self.waiting


@dataclass(slots=True)
class Pending:
    env: EnvelopeHeader
    frame: bytes  # the original payload, forwarded as is
    client: bytes
    queued_at: float  # when it was queued or re-queued: what the wait for a worker counts from
    worker: bytes | None = None
    control: bool = False  # proto.is_control: dispatched past capacity
    told_waiting: float = 0.0  # when the caller last heard a `waiting` event
    adopted_at: float | None = None  # handed over by a re-registering worker, its client not yet heard from


class Broker:
    def __init__(self, settings: Settings, socket: zmq.Socket, monitor: zmq.Socket | None = None,
                 access: Access | None = None):
        self.settings = settings
        self.access = access or Access(None)
        self.sock = socket
        self.monitor = monitor  # EVENT_DISCONNECTED of ``socket``'s connections
        self.frame: zmq.Frame | None = None  # the payload frame being handled
        self.workers: dict[bytes, Worker] = {}
        self.service_workers: dict[str, list[Worker]] = {}  # the same workers, by service, for dispatch
        self.queues: dict[str, deque[str]] = {}
        self.control_queues: dict[str, deque[str]] = {}  # control requests, never behind work
        self.pending: dict[str, Pending] = {}
        self.clients: dict[bytes, ClientState] = {}
        self.next_client_sweep = time.monotonic() + CLIENT_SWEEP_INTERVAL
        self.last_client_expiry = 0.0
        self.trim = _malloc_trim()
        self.log_budget = LOG_BURST
        self.log_window_end = 0.0
        self.stats = bodies.BrokerStats()
        self.started = time.time()
        self.boot_id = uuid.uuid4().hex  # lets clients notice a broker restart
        self.next_heartbeat = time.monotonic() + HEARTBEAT_INTERVAL
        self.known_services = KNOWN_SERVICES | {s.strip() for s in settings.extra_services.split(",") if s.strip()}

    # -- the loop ---------------------------------------------------------------------------

    def run(self, should_stop: Callable[[], bool]) -> None:
        # A blocking receive with a timeout is the cheapest wait: no poll() and no failed
        # non-blocking receive per batch (each costs more than relaying a message).
        self.sock.setsockopt(zmq.RCVTIMEO, RECV_TIMEOUT_MS)
        recv = self.sock.recv
        while not should_stop():
            try:
                identity = recv()
            except zmq.Again:  # the timeout: nothing arrived
                self.check_connections()
            else:
                # a ROUTER always puts at least one frame after the identity, and delivers a
                # multipart message whole, so these receives do not wait
                frame = self.frame = recv(0, copy=False)
                try:
                    if frame.more:
                        self.on_malformed_frames(identity, frame)
                    else:
                        self.handle(identity, frame.bytes)
                except Exception:  # a bug reached by some input must not take the broker down
                    self.stats.internal_errors += 1
                    if self.stats.internal_errors <= LOG_BURST or self.may_log():
                        log.exception("failed to handle a message from %r; carrying on", identity[:64])
            if time.monotonic() >= self.next_heartbeat:
                try:
                    self.housekeeping()
                except Exception:
                    self.stats.internal_errors += 1
                    log.exception("housekeeping failed; carrying on")

    def may_log(self) -> bool:
        """Rate limit for warnings caused by peers: a flood must not become a flood of log lines."""
        now = time.monotonic()
        if now >= self.log_window_end:
            self.log_window_end, self.log_budget = now + LOG_WINDOW, LOG_BURST
        self.log_budget -= 1
        return self.log_budget >= 0

    def check_connections(self) -> None:
        """Drop workers whose connection closed (a killed process closes its sockets at once)."""
        mon = self.monitor
        if mon is None:
            return
        closed: set[int] = set()
        while True:
            try:
                closed.add(int(parse_monitor_message(mon.recv_multipart(zmq.NOBLOCK))["value"]))
            except zmq.Again:
                break
            except (zmq.ZMQError, ValueError, KeyError, TypeError):
                return
        if closed:
            for w in [w for w in self.workers.values() if w.fd in closed]:
                log.warning("worker %r (%s) closed its connection: gone", w.identity, w.service)
                self.remove_worker(w)

    def housekeeping(self) -> None:
        now = time.monotonic()
        self.check_connections()
        self.next_heartbeat = now + HEARTBEAT_INTERVAL
        hb = proto.encode(proto.control(Kind.HEARTBEAT))
        for w in list(self.workers.values()):
            if now - w.last_seen > HEARTBEAT_INTERVAL * HEARTBEAT_LIVENESS:
                log.warning("worker %s (%s) missed %d heartbeats: dead", w.identity, w.service, HEARTBEAT_LIVENESS)
                self.remove_worker(w)
            else:
                self.send(w.identity, hb)
        self.expire_queued(now)
        if now >= self.next_client_sweep:
            self.next_client_sweep = now + CLIENT_SWEEP_INTERVAL
            self.sweep_clients(now)

    def expire_clients(self, now: float) -> None:
        self.last_client_expiry = now
        idle_s = self.settings.broker_client_idle_s
        idle = [c for c, st in self.clients.items() if st.load == 0 and now - st.last_seen > idle_s]
        for c in idle:
            del self.clients[c]
        self.stats.clients_expired += len(idle)

    def sweep_clients(self, now: float) -> None:
        self.expire_clients(now)
        # libzmq frees a departed peer's buffers, but glibc keeps freed heap for reuse: without this a
        # 30k-identity flood left the broker at its peak RSS for good
        self.trim()

    # -- inbound ----------------------------------------------------------------------------

    def on_malformed_frames(self, identity: bytes, frame: zmq.Frame) -> None:
        parts = 1
        while frame.more:
            frame = self.sock.recv(0, copy=False)
            parts += 1
        self.stats.received += 1
        self.stats.malformed += 1
        if self.may_log():
            log.warning("malformed message from %r: %d frames", identity[:64], parts + 1)
        self.send(identity, proto.encode(proto.error(ErrorCode.BAD_FRAME, f"expected 1 payload frame, got {parts}")))

    def handle(self, identity: bytes, payload: bytes) -> None:
        """One message: ``identity`` is the sender's, ``payload`` its single envelope frame."""
        self.stats.received += 1
        try:
            env = proto.decode_header(payload, self.settings.max_frame_bytes)
        except proto.ProtocolError as e:
            if e.code == ErrorCode.TOO_LARGE and self.on_oversized(identity, payload, e.message):
                return
            self.reject(identity, e)
            return
        worker = self.workers.get(identity)
        if self.access.enforcing and not self.authorized(identity, worker, env):
            return
        if worker is not None:
            worker.last_seen = time.monotonic()
        match env.kind:
            case Kind.REQUEST:
                self.on_request(identity, env, payload)
            case Kind.REPLY | Kind.ERROR | Kind.EVENT:
                self.on_worker_output(identity, worker, env, payload)
            case Kind.READY:
                try:
                    body = proto.decode_ready(payload)
                except proto.ProtocolError as e:
                    self.reject(identity, e)
                    return
                self.on_ready(identity, body, env)
            case Kind.HEARTBEAT:
                if worker is None and env.service:  # a worker we do not know: make it re-register
                    self.send(identity, proto.encode(proto.control(Kind.DISCONNECT)))
                elif worker is not None and env.service:
                    try:
                        beat = proto.decode_heartbeat(payload)
                    except proto.ProtocolError as e:
                        self.reject(identity, e)
                        return
                    self.on_heartbeat(worker, beat)
            case Kind.CANCEL:
                self.cancel(env.corr, identity, reason="cancelled by client")
            case Kind.DISCONNECT:
                if worker is not None:
                    self.remove_worker(worker)
                else:
                    self.forget_client(identity)

    def authorized(self, identity: bytes, worker: Worker | None, env: EnvelopeHeader) -> bool:
        """Role checks (Curve on): False when the message was refused (and answered or dropped)."""
        access = self.access
        user = access.user(self.frame)
        role = access.role(user)
        reason: str | None = None
        if env.kind == Kind.REQUEST:
            reason = access.may_request(role, env.service, env.command)
        elif env.kind == Kind.READY:
            reason = access.may_serve(role, env.service, user)
        elif worker is not None and env.kind != Kind.DISCONNECT and not self.same_peer(worker, user):
            # a registered worker's identity used from another key or connection: a takeover
            self.stats.unauthorized += 1
            log.warning("worker identity %r used by another peer: dropping the worker", identity[:64])
            self.remove_worker(worker)
            self.send(identity, proto.encode(proto.control(Kind.DISCONNECT)))
            return False
        elif env.kind in (Kind.REPLY, Kind.ERROR, Kind.EVENT) and role != Role.SERVICE:
            reason = "only service keys may answer requests"
        if reason is None:
            return True
        self.stats.unauthorized += 1
        if self.may_log():
            log.warning("refused %s %s.%s from %r: %s", env.kind, env.service, env.command, identity[:64], reason)
        self.send(identity, proto.encode(proto.error_for(env, ErrorCode.UNAUTHORIZED, reason)))
        return False

    def same_peer(self, worker: Worker, user: str) -> bool:
        if worker.user != user:
            return False
        try:
            fd = int(self.frame.get(zmq.SRCFD)) if self.frame is not None else -1
        except zmq.ZMQError:
            fd = -1
        return worker.fd < 0 or fd < 0 or fd == worker.fd

    def reject(self, identity: bytes, e: proto.ProtocolError) -> None:
        """Answer a message that could not be accepted, with its request id when one was read."""
        self.stats.malformed += 1
        if self.may_log():
            log.warning("rejected message from %r: %s", identity[:64], e.message)
        self.send(identity, proto.encode(proto.error(
            e.code, e.message, corr=e.partial.get("id", ""), service=e.partial.get("service", ""),
            command=e.partial.get("command", ""))))

    def on_oversized(self, identity: bytes, payload: bytes, message: str) -> bool:
        """A worker's message over the frame limit: fail the request it answers and free its slot."""
        worker = self.workers.get(identity)
        if worker is None:
            return False
        try:
            head = proto.peek_header(payload)
        except proto.ProtocolError:
            return False
        pending = self.pending.get(head.corr)
        if pending is None or pending.worker != identity:
            return False
        self.stats.oversized += 1
        worker.last_seen = time.monotonic()
        if head.kind == Kind.EVENT:  # an event too large to forward is dropped; the request goes on
            return True
        if head.kind not in (Kind.REPLY, Kind.ERROR):
            return False
        worker.served += 1
        self.fail(head.corr, ErrorCode.TOO_LARGE,
                  f"the {worker.service} worker's answer was too large to deliver ({message}); "
                  "ask for less, e.g. a smaller limit or the next page")
        self.dispatch(worker.service)
        return True

    def on_request(self, client: bytes, env: EnvelopeHeader, payload: bytes) -> None:
        if env.service == proto.Service.BROKER:
            self.answer_broker_request(client, env, payload)
            return
        if env.service not in self.known_services:
            self.reply_error(client, env, ErrorCode.UNKNOWN_SERVICE, f"no such service {env.service!r}")
            return
        if env.id in self.pending:
            if self.pending[env.id].client != client:
                self.reply_error(client, env, ErrorCode.BAD_ARGS, f"request id {env.id} is already in flight")
            # else the caller re-sent it after a broker restart and a worker handed it over meanwhile: one answer
            return
        control = proto.is_control(env.service, env.command)
        queues = self.control_queues if control else self.queues
        queue = queues.get(env.service)
        if queue is None:  # (not setdefault: that builds a deque per request)
            queue = queues[env.service] = deque()
        now = time.monotonic()
        state = self.clients.get(client)
        if state is None:
            state = self.admit_client(client, env, now)
            if state is None:
                return
        if len(queue) >= self.settings.service_queue_max or state.load >= self.settings.client_pending_max:
            self.stats.busy += 1
            self.reply_error(client, env, ErrorCode.BUSY,
                             f"service {env.service!r} queue is full ({len(queue)} waiting); retry later")
            return
        self.pending[env.id] = Pending(env, payload, client, now, control=control, told_waiting=now)
        state.load += 1
        state.last_seen = now
        queue.append(env.id)
        self.dispatch(env.service)

    def admit_client(self, client: bytes, env: EnvelopeHeader, now: float) -> ClientState | None:
        """State for a new client identity, or ``busy`` when the broker holds its maximum."""
        if len(self.clients) >= self.settings.broker_max_clients:
            if now - self.last_client_expiry > 0.5:  # at most twice a second: a flood must not buy sweeps
                self.expire_clients(now)
            if len(self.clients) >= self.settings.broker_max_clients:
                self.stats.clients_refused += 1
                self.stats.busy += 1
                self.reply_error(client, env, ErrorCode.BUSY,
                                 f"the broker is serving its maximum of {self.settings.broker_max_clients} "
                                 "clients; retry in a few seconds")
                return None
        state = self.clients[client] = ClientState(now)
        return state

    def on_ready(self, identity: bytes, body: proto.ReadyBody, env: EnvelopeHeader) -> None:
        if env.service not in self.known_services or env.service == proto.Service.BROKER:
            self.send(identity, proto.encode(proto.error(
                ErrorCode.UNKNOWN_SERVICE, f"cannot register unknown service {env.service!r}")))
            return
        self.check_connections()  # a closed connection's descriptor may be reused by this one
        old = self.workers.get(identity)
        kept: set[str] = set()
        if old is not None:  # the same worker re-announcing after a reconnect: what it still runs is kept
            kept = {h.id for h in body.holding} & old.inflight
            old.inflight -= kept
            self.remove_worker(old)
        now = time.monotonic()
        fd = -1
        if self.frame is not None:
            try:
                fd = int(self.frame.get(zmq.SRCFD))
            except zmq.ZMQError:
                fd = -1
        worker = Worker(
            identity=identity, service=env.service,
            capacity=max(1, self.settings.worker_capacity if body.capacity is None else body.capacity),
            version=body.version, pid=body.pid,
            registered_at=time.time(), last_seen=now, fd=fd, user=self.access.user(self.frame))
        self.workers[identity] = worker
        self.service_workers.setdefault(env.service, []).append(worker)
        adopted = self.adopt(worker, body.holding, kept, now)
        log.info("worker %r registered for %s%s", identity, env.service,
                 f", still running {adopted} request(s)" if adopted else "")
        self.dispatch(env.service)

    def adopt(self, worker: Worker, holding: list[proto.HeldRequest], kept: set[str], now: float) -> int:
        """Route the answers of requests a re-registering worker is still running (a broker restart, a
        reconnect); a copy the caller re-sent meanwhile and that still waits in a queue is dropped."""
        n = 0
        for held in holding:
            pending = self.pending.get(held.id)
            if held.id in kept and pending is not None:
                pass  # this broker already routes it to this worker
            elif pending is None:
                self.stats.adopted += 1
                state = self.clients.get(held.client)
                if state is None:
                    state = self.clients[held.client] = ClientState(now)
                state.load += 1
                header = EnvelopeHeader(v=proto.PROTOCOL_VERSION, id=held.id, kind=Kind.REQUEST,
                                        service=worker.service, command=held.command, idempotent=False)
                # no payload to hand another worker: if this one dies too, the request is lost (worker_lost)
                pending = self.pending[held.id] = Pending(header, b"", held.client, now, adopted_at=now)
            elif pending.worker is None and pending.client == held.client and pending.env.service == worker.service:
                queue = (self.control_queues if pending.control else self.queues).get(worker.service)
                if queue is not None and held.id in queue:
                    queue.remove(held.id)
            else:
                continue  # another worker holds it now: this one's answer will be late and ignored
            pending.worker = worker.identity
            worker.inflight.add(held.id)
            if pending.control:
                worker.control += 1
            n += 1
        return n

    def on_heartbeat(self, worker: Worker, beat: proto.HeartbeatBody) -> None:
        if beat.draining:
            worker.draining = True  # shutting down: finish what it holds, take nothing new
            worker.capacity = 0
        waiting = min(beat.waiting, len(worker.inflight) - worker.control)
        if waiting != worker.waiting:
            freed = waiting > worker.waiting
            worker.waiting = waiting
            if freed:
                self.dispatch(worker.service)

    def on_worker_output(self, identity: bytes, worker: Worker | None, env: EnvelopeHeader, payload: bytes) -> None:
        if worker is None:
            # a worker the broker forgot (e.g. broker restart); its output has no pending entry
            self.stats.late_replies += 1
            self.send(identity, proto.encode(proto.control(Kind.DISCONNECT)))
            return
        pending = self.pending.get(env.corr)
        if pending is None or pending.worker != identity:
            self.stats.late_replies += 1
            return
        if env.kind == Kind.EVENT:
            self.send_client(pending, payload)
            return
        self.finish(env.corr)
        self.release(worker, env.corr, pending)
        worker.served += 1
        self.send_client(pending, payload)
        self.dispatch(worker.service)

    # -- dispatch ---------------------------------------------------------------------------

    def dispatch(self, service: str) -> None:
        if self.control_queues:  # no lookup until a control request was ever queued; they go before work
            control = self.control_queues.get(service)
            if control:
                self._dispatch(control, service, self.least_busy)
        queue = self.queues.get(service)
        if queue:
            self._dispatch(queue, service, self.least_loaded)

    def _dispatch(self, queue: deque[str], service: str, pick: Callable[[str], Worker | None]) -> None:
        while queue:
            worker = pick(service)
            if worker is None:
                return
            req_id = queue.popleft()
            pending = self.pending.get(req_id)
            if pending is None:
                continue
            if not self.send(worker.identity, pending.client, pending.frame):
                queue.appendleft(req_id)
                self.remove_worker(worker)
                continue
            pending.worker = worker.identity
            worker.inflight.add(req_id)
            if pending.control:
                worker.control += 1

    def least_loaded(self, service: str) -> Worker | None:
        """The worker with a free slot and the fewest in use (then the fewest served)."""
        best: Worker | None = None
        best_n = 0
        for w in self.service_workers.get(service, ()):
            n = len(w.inflight) - w.control - w.waiting
            if n < w.capacity and (best is None or n < best_n or (n == best_n and w.served < best.served)):
                best, best_n = w, n
        return best

    def least_busy(self, service: str) -> Worker | None:
        """For a control request: any worker that is not shutting down, however full its slots."""
        best: Worker | None = None
        for w in self.service_workers.get(service, ()):
            if not w.draining and w.control < CONTROL_MAX and (best is None or w.load() < best.load()):
                best = w
        return best

    def release(self, worker: Worker, req_id: str, pending: Pending) -> None:
        inflight = worker.inflight
        if req_id in inflight:
            inflight.remove(req_id)
            if pending.control:
                worker.control -= 1
            if worker.waiting:  # its next heartbeat says how many still wait; never more than it holds
                worker.waiting = min(worker.waiting, len(inflight) - worker.control)

    def remove_worker(self, worker: Worker) -> None:
        if self.workers.get(worker.identity) is worker:
            del self.workers[worker.identity]
        peers = self.service_workers.get(worker.service, [])
        if worker in peers:
            peers.remove(worker)
        now = time.monotonic()
        how = "restarted" if worker.draining else "died"
        for req_id in sorted(worker.inflight, key=lambda r: self.pending[r].queued_at if r in self.pending else 0,
                             reverse=True):
            pending = self.pending.get(req_id)
            if pending is None:
                continue
            if pending.env.idempotent and pending.frame:
                # safe to run again: it waits for the next worker, its wait counted from now
                self.stats.redispatched += 1
                pending.worker = None
                pending.queued_at = now
                queue = (self.control_queues if pending.control else self.queues).setdefault(worker.service, deque())
                queue.appendleft(req_id)
                self.tell(pending, "retrying", f"the {worker.service} worker handling this request {how}; "
                          f"it will run again on the next {worker.service} worker (partial output is void)")
            else:
                self.stats.worker_lost += 1
                self.fail(req_id, ErrorCode.WORKER_LOST,
                          f"the {worker.service} worker handling this request {how} before it finished; it was "
                          f"not run again because {worker.service}.{pending.env.command} is not safe to repeat. "
                          "Check its effect, then run it again if needed")
        worker.inflight.clear()
        worker.control = worker.waiting = 0
        self.dispatch(worker.service)

    def tell(self, pending: Pending, name: str, message: str) -> None:
        """An event from the broker itself to the caller of ``pending`` (a sign of life, and the reason)."""
        pending.told_waiting = time.monotonic()
        env = pending.env
        self.send(pending.client, proto.encode(proto.Envelope(
            v=proto.PROTOCOL_VERSION, id=proto.new_id(), kind=Kind.EVENT, service=env.service, command=env.command,
            corr=env.id, body={"event": name, "source": "broker", "message": message})))

    def expire_queued(self, now: float) -> None:
        """Requests for a service with no worker: expire those past the wait, tell the rest they wait."""
        wait = self.settings.service_wait_s
        for queues in (self.queues, self.control_queues):
            for service, queue in queues.items():
                if not queue or any(not w.draining for w in self.service_workers.get(service, ())):
                    continue
                for req_id in list(queue):
                    pending = self.pending.get(req_id)
                    if pending is None:
                        queue.remove(req_id)
                    elif now - pending.queued_at >= wait:
                        queue.remove(req_id)
                        self.stats.expired += 1
                        self.fail(req_id, ErrorCode.UNAVAILABLE,
                                  f"no {service} worker came within {wait:g} s (settings.service_wait_s); "
                                  f"is the program serving {service} running? `make status` shows it")
                    elif now - pending.told_waiting >= WAITING_EVENT_INTERVAL:
                        self.tell(pending, "waiting", f"waiting for a {service} worker (restarting?); "
                                  f"{wait - (now - pending.queued_at):.0f} s left")

    def cancel(self, req_id: str, client: bytes, reason: str) -> None:
        pending = self.pending.get(req_id)
        if pending is None or pending.client != client:
            return
        if pending.worker is None:
            queue = (self.control_queues if pending.control else self.queues).get(pending.env.service)
            if queue is not None and req_id in queue:
                queue.remove(req_id)
            self.fail(req_id, ErrorCode.CANCELLED, reason)
        else:  # the worker answers with a `cancelled` error when its handler has stopped
            self.send(pending.worker, proto.encode(proto.control(Kind.CANCEL, corr=req_id)))

    def forget_client(self, client: bytes) -> None:
        for req_id in [r for r, p in self.pending.items() if p.client == client]:
            self.cancel(req_id, client, reason="client disconnected")

    # -- outbound ---------------------------------------------------------------------------

    def finish(self, req_id: str) -> Pending | None:
        pending = self.pending.pop(req_id, None)
        if pending is not None:
            state = self.clients.get(pending.client)
            if state is not None:
                state.load -= 1
                state.last_seen = time.monotonic()
        return pending

    def fail(self, req_id: str, code: ErrorCode, message: str) -> None:
        pending = self.finish(req_id)
        if pending is not None:
            if pending.worker is not None and pending.worker in self.workers:
                self.release(self.workers[pending.worker], req_id, pending)
            self.send(pending.client, proto.encode(proto.error_for(pending.env, code, message)))

    def reply_error(self, client: bytes, env: EnvelopeHeader, code: ErrorCode, message: str) -> None:
        self.send(client, proto.encode(proto.error_for(env, code, message)))

    def send_client(self, pending: Pending, payload: bytes) -> None:
        if self.send(pending.client, payload):
            pending.adopted_at = None
            return
        if pending.adopted_at is not None and time.monotonic() - pending.adopted_at < ADOPTED_CLIENT_GRACE:
            # After a broker restart a worker can re-register (and hand this request over) before the
            # client has reconnected: its output is dropped until then, the work goes on.
            return
        # the client is gone: stop the work it asked for
        self.forget_client(pending.client)

    def send(self, identity: bytes, *frames: bytes) -> bool:
        sock = self.sock
        try:
            # Only the first part can fail: libzmq takes the rest of a message it has begun.
            sock.send(identity, _MORE)
            for f in frames[:-1]:
                sock.send(f, _MORE)
            sock.send(frames[-1], _LAST)
            return True
        except zmq.Again:
            self.stats.unroutable += 1
            log.warning("peer %r is not reading (HWM reached); message dropped", identity)
            return False
        except zmq.ZMQError as e:  # EHOSTUNREACH (peer gone) or anything else: never fatal
            self.stats.unroutable += 1
            if e.errno != zmq.EHOSTUNREACH and self.may_log():
                log.warning("send to %r failed: %s", identity[:64], e)
            return False

    # -- the broker's own service -----------------------------------------------------------

    def answer_broker_request(self, client: bytes, env: EnvelopeHeader, payload: bytes) -> None:
        reply: Reply
        match env.command:
            case "ping":
                reply = bodies.BrokerPingReply(pong=True, version=BROKER_VERSION, boot_id=self.boot_id)
            case "workers":
                reply = self.describe(with_identities=self.access.role(self.access.user(self.frame)) == Role.SERVICE)
            case "status":
                reply = self.status()
            case "held":  # which of these request ids of the caller's does this broker hold?
                try:
                    ids = bodies.decode_held(payload).ids
                except proto.ProtocolError as e:
                    self.stats.malformed += 1
                    self.reply_error(client, env, e.code, e.message)
                    return
                held = [i for i in ids if (p := self.pending.get(i)) is not None and p.client == client]
                reply = bodies.HeldReply(held=held, boot_id=self.boot_id)
            case _:
                self.reply_error(client, env, ErrorCode.UNKNOWN_COMMAND,
                                 f"the broker answers ping, status, workers and held, not {env.command!r}")
                return
        self.send(client, proto.encode(proto.reply(env, contract.encode(reply))))

    def status(self) -> bodies.BrokerStatusReply:
        return bodies.BrokerStatusReply(
            pid=os.getpid(), boot_id=self.boot_id, version=BROKER_VERSION,
            uptime_s=round(time.time() - self.started, 1), clients=len(self.clients), workers=len(self.workers),
            pending=len(self.pending), stats=self.stats)

    def describe(self, with_identities: bool = True) -> bodies.WorkerTable:
        now = time.monotonic()
        services: dict[str, list[bodies.WorkerInfo]] = {}
        for w in self.workers.values():
            services.setdefault(w.service, []).append(bodies.WorkerInfo(
                # consoles see no identities (Curve on): nothing to impersonate
                identity=w.identity.decode("utf-8", "replace") if with_identities else "",
                pid=w.pid,
                version=w.version,
                uptime_s=round(time.time() - w.registered_at, 1),
                last_seen_s=round(now - w.last_seen, 2),
                alive=now - w.last_seen <= HEARTBEAT_INTERVAL * HEARTBEAT_LIVENESS,
                inflight=len(w.inflight),
                waiting_on_others=w.waiting,
                capacity=w.capacity,
                served=w.served,
            ))
        queued = {s: n for s in {*self.queues, *self.control_queues}
                  if (n := len(self.queues.get(s, ())) + len(self.control_queues.get(s, ())))}
        return bodies.WorkerTable(
            broker=bodies.BrokerSummary(version=BROKER_VERSION, uptime_s=round(time.time() - self.started, 1),
                                        pending=len(self.pending), queued=queued, stats=self.stats),
            services=services)
