"""CognitiveCycle records in the Living Image: create, transition, fail, describe, recover.

Every function here takes ``(root, conn, ...)`` and runs inside an Image transaction on the thread that owns
``conn`` (``await image.transact(fn, ...)``); none of them awaits anything. A cycle is a UvmObject cloned from
the ``cognitive_cycle`` prototype, filed by its cycle id in ``root["cognitive_cycles"]`` (an OOBTree, so
concurrent cycles insert different keys without conflicting). ``root["active_cycles"]`` holds the ids of
cycles that were started, with the kernel instance that runs them: a kernel that starts again finds its
interrupted cycles there without scanning the whole history. Entries are only *inserted* while cycles run
(concurrent inserts of different keys merge); they are removed in batches by :func:`prune_active` (at startup
and from the autotelic loop), because concurrent deletes from one BTree bucket do not merge (a bucket that
would become empty is a ConflictError) and made finishing cycles conflict with each other.
"""

from __future__ import annotations

import time
from typing import Any

from BTrees.OOBTree import OOBTree

from batos.uvm import Root, UvmObject, oid_hex, resolve_oid
from services.kernel import psm
from services.kernel.psm import State

CYCLES_KEY = "cognitive_cycles"
ACTIVE_KEY = "active_cycles"
RESTART_REASON = "kernel restarted"


class UnknownCycle(KeyError):
    pass


def install_registry(root: Root) -> bool:
    changed = False
    for key in (CYCLES_KEY, ACTIVE_KEY):
        if key not in root:
            root[key] = OOBTree()
            changed = True
    return changed


def get_cycle(root: Root, cycle_id: str) -> UvmObject:
    cycle = root[CYCLES_KEY].get(cycle_id) if isinstance(cycle_id, str) else None
    if cycle is None:
        raise UnknownCycle(f"unknown cycle {cycle_id!r}")
    return cycle


def create_cycle(root: Root, conn: Any, *, cycle_id: str, mission: dict[str, Any], mission_type: str,
                 target_oid: str, persona: str, instance: str, parent_cycle: str | None = None) -> str:
    """Clone the cognitive_cycle prototype into a new cycle in IDLE; return its OID."""
    psm.check_transition(None, State.IDLE)
    now = time.time()
    cycle = root["prototypes"]["cognitive_cycle"].clone(
        cycle_id=cycle_id,
        mission=mission,
        mission_type=mission_type,
        target_oid=target_oid,
        persona=persona,
        instance=instance,
        parent_cycle=parent_cycle,
        child_cycles=[],
        state=psm.state_object(root, State.IDLE),
        psm_state=State.IDLE.value,
        status="IN_PROGRESS",
        history=[{"state": State.IDLE.value, "at": now, "note": ""}],
        created_at=now,
        finished_at=None,
        error=None,
        result=None,
        query_morph=None,
    )
    conn.add(cycle)
    root[CYCLES_KEY][cycle_id] = cycle
    root[ACTIVE_KEY][cycle_id] = instance
    if parent_cycle:
        parent = root[CYCLES_KEY].get(parent_cycle)
        if parent is not None:
            parent.set_slot("child_cycles", [*parent.get_slot("child_cycles", []), cycle_id])
    return oid_hex(cycle)


def transition(root: Root, conn: Any, cycle_id: str, dst: str, note: str = "",
               slots: dict[str, Any] | None = None) -> str:
    """Move a cycle to ``dst`` if its current state object accepts it; return the previous state."""
    cycle = get_cycle(root, cycle_id)
    current = cycle.get_slot("state")
    psm.check_transition(current, dst)
    target = psm.state_object(root, dst)
    now = time.time()
    cycle.set_slot("state", target)
    cycle.set_slot("psm_state", dst)
    cycle.set_slot("history", [*cycle.get_slot("history", []), {"state": dst, "at": now, "note": note}])
    for name, value in (slots or {}).items():
        cycle.set_slot(name, value)
    if target.get_slot("terminal"):
        cycle.set_slot("finished_at", now)
    return current.get_slot("state_name")


def mark_failed(root: Root, conn: Any, cycle_id: str, reason: str) -> str | None:
    """FAILED with ``reason`` unless the cycle already ended; return the previous state or None."""
    cycle = get_cycle(root, cycle_id)
    if cycle.get_slot("state").get_slot("terminal"):
        return None
    return transition(root, conn, cycle_id, State.FAILED, reason, {"status": "FAILURE", "error": reason})


