"""BABS's golden-path curation: cycles of real Table 3 events (built with batos.audit) -> SFT JSONL."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from batos.audit import AuditEvent
from batos.outcome import Outcome, event_key
from services.forge import curation
from services.forge.curation import CurationError, curate, extract_example, write_dataset
from tests.unit import audit_fractals

T0 = datetime(2025, 9, 1, 12, 0, tzinfo=UTC)


def fractal(event: AuditEvent) -> dict:
    """What memory's query_fractals returns for one ingested event: what the kernel sent, and its oid."""
    return {"oid": uuid.uuid4().hex[:6], **audit_fractals.fractal(event, event.event_type)}


def dnu_cycle(selector: str, source: str, *, ok: bool = True, minute: int = 0, mission: str = "_jit_compile_method_",
              final: str = "SUCCESS", prompt: str | None = None) -> list[dict]:
    """A `send` cycle in which BRICK wrote a missing method, the way the kernel logs it."""
    cid = str(uuid.uuid4())
    at = T0 + timedelta(minutes=minute)
    tick = iter(range(100))

    def ts():
        return at + timedelta(seconds=next(tick))

    brief = {"target_oid": "1a", "selector": selector, "args": [2], "kwargs": {}}
    prompt = prompt or f"[system] You are BRICK.\n[user] Write `def {selector}(self, x)`.\nReturn only code."
    events = [
        AuditEvent.cycle_start(cid, persona="BRICK", mission_type=mission, input=brief, timestamp=ts()),
        AuditEvent.transition(cid, "IDLE", "SYNTHESIZING", persona="BRICK", mission_type=mission, timestamp=ts()),
        AuditEvent.llm_call(cid, "SYNTHESIZING", persona="BRICK", prompt=prompt, response=source,
                            mission_type=mission, timestamp=ts()),
        AuditEvent.dnu_outcome(cid, "VALIDATING", persona="BRICK", receiver_oid="1a", selector=selector,
                               status="SUCCESS" if ok else "FAILURE", source=source, mission_type=mission,
                               llm_prompt=prompt, mission_brief=brief, timestamp=ts()),
        AuditEvent.transition(cid, "VALIDATING", "COMPLETE" if final != "FAILURE" else "FAILED", persona="ALFRED",
                              status=final, mission_type=mission, timestamp=ts()),
        AuditEvent.cycle_end(cid, persona="BRICK", status=final, output=source, mission_type=mission, timestamp=ts()),
    ]
    return [fractal(e) for e in events]


def test_golden_paths_become_chat_examples():
    fractals = dnu_cycle("double", "def double(self, x):\n    return 2 * x\n", minute=1) + \
        dnu_cycle("triple", "def triple(self, x):\n    return 3 * x\n", minute=2)
    result = curate(fractals, "BRICK", "_jit_compile_method_", eval_percent=0)
    assert result.counts()["examples"] == 2 and result.cycles_successful == 2
    record = {ex.event_id: ex.record() for ex in result.examples}
    messages = next(r for r in record.values() if "triple" in r["messages"][-1]["content"])["messages"]
    # The chat BRICK saw is restored from the audit rendering; the assistant turn is the validated source.
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[0]["content"] == "You are BRICK."
    assert messages[1]["content"] == "Write `def triple(self, x)`.\nReturn only code."
    assert messages[2]["content"] == "def triple(self, x):\n    return 3 * x\n"


def test_failed_degraded_and_other_persona_cycles_are_excluded():
    fractals = (dnu_cycle("good", "def good(self, x):\n    return x\n")
                + dnu_cycle("refused", "def refused(self, x): ...", ok=False, final="FAILURE")
                + dnu_cycle("meh", "def meh(self, x):\n    return 0\n", final="SUCCESS_DEGRADED")
                # DNU itself succeeded, but the cycle failed afterwards: not a golden path
                + dnu_cycle("late", "def late(self, x):\n    return 1\n", final="FAILURE"))
    result = curate(fractals, "BRICK", eval_percent=0)
    assert [ex.messages[-1]["content"] for ex in result.examples] == ["def good(self, x):\n    return x\n"]
    assert result.cycles_seen == 4 and result.cycles_successful == 1
    assert curate(fractals, "ROBIN").counts()["examples"] == 0  # ROBIN wrote none of these
    assert curate(fractals, "BRICK", "ask").counts()["examples"] == 0  # wrong mission


