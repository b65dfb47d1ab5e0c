"""How a cognitive cycle ended, from its audit events (Table 3): one rule for BABS's curation and memory's index.

The outcome is the status of the latest event that entered a terminal PSM state (a STATE_TRANSITION is logged in
the state it enters; entering FAILED is a FAILURE whatever the event's status says), else the status of its
latest event with a terminal status, else "" (still running, or its end is not in the log yet).

:class:`Outcome` folds events in one at a time, in any order, and keeps only two (key, status) pairs, so memory
maintains it per cycle as fractals arrive (services/memory_weaver/history_index.py); :meth:`Outcome.of` folds a
whole cycle's events at once (BABS's curation, services/forge/curation.py). Both order events by the same key:
the UTC fixed-width timestamp (:func:`event_key`), then the event id.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, NamedTuple

from batos.audit import Status, normalized_timestamp

# Table 3's statuses that say how something ended (IN_PROGRESS does not); SUCCESS_DEGRADED (an answer produced
# with a fallback) is an ending but not a golden path.
TERMINAL_STATUSES = frozenset(s.value for s in Status) - {Status.IN_PROGRESS.value}
TERMINAL_PSM_STATES = frozenset({"COMPLETE", "FAILED"})  # services/kernel/psm.py's end states
NO_KEY: tuple[str, str] = ("", "")


def ending(event_type: str | None, psm_state: str | None, status: str | None) -> tuple[str | None, str | None]:
    """(status if the event entered a terminal state, status if the event has a terminal status), read as the
    audit log writes them (a STATE_TRANSITION's ``psm_state`` is the state it entered: AuditEvent.transition)."""
    entered = None
    if event_type == "STATE_TRANSITION" and psm_state in TERMINAL_PSM_STATES:
        entered = Status.FAILURE.value if psm_state == "FAILED" else (status or "")
    return entered, (status if status in TERMINAL_STATUSES else None)


def event_key(timestamp: str | datetime | None, event_id: str | None) -> tuple[str, str]:
    """An event's place in time: (its timestamp as batos.audit.normalized_timestamp writes it, its event id).

    Table 3 timestamps are RFC 3339 with any UTC offset and 0-6 fraction digits, which do not sort as text
    (``10:00:00Z`` after ``10:00:00.5Z``); memory's index stores them normalized, and a raw one is normalized here
    the same way. One that does not parse (not written by batos.audit) keeps its text."""
    when = timestamp
    if isinstance(timestamp, str):
        with contextlib.suppress(ValueError):
            when = datetime.fromisoformat(timestamp)
    if isinstance(when, datetime) and when.tzinfo is not None:
        return normalized_timestamp(when), event_id or ""
    return str(timestamp or ""), event_id or ""


class Outcome(NamedTuple):
    """The latest terminal transition and the latest terminal status of one cycle, by (timestamp, event id)."""

    end_key: tuple[str, str] = NO_KEY
    end_status: str = ""
    last_key: tuple[str, str] = NO_KEY
    last_status: str = ""

    def add(self, key: tuple[str, str], event_type: str | None, psm_state: str | None, status: str | None
            ) -> Outcome:
        entered, terminal = ending(event_type, psm_state, status)
        out = self
        if entered is not None and key >= out.end_key:
            out = out._replace(end_key=key, end_status=entered)
        if terminal is not None and key >= out.last_key:
            out = out._replace(last_key=key, last_status=terminal)
        return out

    @classmethod
    def of(cls, events: Iterable[Mapping[str, Any]]) -> Outcome:
        """The outcome of one cycle's Table 3 events (dicts as logged), in any order."""
        out = cls()
        for e in events:
            out = out.add(event_key(e.get("timestamp"), e.get("event_id")), e.get("event_type"), e.get("psm_state"),
                          e.get("status"))
        return out

    @property
    def status(self) -> str:
        return self.end_status if self.end_key != NO_KEY else self.last_status
