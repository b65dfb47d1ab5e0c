"""The scripted console and the request runner against a fake client: JSON lines, exit codes,
multi-line define, timeouts, cancellation, and a broker that does not answer."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import proto
from batos.config import load
from batos.errors import ServiceError
from proto import Envelope, ErrorCode, Kind
from proto.bodies import kernel as K
from proto.bodies.broker import BrokerPingReply
from services.console import runner as runner_mod
from services.console.commands import Request
from services.console.connection import BrokerMonitor
from services.console.render import Handle
from services.console.runner import Runner
from services.console.scripted import EXIT_ERROR, EXIT_OK, EXIT_USAGE, lines_of, run_script

Emit = Callable[[Envelope], None]
Responder = Callable[[Envelope, Emit], Awaitable[None]]


class FakeCall:
    def __init__(self, req: Envelope):
        self.request = req
        self.id = req.id
        self.queue: asyncio.Queue[Envelope] = asyncio.Queue()
        self.done = False

    async def events(self):
        while True:
            env = await self.queue.get()
            yield env
            if env.kind in (Kind.REPLY, Kind.ERROR):
                return

    def put(self, env: Envelope) -> None:
        if not self.done:
            self.done = env.kind in (Kind.REPLY, Kind.ERROR)
            self.queue.put_nowait(env)


class FakeClient:
    """What the console uses of batos.client.Client, answering from a responder coroutine."""

    endpoint = "tcp://fake:1"

    def __init__(self, responder: Responder, *, broker_up: bool = True, honour_cancel: bool = True):
        self.responder = responder
        self.broker_up = broker_up
        self.honour_cancel = honour_cancel
        self.pending: dict[str, FakeCall] = {}
        self.sent: list[tuple[str, str, dict]] = []
        self.cancelled: list[str] = []
        self.idempotent: list[bool] = []
        self.tasks: list[asyncio.Task] = []

    async def __aenter__(self) -> FakeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for t in self.tasks:
            t.cancel()

    async def start_call(self, service: str, command: str, body: dict | None = None, *,
                         idempotent: bool | None = None) -> FakeCall:
        req = proto.request(service, command, body, idempotent=idempotent)
        self.idempotent.append(req.idempotent)
        call = FakeCall(req)
        self.pending[req.id] = call
        self.sent.append((service, command, body or {}))
        self.tasks.append(asyncio.create_task(self.responder(req, call.put)))
        return call

    async def cancel(self, request_id: str) -> None:
        self.cancelled.append(request_id)
        call = self.pending.get(request_id)
        if call is not None and self.honour_cancel:
            call.put(proto.error_for(call.request, ErrorCode.CANCELLED, "kernel.ask was cancelled"))

    async def ping(self, timeout: float = 2.0) -> BrokerPingReply:
        if not self.broker_up:
            await asyncio.sleep(0.01)
            raise ServiceError(ErrorCode.TIMEOUT, "no pong")
        return BrokerPingReply(pong=True, version="test", boot_id="boot-1")


def answer_reply(answer: str, cycle_id: str, citations: list[dict[str, Any]]) -> dict[str, Any]:
    """An ``ask`` reply as the kernel sends it (proto.bodies.kernel.AnswerReply), with little in it."""
    return {"answer": answer, "cycle_id": cycle_id, "status": "SUCCESS", "citations": citations,
            "also_retrieved": [], "notes": [], "evidence": [], "validation": [], "rewritten": False,
            "model_text": answer, "steps": 1, "thoughts": 0, "stop": "", "fallback": None, "persona": "ROBIN",
            "query_morph": "", "prompt_budget": {}, "timing": {}}


STALL = Request(K.DisplayYourself(), label="display_yourself")


async def kernel(req: Envelope, emit: Emit) -> None:
    """A fake kernel: streams like the real one would, answers per command."""
    if req.command == "ask":
        emit(proto.event(req, "state", {"cycle_id": "cc11", "state": "REASONING"}))
        emit(proto.event(req, "thought", {"cycle_id": "cc11", "step": 1, "text": "think"}))
        for tok in ["an ", "answer"]:
            emit(proto.event(req, "token", {"text": tok}))
        emit(proto.reply(req, answer_reply("an answer", "cc11", [{"oid": "1a", "file_path": "/x/a.py", "start_line": 1,
                                                                 "end_line": 4}])))
    elif req.command == "watch":
        emit(proto.event(req, "watching", {"kernel": "k", "pid": 1, "target": {"id": "c1", "kind": "cycle",
                                                                              "command": "ask"}, "replayed": 0}))
        emit(proto.event(req, "keepalive", {}))
        emit(proto.event(req, "state", {"activity": "a1", "command": "ask", "cycle_id": "c1", "state": "COMPLETE"}))
        emit(proto.reply(req, {"watched": "c1", "kind": "cycle", "command": "ask", "state": "COMPLETE"}))
    elif req.command == "display_yourself":  # stands for any long request
        await asyncio.sleep(3600)
    elif req.command == "verify":
        broken = not req.body.get("repair")
        emit(proto.reply(req, {"ok": not broken, "bad_files": [], "checked": {"files": 1},
                               "problems": [{"kind": "orphan", "oid": "1a"}] if broken else [],
                               "problem_counts": {"orphan": 1} if broken else {}}))
    elif req.command in ("define", "send"):
        emit(proto.reply(req, {"cycle_id": "cc12", "status": "SUCCESS", "oid": req.body["oid"],
                               "selector": req.body["selector"], "version": 1}))
    elif req.command == "stats":
        emit(proto.reply(req, {"counts": {"memory_chunk": 3}, "vectors": {"rows": 3}, "storage_bytes": 1,
                               "index": {}, "cycles": {"total": 0, "unfinished": 0}}))
    else:
        emit(proto.error_for(req, ErrorCode.UNKNOWN_COMMAND, f"kernel does not understand {req.command!r}"))


async def script(text: str, client: FakeClient, *, json_mode: bool = True, **kw: Any) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = await run_script(lines_of(text), load(), identity="architect-console-test", json_mode=json_mode,
                          out=out, err=err, client=client, **kw)  # type: ignore[arg-type]
    return rc, out.getvalue(), err.getvalue()


def objects(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


async def test_json_mode_events_then_reply():
    client = FakeClient(kernel)
    rc, out, _ = await script("ask what is ZODB?", client)
    assert rc == EXIT_OK
    objs = objects(out)
    assert [o["kind"] for o in objs] == ["event"] * 4 + ["reply"]
    assert [o["body"]["event"] for o in objs[:4]] == ["state", "thought", "token", "token"]
    assert objs[-1]["body"]["answer"] == "an answer"
    assert client.sent == [("kernel", "ask", {"question": "what is ZODB?"})]


async def test_text_mode_streams_tokens_and_cites():
    rc, out, _ = await script("ask q", FakeClient(kernel), json_mode=False)
    assert rc == EXIT_OK
    assert out == ("→ REASONING  (cycle cc11)\nthought 1: think\nan answer\ncitations:\n"
                   "  [1] /x/a.py:1-4  oid 1a\nstatus: SUCCESS\nsteps: 1\nthoughts: 0\npersona: ROBIN\n"
                   "cycle cc11 (see it with: trace cc11)\n")


async def test_error_reply_exits_1_and_stops_the_script():
    client = FakeClient(kernel)
    rc, out, _ = await script("audit\nstats", client)
    assert rc == EXIT_ERROR
    assert objects(out) == [{"kind": "error", "command": "audit", "id": objects(out)[0]["id"],
                             "code": "unknown_command", "message": "kernel does not understand 'audit'"}]
    assert [c[1] for c in client.sent] == ["audit"]


async def test_parse_error_exits_2_without_sending():
    client = FakeClient(kernel)
    rc, out, _ = await script("inspect xyz", client)
    assert rc == EXIT_USAGE and client.sent == []
    assert objects(out)[0]["code"] == "bad_args" and "bad OID" in objects(out)[0]["message"]


async def test_several_lines_and_multiline_define():
    client = FakeClient(kernel)
    text = "# set up\ndefine 1a greet\ndef greet(self):\n    return 'hi'\n.\nsend 1a greet\nquit\nstats"
    rc, _out, _ = await script(text, client)
    assert rc == EXIT_OK
    assert [c[1] for c in client.sent] == ["define", "send"]  # quit stopped before stats
    assert client.sent[0][2] == {"oid": "1a", "selector": "greet", "source": "def greet(self):\n    return 'hi'\n"}


async def test_define_without_terminator_is_a_usage_error():
    client = FakeClient(kernel)
    rc, out, _ = await script("define 0 f\ndef f(self): pass", client)
    assert rc == EXIT_USAGE and client.sent == []
    assert "'.'" in objects(out)[0]["message"]


async def test_help_needs_no_broker():
    client = FakeClient(kernel, broker_up=False)
    rc, out, _ = await script("help", client)
    assert rc == EXIT_OK and "ingest PATH" in "\n".join(objects(out)[0]["body"]["lines"])


async def test_broker_down_is_said_and_exits_1():
    client = FakeClient(kernel, broker_up=False)
    rc, out, err = await script("stats", client, connect_timeout=0.3)
    assert rc == EXIT_ERROR and client.sent == []
    assert "waiting up to 0.3 s for the broker at tcp://fake:1" in err
    assert objects(out)[0]["code"] == "unavailable"


async def test_timeout_cancels_at_the_service():
    async def stall(req: Envelope, emit: Emit) -> None:
        await asyncio.sleep(3600)

    client = FakeClient(stall, honour_cancel=False)
    rc, out, _ = await script("send 0 anything", client, timeout=0.2)
    assert rc == EXIT_ERROR and objects(out)[-1]["code"] == "timeout" and len(client.cancelled) == 1
    client = FakeClient(kernel, honour_cancel=False)
    runner = Runner(client, _NullView(), timeout=0.2)
    outcome = await runner.run(STALL)
    assert outcome.code == "timeout" and len(client.cancelled) == 1 and client.pending == {}


async def test_cancel_by_tag_and_local_give_up(monkeypatch):
    monkeypatch.setattr(runner_mod, "CANCEL_GRACE", 0.1)
    view = _NullView()
    # a service that confirms the cancel
    client = FakeClient(kernel)
    runner = Runner(client, view)
    task = asyncio.create_task(runner.run(STALL))
    await asyncio.sleep(0.05)
    assert await runner.cancel("1") == [1]
    outcome = await task
    assert outcome.code == "cancelled" and runner.inflight == {}
    # a service that never answers: the console stops waiting after the grace period
    mute = FakeClient(kernel, honour_cancel=False)
    runner = Runner(mute, view)
    task = asyncio.create_task(runner.run(STALL))
    await asyncio.sleep(0.05)
    assert await runner.cancel("all") == [1]
    outcome = await asyncio.wait_for(task, 2)
    assert outcome.code == "cancelled" and "did not confirm" in outcome.message
    assert await runner.cancel("5") == []


async def test_not_connected_refuses_to_send():
    client = FakeClient(kernel)
    runner = Runner(client, _NullView(), is_connected=lambda: False)
    outcome = await runner.run(Request(K.Stats(), label="stats"))
    assert outcome.code == "unavailable" and client.sent == []


async def test_a_body_the_renderer_chokes_on_does_not_crash():
    class Exploding(_NullView):
        def reply(self, handle, body):
            raise KeyError("boom")

    view = Exploding()
    outcome = await Runner(FakeClient(kernel), view).run(Request(K.Stats(), label="stats"))
    assert outcome.ok and any("could not render" in n for n in view.notices)


async def test_monitor_reports_down_up_and_restart():
    notes: list[tuple[str, str]] = []
    client = FakeClient(kernel)
    mon = BrokerMonitor(client, lambda t, s: notes.append((s, t)))
    assert await mon.check() and notes == []  # first contact: quiet
    client.broker_up = False
    assert not await mon.check()
    assert not await mon.check()  # said once
    client.broker_up = True
    assert await mon.check()
    mon.boot_id = "old-boot"
    assert await mon.check()
    assert [s for s, _ in notes] == ["warning", "notice", "warning"]
    assert "not answering" in notes[0][1] and "connected" in notes[1][1] and "restarted" in notes[2][1]


class _NullView:
    def __init__(self) -> None:
        self.notices: list[str] = []
        self.errors: list[tuple[str, str]] = []

    def begin(self, handle: Handle) -> None: ...
    def event(self, handle: Handle, body: dict) -> None: ...
    def reply(self, handle: Handle, body: dict) -> None: ...

    def error(self, handle: Handle, code: str, message: str, details: dict | None = None) -> None:
        self.errors.append((code, message))

    def notice(self, text: str, style: str = "notice") -> None:
        self.notices.append(text)

    def lines(self, lines: list[str]) -> None: ...


@pytest.fixture(autouse=True)
def _fast_monitor(monkeypatch):
    monkeypatch.setattr("services.console.connection.DOWN_INTERVAL", 0.05)


async def test_a_reply_that_reports_its_own_failure_fails_the_script():
    # `make verify` relies on this: problems found -> non-zero exit, a clean image -> 0
    rc, out, _ = await script("verify", FakeClient(kernel))
    assert rc == EXIT_ERROR and objects(out)[-1]["body"]["ok"] is False
    rc, out, _ = await script("verify repair", FakeClient(kernel))
    assert rc == EXIT_OK and objects(out)[-1]["body"]["ok"] is True


async def test_watch_is_sent_retry_safe_and_its_keepalives_are_never_shown():
    client = FakeClient(kernel)
    rc, out, _ = await script("watch c1c1", client)
    assert rc == EXIT_OK and client.idempotent == [True]
    assert [o["body"].get("event") for o in objects(out)] == ["watching", "state", None]
    rc, out, _ = await script("watch c1c1", FakeClient(kernel), json_mode=False)
    assert "keepalive" not in out and out.splitlines()[-1] == "watch of cycle c1 (ask) ended: COMPLETE"


async def test_a_watch_lost_with_the_broker_is_sent_again_when_it_answers():
    calls = []

    async def flaky(req: Envelope, emit: Emit) -> None:
        calls.append(req.command)
        if len(calls) == 1:  # what the client says when a broker restart lost the request
            emit(proto.error_for(req, ErrorCode.UNAVAILABLE, "the broker restarted while this request was in flight"))
            return
        await kernel(req, emit)

    client = FakeClient(flaky)
    rc, out, err = await script("watch c1c1", client, json_mode=False)
    assert rc == EXIT_OK and calls == ["watch", "watch"] and client.idempotent == [True, True]
    assert out.splitlines()[0].startswith("watch interrupted: the broker restarted")
    assert "resuming watch" in err
    assert out.splitlines()[-1] == "watch of cycle c1 (ask) ended: COMPLETE"
    # what is not resumable fails as before
    client = FakeClient(flaky)
    calls.clear()
    rc, out, _ = await script("ask q", client, json_mode=False)
    assert rc == EXIT_ERROR and calls == ["ask"] and "error [unavailable]" in out


async def test_a_watch_waiting_for_the_broker_is_cancelled_at_once(monkeypatch):
    monkeypatch.setattr(runner_mod, "RESUME_INTERVAL", 0.01)

    async def lost(req: Envelope, emit: Emit) -> None:
        emit(proto.error_for(req, ErrorCode.UNAVAILABLE, "lost the connection to the broker"))

    client = FakeClient(lost, broker_up=False)
    view = _NullView()
    runner = Runner(client, view)
    task = asyncio.create_task(runner.run(Request(K.Watch(), label="watch", resumable=True)))
    while not view.errors:  # the first try failed; now it waits for the broker
        await asyncio.sleep(0.01)
    assert await runner.cancel("all") == [1]
    outcome = await asyncio.wait_for(task, 2)
    assert outcome.code == "cancelled" and "waiting for the broker" in outcome.message and runner.inflight == {}
    assert len(client.sent) == 1


async def test_a_reply_outside_the_contract_is_an_error_naming_the_field():
    """The console decodes each reply into the command's type (proto.bodies.kernel): an ``ask`` reply without a
    ``status`` is refused, naming it, instead of being shown as if it were an answer."""
    async def sloppy(req: Envelope, emit: Emit) -> None:
        body = answer_reply("an answer", "cc11", [])
        del body["status"]
        emit(proto.reply(req, body))

    rc, out, _ = await script("ask q", FakeClient(sloppy))
    assert rc == EXIT_ERROR
    error = objects(out)[-1]
    assert error["code"] == "internal" and "kernel.ask answered outside its contract" in error["message"]
    assert "`status`" in error["message"]