def test_a_cycles_outcome_follows_the_terminal_transition():
    events = [curation.parse_event(f) for f in dnu_cycle("x", "def x(self):\n    return 1\n")]
    assert Outcome.of(events).status == "SUCCESS"
    assert Outcome.of(events[:3]).status == "SUCCESS"  # no terminal transition yet: last ending status (the LLM call)
    assert Outcome.of(events[:1]).status == ""  # only IN_PROGRESS so far
    assert Outcome.of(reversed(events)).status == "SUCCESS"  # the order they come in does not matter


def test_curation_orders_events_by_time_whatever_the_timestamp_spelling():
    """Table 3 allows any UTC offset and 0-6 fraction digits: ``12:00:00Z`` is after ``11:59:59.5+00:00`` and
    ``12:30:00+01:00`` before both, though as text they sort the other way round."""
    cid = str(uuid.uuid4())
    base = {"cycle_id": cid, "event_type": "LLM_CALL", "psm_state": "SYNTHESIZING", "event_data": {}}
    events = [{**base, "event_id": "a", "timestamp": "2025-09-01T12:00:00Z", "status": "FAILURE"},
              {**base, "event_id": "b", "timestamp": "2025-09-01T11:59:59.5+00:00", "status": "SUCCESS"},
              {**base, "event_id": "c", "timestamp": "2025-09-01T12:30:00+01:00", "status": "SUCCESS"}]
    assert [e["event_id"] for e in curation.group_cycles(events)[cid]] == ["c", "b", "a"]
    assert Outcome.of(events).status == "FAILURE"  # the latest ending is 12:00:00Z's
    assert event_key("2025-09-01T12:00:00Z", "a") == ("2025-09-01T12:00:00.000000+00:00", "a")  # memory's spelling


def test_duplicates_by_normalized_output_and_cap():
    same = "def f(self, x):\n    return x + 1\n"
    fractals = (dnu_cycle("f", same, minute=1) + dnu_cycle("f", "def f(self, x):\n        return x  +  1", minute=2)
                + [f for i in range(5) for f in dnu_cycle(f"g{i}", f"def g{i}(self, x):\n    return {i}\n",
                                                          minute=10 + i)])
    result = curate(fractals, "BRICK", cap_per_mission=3, eval_percent=0)
    assert result.duplicates == 1 and result.capped == 3 and len(result.examples) == 3
    # Newest cycles win the cap: g4, g3, g2.
    assert sorted(ex.messages[-1]["content"][4:6] for ex in result.examples) == ["g2", "g3", "g4"]


def test_held_out_split_is_deterministic_and_disjoint():
    fractals = [f for i in range(40) for f in dnu_cycle(f"m{i}", f"def m{i}(self):\n    return {i}\n", minute=i)]
    a = curate(fractals, "BRICK", eval_percent=25)
    b = curate(list(reversed(fractals)), "BRICK", eval_percent=25)
    assert [ex.output_hash for ex in a.train] == [ex.output_hash for ex in b.train]
    assert [ex.output_hash for ex in a.eval] == [ex.output_hash for ex in b.eval]
    assert not {ex.output_hash for ex in a.train} & {ex.output_hash for ex in a.eval}
    assert 2 <= len(a.eval) <= 20 and len(a.train) + len(a.eval) == 40
    # Growing the history never moves an example between the splits.
    more = [f for i in range(40, 60) for f in dnu_cycle(f"m{i}", f"def m{i}(self):\n    return {i}\n", minute=i)]
    c = curate(fractals + more, "BRICK", eval_percent=25)
    assert {ex.output_hash for ex in a.eval} <= {ex.output_hash for ex in c.eval}


