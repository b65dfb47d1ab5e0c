"""The audit history's indexes: ContextFractals by time, cycle, persona, status, mission type and event type.

``root["memory"].history`` (a :class:`HistoryIndex`) holds, all in BTrees:

- ``events``  OOBTree  (timestamp, event_id) -> :class:`Row`: the fractal's oid and its query fields, so a
  filter is checked from the index's buckets without loading a fractal (a ZEO round trip each, cold);
- ``by_cycle`` / ``by_persona`` / ``by_status`` / ``by_mission_type`` / ``by_event_type``  OOTreeSet of
  (value, timestamp, event_id): one field's events in time order, a range scan from ``since``;
- ``cycles``  OOBTree  cycle_id -> :class:`batos.outcome.Outcome`: how each cycle ended so far, folded in as
  its events arrive (``cycle_status`` queries: "golden events of cycles that succeeded" is one query);
- ``count``   Length: the fractals indexed (checked by ``verify`` against the fractals themselves).

A query walks one index (the first filter given, in ``DRIVERS`` order, else ``events``) from its lower bound
and checks the other filters against each row; only the rows that match are loaded as fractals, lazily, as the
page fills. Fractals are never deleted, so keys only ever get added; ``create_fractals`` indexes in the same
transaction that stores the fractal, ``verify`` compares the indexes with the fractals and ``repair`` rebuilds
them, and an image written before these indexes existed gets them built once, at start (:func:`ensure`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import persistent
from BTrees.Length import Length
from BTrees.OOBTree import OOBTree, OOTreeSet

from batos.outcome import Outcome
from proto.bodies.memory import QueryFractals

FIELDS = ("cycle_id", "persona", "status", "mission_type", "event_type")
DRIVERS = ("cycle_id", "persona", "mission_type", "event_type", "status")  # most selective first, usually
TOP = "\uffff"  # above any timestamp or event id: an inclusive upper bound for a string prefix
Key = tuple[str, str]  # (timestamp, event_id)


class Row(NamedTuple):
    """What the index keeps of one fractal (plain strings: a Row pickles into its bucket)."""

    oid: int
    cycle_id: str
    persona: str
    status: str
    mission_type: str
    event_type: str
    psm_state: str

    @classmethod
    def of(cls, oid: int, meta: dict[str, Any]) -> Row:
        return cls(oid, *(str(meta.get(f) or "") for f in (*FIELDS, "psm_state")))


def key_of(meta: dict[str, Any], event_id: str) -> Key:
    return (str(meta.get("timestamp") or ""), event_id)


class HistoryIndex(persistent.Persistent):
    def __init__(self) -> None:
        self.events = OOBTree()
        for field in FIELDS:
            setattr(self, f"by_{field}", OOTreeSet())
        self.cycles = OOBTree()
        self.count = Length(0)

    def field_set(self, field: str) -> OOTreeSet:
        tree: OOTreeSet = getattr(self, f"by_{field}")
        return tree

    # -- writing -------------------------------------------------------------------------------------------

    def add(self, key: Key, row: Row) -> bool:
        """Index one fractal; False if its key is indexed already (idempotent)."""
        if key in self.events:
            return False
        self.events[key] = row
        for field in FIELDS:
            value = getattr(row, field)
            if value:
                self.field_set(field).insert((value, *key))
        if row.cycle_id:
            before = self.cycles.get(row.cycle_id, Outcome())
            after = before.add(key, row.event_type, row.psm_state, row.status)
            if after != before:  # most events change nothing: no write, no conflict with a concurrent writer
                self.cycles[row.cycle_id] = after
        self.count.change(1)
        return True

    def clear(self) -> None:
        self.events.clear()
        for field in FIELDS:
            self.field_set(field).clear()
        self.cycles.clear()
        self.count.set(0)

    def rebuild(self, fractals: Iterable[Any]) -> int:
        """Empty the indexes and index ``fractals`` (every stored ContextFractal) again; how many."""
        self.clear()
        for f in fractals:
            self.add(*entry_of(f))
        return self.count()

    # -- reading -------------------------------------------------------------------------------------------

    def outcome(self, cycle_id: str) -> str:
        return self.cycles.get(cycle_id, Outcome()).status

    def matching(self, q: QueryFractals, after: Key | None) -> Iterator[tuple[Key, Row]]:
        """(key, row) of every indexed fractal matching ``q``, in (timestamp, event id) order (``newest_first``:
        the reverse), after the cursor ``after``. A newest-first walk reads the index's buckets in the range, not
        the fractals: a reader that stops early (ALFRED's audit) loads only what it reads."""
        wanted = {f: getattr(q, f) for f in FIELDS if getattr(q, f) is not None}
        driver = next((f for f in DRIVERS if f in wanted), None)
        types = set(q.event_types) if q.event_types is not None else None
        for key in self._keys(driver, wanted[driver] if driver is not None else None, q, after):
            row = self.events.get(key)
            if row is None:  # cannot happen in a consistent index (verify checks it); never a crash
                continue
            if any(getattr(row, f) != v for f, v in wanted.items()):
                continue
            if types is not None and row.event_type not in types:
                continue
            if q.cycle_status is not None and self.outcome(row.cycle_id) != q.cycle_status:
                continue
            yield key, row

    def _keys(self, driver: str | None, value: str | None, q: QueryFractals, after: Key | None) -> Iterator[Key]:
        lo: tuple[str, ...] | None = (q.since,) if q.since else None
        hi: tuple[str, ...] | None = (q.until + TOP,) if q.until else None
        exclude_lo = exclude_hi = False
        if after is not None and q.newest_first and (hi is None or after < hi):
            hi, exclude_hi = after, True  # the page after a cursor is older than it
        elif after is not None and not q.newest_first and (lo is None or after >= lo):
            lo, exclude_lo = after, True
        if driver is None:
            keys = self.events.keys(min=lo, max=hi, excludemin=exclude_lo, excludemax=exclude_hi)
            yield from reversed(keys) if q.newest_first else keys
            return
        assert value is not None
        tree = self.field_set(driver)
        found = tree.keys(min=(value, *(lo or ())), max=(value, *(hi or (TOP,))), excludemin=exclude_lo,
                          excludemax=exclude_hi)
        for _, ts, event_id in reversed(found) if q.newest_first else found:
            yield ts, event_id


def entry_of(fractal: Any) -> tuple[Key, Row]:
    """A stored ContextFractal's key and row, from its own slots."""
    meta = fractal.get_slot("meta") or {}
    return key_of(meta, fractal.get_slot("event_id")), Row.of(int.from_bytes(fractal._p_oid, "big"), meta)


def ensure(mem: Any) -> HistoryIndex:
    """``mem.history``, built from the stored fractals if this image predates it (once: it is committed)."""
    hx: HistoryIndex | None = getattr(mem, "history", None)
    if hx is None:
        hx = HistoryIndex()
        hx.rebuild(mem.fractals_by_event.values())
        mem.history = hx
    return hx


# -- verify --------------------------------------------------------------------------------------------------


def problems(hx: HistoryIndex, fractals: Iterable[Any]) -> list[str]:
    """What differs between the indexes and ``fractals`` (every stored ContextFractal); empty when they agree."""
    out: list[str] = []
    expected = dict(entry_of(f) for f in fractals)
    have = dict(hx.events.items())
    missing = expected.keys() - have.keys()
    extra = have.keys() - expected.keys()
    wrong = [k for k in expected.keys() & have.keys() if expected[k] != have[k]]
    for what, keys in (("not indexed", missing), ("indexed but not stored", extra), ("indexed wrongly", wrong)):
        if keys:
            out.append(f"{len(keys)} fractal(s) {what}, e.g. {sorted(keys)[0]!r}")
    for field in FIELDS:
        want = {(getattr(row, field), *k) for k, row in expected.items() if getattr(row, field)}
        got = set(hx.field_set(field).keys())
        if want != got:
            out.append(f"by_{field}: {len(want - got)} entries missing, {len(got - want)} stale")
    outcomes: dict[str, Outcome] = {}
    for k, row in sorted(expected.items()):
        if row.cycle_id:
            outcomes[row.cycle_id] = outcomes.get(row.cycle_id, Outcome()).add(k, row.event_type, row.psm_state,
                                                                            row.status)
    if {c: o for c, o in outcomes.items() if o != Outcome()} != dict(hx.cycles.items()):
        out.append("cycles: the outcomes held differ from the fractals' events")
    if hx.count() != len(expected):
        out.append(f"count says {hx.count()}, {len(expected)} fractals are stored")
    return out
