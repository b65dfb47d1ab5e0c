"""Tab completion: commands, personas, recently seen OIDs, cycle ids and selectors, paths."""

from __future__ import annotations

from pathlib import Path

from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document

from batos.personas import PERSONAS
from services.console.commands import COMMAND_NAMES
from services.console.completion import ConsoleCompleter, Recent


def complete(completer: ConsoleCompleter, text: str) -> list[str]:
    doc = Document(text, len(text))
    return [c.text for c in completer.get_completions(doc, CompleteEvent(completion_requested=True))]


def test_recent_collects_oids_cycles_and_selectors():
    recent = Recent(limit=3)
    recent.observe({"hits": [{"oid": "a1", "summary_oid": "b2", "child_oids": ["c3", "d4"]}],
                    "cycle_id": "0123456789abcdef", "methods": [{"selector": "area"}, "describe", "not valid!"],
                    "oid": "not-hex"})
    assert list(recent.oids) == ["d4", "c3", "b2"]  # bounded, most recent first
    assert list(recent.cycles) == ["0123456789abcdef"]
    assert list(recent.selectors) == ["describe", "area"]
    recent.observe({"oid": "c3"})
    recent.observe({"slots": {"prototypes": "<PersistentMapping oid=1>", "name": "'oid=zz'"}})
    assert next(iter(recent.oids)) == "1"
    recent.observe({"oid": "c3"})
    assert next(iter(recent.oids)) == "c3"


def test_completions():
    recent = Recent()
    recent.observe({"oids": ["1f", "2a"], "cycle_id": "feedfacefeedface", "methods": ["area"]})
    comp = ConsoleCompleter(recent, COMMAND_NAMES, PERSONAS)
    assert complete(comp, "in") == ["ingest", "inspect"]
    assert complete(comp, "forge b") == ["BABS", "BRICK"]
    assert complete(comp, "inspect ") == ["0", "2a", "1f"]
    assert complete(comp, "send 1") == ["1f"]
    assert complete(comp, "send 1f a") == ["area"]
    assert complete(comp, "trace f") == ["feedfacefeedface"]
    recent.observe({"event": "begin", "activity": "fa11ed0123456789", "command": "ingest"})
    assert complete(comp, "watch f") == ["feedfacefeedface", "fa11ed0123456789"]
    assert complete(comp, "trace fa") == []  # an activity is not a cycle
    assert "watch" in complete(comp, "wa")
    assert complete(comp, "help se") == ["search", "send"]
    assert complete(comp, "ask anything ") == []
    assert complete(comp, '{"command"') == []


def test_path_completion_for_ingest(tmp_path: Path, monkeypatch):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text("")
    monkeypatch.chdir(tmp_path)
    comp = ConsoleCompleter(Recent(), COMMAND_NAMES, PERSONAS)
    assert complete(comp, "ingest pk") == ["g"]
    assert complete(comp, "ingest pkg/m") == ["od.py"]
