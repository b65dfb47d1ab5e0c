"""The audit history's indexes (services/memory_weaver/history_index.py): every query answers what a scan over all
fractals answers, in the same order and pages; the indexes survive a restart, are built for an image written
before them, and ``verify`` finds and repairs an index that disagrees with the fractals."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from batos.audit import AuditEvent
from batos.image import Image
from batos.outcome import Outcome
from proto.bodies.memory import QueryFractals
from services.forge.curation import group_cycles, parse_event
from services.memory_weaver import history_index
from services.memory_weaver.weaver import MemoryWeaver
from tests.unit.audit_fractals import fractal
from tests.unit.memory_wire import Wire
from tests.unit.test_audit_ingest import FakeMemory
from tests.unit.test_memory_image import image, settings, zeo_addr  # noqa: F401  (fixtures)
from tests.unit.test_memory_weaver import WordEmbedder, weaver  # noqa: F401  (fixture)

T0 = datetime(2026, 12, 6, 9, tzinfo=UTC)
PERSONAS = ("ALFRED", "BABS", "BRICK", "ROBIN")
MISSIONS = ("ask", "_jit_compile_method_", "forge")


def history(rng: random.Random, cycles: int, ties: bool = True) -> list[AuditEvent]:
    """Cycles the way the kernel logs them: a start, transitions, LLM calls and DNU outcomes, and an end that is
    a success, a failure, or missing (still running); timestamps interleave across cycles and (``ties``) some
    events of a cycle share one (memory then orders by event id)."""
    out: list[AuditEvent] = []
    for c in range(cycles):
        cid = f"00000000-0000-4000-8000-{c:012d}"
        mission = rng.choice(MISSIONS)
        t = T0 + timedelta(seconds=rng.randrange(0, 600))
        evs = [AuditEvent.cycle_start(cid, persona="ALFRED", mission_type=mission, input="q"),
               AuditEvent.transition(cid, "IDLE", "REASONING", persona="ALFRED", mission_type=mission)]
        for _ in range(rng.randrange(0, 4)):  # none: a cycle that has only started
            persona = rng.choice(PERSONAS)
            status = rng.choice(("SUCCESS", "SUCCESS", "FAILURE"))
            if rng.random() < 0.5:
                evs.append(AuditEvent.llm_call(cid, "SYNTHESIZING", persona=persona, mission_type=mission,
                                               prompt="[user] p", response="r", status=status))
            else:
                evs.append(AuditEvent.dnu_outcome(cid, "VALIDATING", persona=persona, receiver_oid="1a",
                                                  selector="m", status=status, source="def m(self): ...",
                                                  mission_type=mission, llm_prompt="p"))
        end = rng.choice(("COMPLETE", "FAILED", None))
        if end is not None:
            evs.append(AuditEvent.transition(cid, "VALIDATING", end, persona="ALFRED", mission_type=mission,
                                             status="SUCCESS" if end == "COMPLETE" else "FAILURE"))
        for i, ev in enumerate(evs):
            out.append(ev.model_copy(update={"timestamp": t + timedelta(seconds=i // 2 if ties else i)}))
    rng.shuffle(out)  # logged from several cycles at once
    return out


def queries(rng: random.Random, stamps: list[str], cycle_ids: list[str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{}, {"cycle_status": "SUCCESS"}, {"cycle_status": ""}, {"newest_first": True},
                                 {"persona": "ROBIN", "newest_first": True},
                                 {"persona": "BRICK", "status": "SUCCESS", "event_types": ["DNU_OUTCOME", "LLM_CALL"],
                                  "cycle_status": "SUCCESS"}]
    for _ in range(40):
        q: dict[str, Any] = {}
        if rng.random() < 0.3:
            q["cycle_id"] = rng.choice(cycle_ids)
        for field, values in (("persona", PERSONAS), ("status", ("SUCCESS", "FAILURE", "IN_PROGRESS")),
                              ("mission_type", MISSIONS), ("event_type", ("LLM_CALL", "STATE_TRANSITION"))):
            if rng.random() < 0.3:
                q[field] = rng.choice(values)
        if rng.random() < 0.3:
            q["since"] = rng.choice(stamps)
        if rng.random() < 0.3:
            q["until"] = rng.choice(stamps)
        if rng.random() < 0.2:
            q["event_types"] = rng.sample(["LLM_CALL", "DNU_OUTCOME", "CYCLE_START"], 2)
        if rng.random() < 0.2:
            q["cycle_status"] = rng.choice(("SUCCESS", "FAILURE", ""))
        if rng.random() < 0.3:
            q["newest_first"] = True
        out.append(q)
    return out


async def paged(w: Wire, query: dict[str, Any], limit: int) -> list[str]:
    """Every event id the query answers, following its pages."""
    seen: list[str] = []
    after = None
    while True:
        reply = await w.query_fractals({**query, "limit": limit, **({"after": after} if after else {})})
        seen += [f["event_id"] for f in reply["fractals"]]
        after = reply["next"]
        if after is None:
            return seen


async def ingested(w: Wire, events: list[AuditEvent], batch: int = 50) -> FakeMemory:
    scan = FakeMemory()
    for i in range(0, len(events), batch):
        body = {"events": [fractal(e) for e in events[i:i + batch]]}
        await w.create_fractals(body)
        scan.create_fractals(body)
    return scan


async def test_every_query_answers_what_a_scan_answers(weaver):  # noqa: F811
    rng = random.Random(15)
    events = history(rng, 40)
    scan = await ingested(weaver, events)
    stamps = sorted({f["meta"]["timestamp"] for f in scan.fractals.values()})
    for q in queries(rng, stamps, sorted({e.cycle_id for e in events})):
        want = [f["event_id"] for f in scan.query_fractals({**q, "limit": 10_000})["fractals"]]
        assert await paged(weaver, q, 10_000) == want, q
        assert await paged(weaver, q, 7) == want, q  # pages add up to the same, in the same order


async def test_memorys_outcome_of_a_cycle_is_the_one_curation_reads(weaver):  # noqa: F811
    """memory folds each fractal into its cycle's Outcome as it arrives (in batches, shuffled, timestamps tied);
    BABS's curation folds a whole cycle's parsed events at once: one rule, the same answer."""
    events = history(random.Random(7), 30)
    await ingested(weaver, events)

    def outcomes(root: Any, conn: Any) -> dict[str, str]:
        hx = root["memory"].history
        return {cid: hx.outcome(cid) for cid in {e.cycle_id for e in events}}

    by_cycle = group_cycles(parse_event(fractal(e)) for e in events)
    want = {cid: Outcome.of(evs).status for cid, evs in by_cycle.items()}
    assert await weaver.image.read(outcomes) == want
    assert {"SUCCESS", "FAILURE", ""} <= set(want.values())  # the history has every kind of ending


def test_the_outcome_does_not_depend_on_arrival_order():
    steps = [(("t1", "a"), "STATE_TRANSITION", "REASONING", "IN_PROGRESS"),
             (("t2", "b"), "DNU_OUTCOME", "VALIDATING", "SUCCESS"),
             (("t3", "c"), "STATE_TRANSITION", "FAILED", "FAILURE"),
             (("t4", "d"), "CYCLE_END", "FAILED", "SUCCESS")]
    for order in (steps, steps[::-1], steps[1:] + steps[:1]):
        out = Outcome()
        for step in order:
            out = out.add(*step)
        assert out.status == "FAILURE"  # entering FAILED decides it, whatever came later
    assert Outcome().add(("t", "x"), "LLM_CALL", "SYNTHESIZING", "SUCCESS").status == "SUCCESS"
    assert Outcome().add(("t", "x"), "LLM_CALL", "SYNTHESIZING", "IN_PROGRESS").status == ""


async def test_indexes_survive_a_restart_and_are_built_for_an_older_image(weaver, settings, zeo_addr):  # noqa: F811
    events = history(random.Random(3), 20)
    scan = await ingested(weaver, events)
    want = [f["event_id"] for f in scan.query_fractals({"persona": "BRICK", "limit": 10_000})["fractals"]]

    def forget(root: Any, conn: Any) -> None:  # an image written before the history indexes existed
        del root["memory"].history

    await weaver.image.transact(forget)
    for _ in range(2):  # the first start builds them (and commits); the second finds them
        fresh = Image(settings, addr=zeo_addr)
        await fresh.open()
        w = Wire(MemoryWeaver(fresh, WordEmbedder(), shard_rows=8))
        await w.start()
        try:
            assert await paged(w, {"persona": "BRICK"}, 10_000) == want
            assert (await w.verify({}))["ok"]
            count = await fresh.read(lambda root, conn: root["memory"].history.count())
            assert count == len(events)
        finally:
            await w.close()
            await fresh.close()


async def test_verify_finds_and_repairs_an_index_that_disagrees(weaver):  # noqa: F811
    events = history(random.Random(11), 10)
    scan = await ingested(weaver, events)
    victim = next(f for f in scan.fractals.values() if f["meta"]["persona"] == "BRICK")

    def damage(root: Any, conn: Any) -> None:
        hx = root["memory"].history
        key = (victim["meta"]["timestamp"], victim["event_id"])
        hx.by_persona.remove(("BRICK", *key))  # a lost index entry: queries by persona would miss it
        cid = victim["meta"]["cycle_id"]
        hx.cycles[cid] = Outcome(("~", "~"), "SUCCESS")  # and a wrong outcome

    await weaver.image.transact(damage)
    q = {"persona": "BRICK"}
    assert victim["event_id"] not in await paged(weaver, q, 100)
    out = await weaver.verify({})
    assert not out["ok"] and out["problem_counts"]["history_index"] == 2, out["problems"]
    fixed = await weaver.verify({"repair": True})
    assert fixed["repaired"]["history_reindexed"] == len(events) and fixed["after"]["ok"]
    want = [f["event_id"] for f in scan.query_fractals({**q, "limit": 10_000})["fractals"]]
    assert await paged(weaver, q, 100) == want


def test_the_index_is_idempotent_and_picks_a_driver():
    hx = history_index.HistoryIndex()
    row = history_index.Row.of(5, {"cycle_id": "c", "persona": "BRICK", "status": "SUCCESS", "event_type": "LLM_CALL"})
    assert hx.add(("t1", "e1"), row) and not hx.add(("t1", "e1"), row)
    assert hx.count() == 1 and list(hx.by_persona.keys()) == [("BRICK", "t1", "e1")]
    assert not list(hx.by_mission_type.keys())  # an empty field is not indexed
    found = list(hx.matching(QueryFractals(persona="BRICK", status="SUCCESS"), None))
    assert found == [(("t1", "e1"), row)]
    assert list(hx.matching(QueryFractals(persona="BRICK", status="FAILURE"), None)) == []
    assert list(hx.matching(QueryFractals(persona="BRICK"), ("t1", "e1"))) == []  # after the cursor


@pytest.mark.parametrize("bad", [{"limit": 0}, {"limit": 10_001}, {"event_types": "LLM_CALL"}, {"persona": 3}])
async def test_bad_queries_are_refused_by_the_type(weaver, bad):  # noqa: F811
    from batos.errors import ServiceError

    with pytest.raises(ServiceError) as e:
        await weaver.query_fractals(bad)
    assert e.value.code == "bad_args"
