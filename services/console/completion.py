"""Tab completion: command names, personas, paths, and the OIDs, cycle ids and selectors the
console has recently seen in events and replies."""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Any

from prompt_toolkit.completion import CompleteEvent, Completer, Completion, PathCompleter
from prompt_toolkit.document import Document

# How many recent values of each kind are offered; older ones fall off.
RECENT_LIMIT = 64
_HEX = re.compile(r"^[0-9a-fA-F]+$")
_CYCLE = re.compile(r"^[0-9a-fA-F-]{8,64}$")
_SLOT_OID = re.compile(r"\boid=(?:0x)?([0-9a-fA-F]+)\b")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
OID_KEYS = {"oid", "oids", "summary_oid", "child_oids", "parents", "target_oid", "retrieved_chunk_ids"}


class _Ring:
    """Most recent first, unique, bounded."""

    def __init__(self, limit: int = RECENT_LIMIT):
        self.limit = limit
        self._items: OrderedDict[str, None] = OrderedDict()

    def add(self, value: str) -> None:
        self._items.pop(value, None)
        self._items[value] = None
        while len(self._items) > self.limit:
            self._items.popitem(last=False)

    def __iter__(self) -> Iterator[str]:
        return iter(reversed(self._items))

    def __len__(self) -> int:
        return len(self._items)


class Recent:
    """What the console has seen: fed every event and reply body."""

    def __init__(self, limit: int = RECENT_LIMIT):
        self.oids = _Ring(limit)
        self.cycles = _Ring(limit)
        self.selectors = _Ring(limit)
        self.activities = _Ring(limit)  # what `watch` shows (ingests, forge runs ...), as it names them

    def observe(self, body: Any, _depth: int = 0) -> None:
        if _depth > 6:  # bodies are shallow; this bounds the walk on odd ones
            return
        if isinstance(body, dict):
            for key, value in body.items():
                if key in OID_KEYS:
                    for v in value if isinstance(value, list) else [value]:
                        if isinstance(v, str | int) and _HEX.match(str(v)):
                            self.oids.add(str(v).lower())
                elif key == "cycle_id" and isinstance(value, str) and _CYCLE.match(value):
                    self.cycles.add(value)
                elif key == "activity" and isinstance(value, str) and _CYCLE.match(value):
                    self.activities.add(value)
                elif key == "slots" and isinstance(value, dict):
                    # inspect renders persistent slot values as "<Type oid=1f>": offer those OIDs too
                    for v in value.values():
                        for oid in _SLOT_OID.findall(v) if isinstance(v, str) else []:
                            self.oids.add(oid.lower())
                elif key == "methods" and isinstance(value, list):
                    for m in value:
                        name = m.get("selector", m.get("name")) if isinstance(m, dict) else m
                        if isinstance(name, str) and _IDENT.match(name):
                            self.selectors.add(name)
                if isinstance(value, dict | list):
                    self.observe(value, _depth + 1)
        elif isinstance(body, list):
            for item in body[:500]:
                self.observe(item, _depth + 1)


class ConsoleCompleter(Completer):
    def __init__(self, recent: Recent, commands: Iterable[str], personas: Iterable[str]):
        self.recent = recent
        self.commands = sorted(commands)
        self.personas = tuple(personas)
        self.paths = PathCompleter(expanduser=True)

    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterator[Completion]:
        text = document.text_before_cursor
        words = text.split()
        if text.lstrip().startswith("{"):
            return
        # index of the word being completed (a trailing space starts a new, empty one)
        index = len(words) - 1 if words and not text[-1:].isspace() else len(words)
        current = words[index] if index < len(words) else ""
        if index == 0:
            yield from _matching(self.commands, current)
            return
        command = words[0].lower()
        if command == "ingest" and index == 1:
            sub = Document(current, len(current))
            yield from self.paths.get_completions(sub, complete_event)
        elif command == "forge" and index == 1:
            yield from _matching(self.personas, current.upper(), len(current))
        elif command in ("inspect", "send", "define") and index == 1:
            yield from _matching(["0", *self.recent.oids], current.lower(), len(current))
        elif command in ("send", "define") and index == 2:
            yield from _matching(list(self.recent.selectors), current)
        elif command == "trace" and index == 1:
            yield from _matching(list(self.recent.cycles), current.lower(), len(current))
        elif command == "watch" and index == 1:
            yield from _matching([*self.recent.cycles, *self.recent.activities], current.lower(), len(current))
        elif command == "help" and index == 1:
            yield from _matching(self.commands, current)


def _matching(options: Iterable[str], prefix: str, replace: int | None = None) -> Iterator[Completion]:
    seen: set[str] = set()
    for opt in options:
        if opt.startswith(prefix) and opt not in seen:
            seen.add(opt)
            yield Completion(opt, start_position=-(len(prefix) if replace is None else replace))
