"""The kernel's ``trace`` of a long cycle comes in pages (issue 13 item 6), each within the page budget."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from batos import paging
from batos.audit import AuditEvent, new_id
from batos.errors import ServiceError
from proto.bodies import kernel as K
from services.kernel import commands
from tests.unit.test_kernel_commands import FractalMemory, kernel, real_audit  # noqa: F401  (fixtures)
from tests.unit.test_kernel_cycle import *  # noqa: F403  (the kernel test kit: fixtures)
from tests.unit.test_kernel_cycle import Events, new_run

BUDGET = 64 * 1024


def _fractal(cycle_id: str, i: int) -> dict:
    ev = AuditEvent.llm_call(cycle_id, "SYNTHESIZING", persona="BRICK", mission_type="ask",
                             prompt=f"prompt {i} " + "p" * 5000, response="r")
    ev = ev.model_copy(update={"timestamp": datetime(2026, 12, 6, tzinfo=UTC) + timedelta(seconds=i),
                               "event_id": new_id()})
    return {"event_id": ev.event_id, "summary": f"LLM_CALL {i}", "full_json": ev.model_dump_json(),
            "meta": {"cycle_id": cycle_id}}


async def test_a_long_trace_is_paged_and_adds_up(kernel, env, client, real_audit, monkeypatch):  # noqa: F811
    monkeypatch.setattr(paging, "PAGE_BYTES", BUDGET)
    memory = FractalMemory()
    memory.install(client)
    run = new_run(env, Events())
    await run.begin()
    planted = [_fractal(run.cycle_id, i) for i in range(120)]
    memory.fractals.update({f["event_id"]: f for f in planted})
    seen: list[str] = []
    after = None
    pages = 0
    while True:
        args = {"cycle_id": run.cycle_id, **({"after": after} if after else {})}
        reply = msgspec.to_builtins(await commands.dispatch(kernel, Events(), K.Trace(**args)))
        pages += 1
        assert paging.encoded_size(reply["events"]) <= BUDGET + 8 * 1024  # one event may tip a page over
        seen += [e["event_id"] for e in reply["events"]]
        after = reply["next"]
        if after is None:
            break
    planted_ids = {f["event_id"] for f in planted}
    assert pages > 3 and len(seen) == len(set(seen)) and planted_ids <= set(seen)
    with pytest.raises(ServiceError, match="not a cursor"):
        await commands.dispatch(kernel, Events(), K.Trace(cycle_id=run.cycle_id, after="x"))
