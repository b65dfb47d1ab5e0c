"""Running a parsed request through the broker: events to the view as they arrive, then the reply
or the error; timeouts and cancellation. Shared by the interactive and the scripted console."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

from batos import paging
from batos.client import Client, PendingCall
from batos.errors import ServiceError
from proto import ErrorCode, Kind
from proto.contract import Reply
from services.console.commands import Request
from services.console.render import Handle

log = logging.getLogger("batos.console")

# A quick command (status, search, inspect...) that has not answered in this long will not.
QUICK_TIMEOUT = 120.0
# Margin over the kernel's own cycle timeout for commands that run a cognitive cycle or training.
LONG_TIMEOUT_MARGIN = 60.0
# After `cancel`, the service should answer `cancelled` promptly; past this the console stops waiting.
CANCEL_GRACE = 5.0
# A quiet `watch` sends this now and then so that no one on the way times it out; it is never shown.
KEEPALIVE = "keepalive"
# How often a resumable request (watch) asks whether the broker is back.
RESUME_INTERVAL = 1.0


class View(Protocol):
    def begin(self, handle: Handle) -> None: ...
    def event(self, handle: Handle, body: dict[str, Any]) -> None: ...
    def reply(self, handle: Handle, body: Reply) -> None: ...
    def error(self, handle: Handle, code: str, message: str, details: dict[str, Any] | None = None) -> None: ...
    def notice(self, text: str, style: str = "notice") -> None: ...
    def lines(self, lines: list[str]) -> None: ...


@dataclass
class Outcome:
    ok: bool
    body: Reply | None = None  # the reply, decoded into its type (proto.bodies.kernel)
    code: str = ""
    message: str = ""


@dataclass
class Inflight:
    handle: Handle
    task: asyncio.Task | None
    call: PendingCall | None = None
    cancel_requested: bool = False
    gave_up: bool = False


class Runner:
    def __init__(self, client: Client, view: View, *, timeout: float | None = None, long_timeout: float = 960.0,
                 is_connected: Callable[[], bool | None] | None = None, endpoint: str = ""):
        self.client = client
        self.view = view
        self.timeout = timeout
        self.long_timeout = long_timeout
        self.is_connected = is_connected
        self.endpoint = endpoint or client.endpoint
        self.inflight: dict[int, Inflight] = {}
        self._next_tag = 1

    def timeout_for(self, req: Request) -> float:
        if self.timeout is not None:
            return self.timeout
        return self.long_timeout if req.long_running else QUICK_TIMEOUT

    async def run(self, req: Request) -> Outcome:
        handle = Handle(self._next_tag, req.label or req.command)
        self._next_tag += 1
        entry = Inflight(handle, asyncio.current_task())
        self.inflight[handle.tag] = entry
        self.view.begin(handle)
        try:
            outcome = await self._run(req, entry)
            # a watch lost with the broker (it restarted, or is away) is sent again once the broker answers
            while req.resumable and outcome.code == ErrorCode.UNAVAILABLE and not entry.cancel_requested:
                self._forget_call(entry)
                resumed = await self._await_broker(entry)
                if resumed is not None:
                    return resumed
                self._safe(self.view.notice, f"[{handle.tag}] the broker answers again: resuming {handle.label}")
                outcome = await self._run(req, entry, check_connected=False)  # the ping was answered just now
            return outcome
        finally:
            self.inflight.pop(handle.tag, None)
            self._forget_call(entry)

    def _forget_call(self, entry: Inflight) -> None:
        if entry.call is not None:
            self.client.pending.pop(entry.call.id, None)  # PendingCall has no close(); see report
            entry.call = None

    async def _await_broker(self, entry: Inflight) -> Outcome | None:
        """Until the broker answers a ping (None), or the request is cancelled here (its outcome)."""
        try:
            while True:
                with contextlib.suppress(ServiceError):
                    await self.client.ping(timeout=RESUME_INTERVAL)
                    return None
                await asyncio.sleep(RESUME_INTERVAL)
        except asyncio.CancelledError:
            if not entry.gave_up:  # the console is closing
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            return self._fail(entry.handle, ErrorCode.CANCELLED, "cancelled while waiting for the broker")

    async def _run(self, req: Request, entry: Inflight, *, check_connected: bool = True) -> Outcome:
        handle = entry.handle
        if check_connected and self.is_connected is not None and self.is_connected() is False:
            return self._fail(handle, ErrorCode.UNAVAILABLE,
                              f"not connected to the broker at {self.endpoint} (retrying in the background); "
                              "the request was not sent")
        limit = self.timeout_for(req)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(limit) as deadline:
                entry.call = await self.client.start_call(req.service, req.command, req.body)
                handle.id = entry.call.id
                async for env in entry.call.events():
                    if env.kind == Kind.EVENT:
                        if req.long_running:  # an idle limit: a forge that reports progress for hours is alive
                            deadline.reschedule(loop.time() + limit)
                        if env.body.get("event") != KEEPALIVE:
                            self._safe(self.view.event, handle, env.body)
                    elif env.kind == Kind.ERROR:
                        b = env.body
                        return self._fail(handle, str(b.get("code", ErrorCode.INTERNAL)), str(b.get("message", "")),
                                          b.get("details") if isinstance(b.get("details"), dict) else None)
                    else:
                        try:
                            body = msgspec.convert(await self._rest_of_pages(req, env.body), req.reply_type)
                        except msgspec.ValidationError as e:
                            return self._fail(handle, ErrorCode.INTERNAL,
                                              f"kernel.{req.command} answered outside its contract: {e}")
                        self._safe(self.view.reply, handle, body)
                        return Outcome(True, body)
            return self._fail(handle, ErrorCode.INTERNAL, "the request ended without a reply")
        except TimeoutError:
            await self._send_cancel(entry)
            what = "no reply or event" if req.long_running else "no reply"
            return self._fail(handle, ErrorCode.TIMEOUT, f"{what} within {limit:g} s; the request was cancelled")
        except asyncio.CancelledError:
            if entry.gave_up:
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
                return self._fail(handle, ErrorCode.CANCELLED,
                                  f"cancelled here; the service did not confirm within {CANCEL_GRACE:g} s")
            await self._send_cancel(entry)  # the console is closing: stop the work it asked for
            self._safe(self.view.error, handle, str(ErrorCode.CANCELLED), "interrupted; the service was told to stop")
            raise
        except Exception as e:  # a transport failure must not take the console down
            log.debug("request %s failed", handle.label, exc_info=True)
            return self._fail(handle, ErrorCode.INTERNAL,
                              f"the request could not be sent or its answer could not be read ({e or 'no detail'}); "
                              "the console is still running")

    async def _rest_of_pages(self, req: Request, first: dict[str, Any]) -> dict[str, Any]:
        """A paged reply (search, trace: batos.paging) arrives whole: the next pages are asked for here."""
        if not first.get("next"):
            return first
        return await paging.follow(first, lambda after: self.client.call(
            req.service, req.command, req.page(after), idempotent=True))

    async def cancel(self, which: str = "") -> list[int]:
        """Cancel request ``which`` (its tag) or every one in flight; the tags cancelled."""
        if which in ("", "all"):
            entries = list(self.inflight.values())
        else:
            entry = self.inflight.get(int(which))
            entries = [entry] if entry is not None else []
        loop = asyncio.get_running_loop()
        for entry in entries:
            if entry.cancel_requested:
                continue
            entry.cancel_requested = True
            await self._send_cancel(entry)
            loop.call_later(CANCEL_GRACE if entry.call is not None else 0, self._give_up, entry)
        return [e.handle.tag for e in entries]

    def _give_up(self, entry: Inflight) -> None:
        if entry.handle.tag in self.inflight and entry.task is not None and not entry.task.done():
            entry.gave_up = True
            entry.task.cancel()

    async def _send_cancel(self, entry: Inflight) -> None:
        if entry.call is not None and not entry.call.done:
            with contextlib.suppress(Exception):
                await self.client.cancel(entry.call.id)

    def _fail(self, handle: Handle, code: str, message: str, details: dict[str, Any] | None = None) -> Outcome:
        self._safe(self.view.error, handle, str(code), message, details)
        return Outcome(False, None, str(code), message)

    def _safe(self, fn: Callable[..., None], *args: Any) -> None:
        # A body the renderer did not expect is shown raw rather than crashing the console.
        try:
            fn(*args)
        except Exception as e:
            log.debug("render failed", exc_info=True)
            with contextlib.suppress(Exception):
                self.view.notice(f"(could not render {args[1:]!r:.500}: {type(e).__name__}: {e})", "warning")