def is_finished(root: Root, cycle_id: str) -> bool:
    cycle = root[CYCLES_KEY].get(cycle_id)
    return cycle is None or bool(cycle.get_slot("state").get_slot("terminal"))


def prune_active(root: Root, conn: Any, instance: str | None = None) -> int:
    """Drop registry entries of finished (or vanished) cycles; only this instance's when given."""
    done = [cid for cid, owner in root[ACTIVE_KEY].items()
            if (instance is None or owner == instance) and is_finished(root, cid)]
    for cycle_id in done:
        del root[ACTIVE_KEY][cycle_id]
    return len(done)


def fail_interrupted(root: Root, conn: Any, instance: str, reason: str = RESTART_REASON) -> list[dict[str, Any]]:
    """Mark FAILED every non-terminal cycle this kernel instance was running when it died, then prune.

    Returns {cycle_id, from, mission_type, persona} for each, so the caller can audit the failures."""
    failed = []
    for cycle_id in [cid for cid, owner in root[ACTIVE_KEY].items() if owner == instance]:
        if is_finished(root, cycle_id):
            continue
        cycle = root[CYCLES_KEY][cycle_id]
        previous = mark_failed(root, conn, cycle_id, reason)
        failed.append({"cycle_id": cycle_id, "from": previous, "mission_type": cycle.get_slot("mission_type"),
                       "persona": cycle.get_slot("persona")})
    prune_active(root, conn, instance)
    return failed


def unfinished(root: Root, conn: Any) -> list[dict[str, Any]]:
    """Registry entries whose cycles have not ended (any instance)."""
    return [{"cycle_id": cid, "instance": owner, "state": root[CYCLES_KEY][cid].get_slot("psm_state")}
            for cid, owner in root[ACTIVE_KEY].items() if not is_finished(root, cid)]


def describe_cycle(root: Root, conn: Any, cycle_id: str) -> dict[str, Any]:
    """Everything the image knows about one cycle, as plain data (for `trace`)."""
    cycle = get_cycle(root, cycle_id)
    out: dict[str, Any] = {
        "cycle_id": cycle_id,
        "oid": oid_hex(cycle),
        **{name: _plain(cycle.get_slot(name)) for name in (
            "mission_type", "mission", "target_oid", "persona", "instance", "psm_state", "status", "history",
            "created_at", "finished_at", "error", "result", "parent_cycle", "child_cycles")},
    }
    morph = cycle.get_slot("query_morph")
    if morph is not None:
        out["query_morph"] = {
            "oid": oid_hex(morph),
            "initial_prompt": morph.get_slot("initial_prompt"),
            "refined_query": _plain(morph.get_slot("refined_query")),
            "reasoning_log": _plain(morph.get_slot("reasoning_log")),
            "retrieved_context": [oid_hex(o) for o in morph.get_slot("retrieved_context") or []],
        }
    return out


def recent_cycles(root: Root, conn: Any, limit: int = 20) -> list[dict[str, Any]]:
    """The newest cycles (by creation time), briefly; a scan, so bounded by ``limit`` on output only."""
    rows = [(c.get_slot("created_at") or 0.0, cid, c.get_slot("psm_state"), c.get_slot("mission_type"))
            for cid, c in root[CYCLES_KEY].items()]
    rows.sort(reverse=True)
    return [{"cycle_id": cid, "state": st, "mission_type": mt, "created_at": at} for at, cid, st, mt in rows[:limit]]


def resolve_target(root: Root, conn: Any, target_oid: str) -> UvmObject:
    """The UvmObject a mission targets; KeyError with a clear message otherwise."""
    obj = resolve_oid(conn, target_oid)
    if not isinstance(obj, UvmObject):
        if target_oid.strip().lower() in ("0", "0x0"):
            return obj  # the root mapping is a valid target of cycles that need no methods
        raise KeyError(f"oid {target_oid!r} is a {type(obj).__name__}, not a UvmObject")
    return obj


def _plain(value: Any) -> Any:
    """Persistent containers and references → plain data that msgpack can carry."""
    if isinstance(value, UvmObject):
        return {"oid": oid_hex(value), "name": value.uvm_name}
    if isinstance(value, dict) or hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple) or type(value).__name__ == "PersistentList":
        return [_plain(v) for v in value]
    return value