def test_tiny_sets_still_hold_one_out():
    fractals = dnu_cycle("a", "def a(self):\n    return 1\n") + dnu_cycle("b", "def b(self):\n    return 2\n")
    result = curate(fractals, "BRICK", eval_percent=1)
    assert len(result.train) == 1 and len(result.eval) == 1


def test_llm_call_examples_and_system_prompt_override():
    cid = str(uuid.uuid4())
    events = [
        AuditEvent.llm_call(cid, "SYNTHESIZING", persona="ROBIN", prompt=[
            {"role": "system", "content": "old"}, {"role": "user", "content": "What does X do?"}],
            response="X parses files (x.py:1-9).", mission_type="ask", timestamp=T0),
        AuditEvent.transition(cid, "VALIDATING", "COMPLETE", persona="ALFRED", status="SUCCESS", mission_type="ask",
                              timestamp=T0 + timedelta(seconds=1)),
    ]
    result = curate([fractal(e) for e in events], "robin", system_prompt="You are ROBIN.", eval_percent=0)
    (ex,) = result.examples
    assert ex.record()["messages"] == [{"role": "system", "content": "You are ROBIN."},
                                       {"role": "user", "content": "What does X do?"},
                                       {"role": "assistant", "content": "X parses files (x.py:1-9)."}]
    assert ex.mission_type == "ask" and ex.persona == "ROBIN"


def test_brief_is_rebuilt_when_no_prompt_was_logged():
    event = {"event_id": "e1", "cycle_id": "c1", "timestamp": "t", "active_persona": "BRICK",
             "event_type": "DNU_OUTCOME", "status": "SUCCESS",
             "event_data": {"selector": "area", "receiver_oid": "2b", "args": [3], "kwargs": {"unit": "cm"},
                            "source": "def area(self, r, unit='cm'):\n    return r * r\n"}}
    ex = extract_example(event)
    assert ex is not None and [m["role"] for m in ex.messages] == ["user", "assistant"]
    assert "`area`" in ex.messages[0]["content"] and '"unit": "cm"' in ex.messages[0]["content"]
    assert extract_example({**event, "status": "FAILURE"}) is None
    assert extract_example({**event, "event_data": {"selector": "area"}}) is None  # no output


def test_bad_input_is_a_clear_error():
    with pytest.raises(CurationError, match="not JSON"):
        curate([{"oid": "9", "full_json": "{oops", "meta": {}}], "BRICK")
    with pytest.raises(CurationError, match="persona"):
        curate([], "")
    with pytest.raises(CurationError, match="eval_percent"):
        curate([], "BRICK", eval_percent=100)


def test_write_dataset_jsonl(tmp_path):
    fractals = [f for i in range(6) for f in dnu_cycle(f"w{i}", f"def w{i}(self):\n    return {i}\n", minute=i)]
    result = curate(fractals, "BRICK", eval_percent=30)
    files = write_dataset(result, tmp_path / "ds")
    train = [json.loads(line) for line in files.train_path.read_text().splitlines()]
    held = [json.loads(line) for line in files.eval_path.read_text().splitlines()]
    assert len(train) == len(result.train) and len(held) == len(result.eval) and train and held
    assert all(set(r) == {"messages"} and r["messages"][-1]["role"] == "assistant" for r in train + held)
    assert files.train_ids == [ex.event_id for ex in result.train] and len(files.sha256) == 64
    again = write_dataset(curate(list(reversed(fractals)), "BRICK", eval_percent=30), tmp_path / "ds2")
    assert again.sha256 == files.sha256  # same data, same hash, whatever order memory returned it in
    assert not list((tmp_path / "ds").glob("*.tmp"))
