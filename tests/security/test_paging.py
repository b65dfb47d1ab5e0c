"""Unbounded queries are paged (issue 13 item 6): no reply outgrows the frame limit, nothing is lost or repeated.

Before: ``query_fractals`` with the history's 10,000 limit and ``search`` with a large ``k`` answered in one
message, so a long history (or large chunks) made a reply bigger than the frame limit: the caller got
``too_large`` instead of its trace. Now each page stays within ``batos.paging.page_budget`` of the frame limit
and carries ``next``; the kernel's history helpers and the console follow it.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import proto
from batos import fractals, paging
from batos.audit import AuditEvent, new_id
from batos.errors import ServiceError
from proto import contract
from services.kernel import history
from tests.unit.memory_wire import Wire
from tests.unit.test_memory_image import image, settings, zeo_addr  # noqa: F401  (fixtures)
from tests.unit.test_memory_weaver import weaver  # noqa: F401  (fixture)

PAGE = 256 * 1024  # a small page budget, so a few MB of history spans many pages
BIG = 60_000  # bytes of full_json per event: four fit a page


CYCLES = {"c1": new_id(), "c2": new_id()}
T0 = datetime(2026, 12, 6, 9, tzinfo=UTC)


def eid(i: int) -> str:
    return f"00000000-0000-4000-8000-{i:012d}"  # a valid event id that sorts like i


def _event(i: int, cycle: str = "c1", pad: int = BIG) -> dict[str, Any]:
    """A real audit event (an LLM call with a long prompt) as the kernel's audit ingestion stores it."""
    ev = AuditEvent.llm_call(CYCLES[cycle], "SYNTHESIZING", persona="BRICK", mission_type="ask",
                             prompt=f"step {i} " + "x" * pad, response="ok")
    ev = ev.model_copy(update={"timestamp": T0 + timedelta(seconds=i), "event_id": eid(i)})
    return {"event_id": ev.event_id, "summary": f"step {i} of the cycle", "full_json": ev.model_dump_json(),
            "meta": {"cycle_id": ev.cycle_id, "persona": "BRICK", "status": "SUCCESS", "event_type": "LLM_CALL",
                     "timestamp": ev.timestamp.isoformat()}}


@pytest.mark.parametrize("by", ["cycle", "time"])
async def test_history_pages_fit_the_frame_and_add_up_to_everything(weaver, by):  # noqa: F811
    await weaver.create_fractals({"events": [_event(i) for i in range(40)] + [_event(99, cycle="c2")]})
    query = {"cycle_id": CYCLES["c1"]} if by == "cycle" else {"persona": "BRICK"}
    frame = 4 * PAGE  # page_budget(frame) == PAGE
    seen: list[str] = []
    after = None
    pages = 0
    while True:
        body = {**query, "limit": 10_000, **({"after": after} if after else {})}
        reply = await Wire(weaver.weaver, max_frame_bytes=frame).query_fractals(body)
        pages += 1
        assert paging.encoded_size(reply) < frame, f"page {pages} is over the frame limit"
        assert reply["fractals"], "a page that is not the last is never empty"
        seen += [f["event_id"] for f in reply["fractals"]]
        after = reply["next"]
        if after is None:
            break
        if pages == 2:  # events ingested while a reader pages are found after its cursor, never twice
            await weaver.create_fractals({"events": [_event(200)]})
    want = [eid(i) for i in range(40)] + ([eid(99)] if by == "time" else []) + [eid(200)]
    assert pages >= 10 and seen == want


async def test_a_page_holds_at_least_one_item_and_a_bad_cursor_is_refused(weaver):  # noqa: F811
    await weaver.create_fractals({"events": [_event(i, pad=3 * PAGE) for i in range(2)]})
    small = Wire(weaver.weaver, max_frame_bytes=4 * PAGE)  # page_budget(4 * PAGE) == PAGE
    reply = await small.query_fractals({"cycle_id": CYCLES["c1"]})
    assert len(reply["fractals"]) == 1 and reply["next"]  # larger than a page: it travels alone
    last = await small.query_fractals({"cycle_id": CYCLES["c1"], "after": reply["next"]})
    assert [f["event_id"] for f in last["fractals"]] == [eid(1)] and last["next"] is None
    for bad in ("nope", json.dumps([1, 2]), "[]"):
        with pytest.raises(ServiceError) as e:
            await weaver.query_fractals({"cycle_id": CYCLES["c1"], "after": bad})
        assert e.value.code == "bad_args"


async def test_kernel_history_follows_pages(weaver):  # noqa: F811
    await weaver.create_fractals({"events": [_event(i) for i in range(30)]})
    calls: list[dict[str, Any]] = []
    wire = Wire(weaver.weaver, max_frame_bytes=4 * PAGE)

    async def memory(body: Any) -> Any:  # Client.request, over the worker's decode and encode
        s = contract.spec_of(body)
        calls.append(contract.encode(body))
        return contract.decode_reply(s, await wire.call(s.command, contract.encode(body)))

    events = await history.trace_cycle(memory, CYCLES["c1"])
    assert [e.event_id for e in events] == [eid(i) for i in range(30)]
    assert len(calls) > 1 and all(c.get("limit", 0) <= fractals.PAGE_ITEMS for c in calls)


class _BigHits:
    """A weaver whose search returns ``k`` hits of 50 KB each (large chunks, large k)."""

    async def search(self, body: Any) -> list[dict[str, Any]]:
        return [{"oid": format(i, "x"), "level": "chunk", "text": "y" * 50_000, "score": 1.0 - i / 1000,
                 "metadata": {}, "token_count": None} for i in range(body.k)]


async def test_search_pages_and_the_console_follows_them():
    frame = 4 * PAGE
    fake = _BigHits()

    async def fetch(after: str | None) -> dict[str, Any]:
        args = {"text": "q", "k": 40, **({"after": after} if after else {})}
        reply = await Wire(fake, max_frame_bytes=frame).search(args)  # type: ignore[arg-type]
        assert paging.encoded_size(reply) < frame
        return reply

    first = await fetch(None)
    assert first["next"] and len(first["hits"]) < 40
    merged = await paging.follow(first, fetch)
    assert [h["oid"] for h in merged["hits"]] == [format(i, "x") for i in range(40)]
    assert merged["next"] is None and merged["pages"] > 1
    with pytest.raises(ServiceError):
        await fetch("-1")


async def test_the_console_pages_transparently():
    from tests.unit.test_console_scripted import FakeClient, objects, script

    hits = [{"oid": format(i, "x"), "text": f"hit {i}", "score": 1.0, "level": "chunk", "metadata": {},
             "token_count": None} for i in range(10)]  # memory's Hit, which the console decodes

    async def kernel(req, emit):
        start = int(req.body.get("after") or 0)
        page = hits[start:start + 4]
        more = start + len(page) < len(hits)
        emit(proto.reply(req, {"hits": page, "next": str(start + len(page)) if more else None}))

    class PagingClient(FakeClient):
        async def call(self, service, command, body=None, *, idempotent=False, **kw):
            call = await self.start_call(service, command, body, idempotent=idempotent)
            async for env in call.events():
                if env.kind == proto.Kind.REPLY:
                    return env.body
            raise AssertionError("no reply")

    client = PagingClient(kernel)
    rc, out, _ = await script("search k=10 paged results", client)
    assert rc == 0
    reply = objects(out)[-1]["body"]
    assert [h["oid"] for h in reply["hits"]] == [h["oid"] for h in hits] and reply["next"] is None
    assert [body.get("after") for _, _, body in client.sent] == [None, "4", "8"]
