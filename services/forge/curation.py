"""BABS curates "golden path" SFT data from the Fractal Memory (blueprint §5.1).

Input: ContextFractals as the memory service returns them (``{oid, summary, full_json, meta}``), where
``full_json`` is one Table 3 audit event. Events of one cognitive cycle share ``cycle_id``. A golden path is
a cycle that ended in SUCCESS (batos.outcome: the rule memory's index keeps too) and that holds an event by
the requested persona carrying both the inputs that prompted the persona and its validated output:

* ``DNU_OUTCOME`` (BRICK writing a missing method, ``batos.audit.AuditEvent.dnu_outcome``):
  ``event_data.source`` (the validated code), with ``llm_prompt`` and/or ``mission_brief`` as the inputs
  (else the brief is rebuilt from ``selector``/``receiver_oid``/``args``/``kwargs``);
* ``LLM_CALL`` with status SUCCESS: ``llm_prompt`` -> ``llm_response_raw`` (e.g. ROBIN's answers).

Output: conversational JSONL lines ``{"messages": [system?, user, assistant]}`` (the format TRL's
SFTTrainer reads), deduplicated by a hash of the normalized output, capped per mission, split into train
and held-out sets by hash so the split is stable when the history grows.

Everything here is pure (no I/O but :func:`write_dataset`), so it is tested without services.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batos.audit import Status
from batos.outcome import Outcome, event_key

SUCCESS = Status.SUCCESS.value  # how a cycle ended, by batos.outcome's rule; SUCCESS_DEGRADED is not golden
GOLDEN_EVENT_TYPES = ("DNU_OUTCOME", "LLM_CALL")
# The event_data key holding each piece, as the kernel writes it (services/kernel/dnu.py, run.py).
OUTPUT_KEYS = {"DNU_OUTCOME": "source", "LLM_CALL": "llm_response_raw"}
PROMPT_KEY = "llm_prompt"
BRIEF_KEY = "mission_brief"

DEFAULT_CAP_PER_MISSION = 200
DEFAULT_EVAL_PERCENT = 20  # held-out share, by hash bucket
MAX_TEXT_CHARS = 16_000  # a runaway prompt must not blow up a training example


class CurationError(ValueError):
    """The fractals given cannot be curated (malformed event JSON, bad arguments)."""


@dataclass(frozen=True)
class Example:
    """One golden-path example: the chat that prompted the persona and its validated output."""

    messages: tuple[dict[str, str], ...]  # system? + user + assistant
    output_hash: str
    cycle_id: str
    event_id: str
    mission_type: str
    persona: str
    timestamp: str

    def record(self) -> dict[str, Any]:
        return {"messages": [dict(m) for m in self.messages]}


@dataclass
class Curation:
    """The curated split plus what was dropped and why (shown to the Architect as counts)."""

    train: list[Example] = field(default_factory=list)
    eval: list[Example] = field(default_factory=list)
    cycles_seen: int = 0
    cycles_successful: int = 0
    duplicates: int = 0
    capped: int = 0
    unusable: int = 0  # successful cycles with no extractable (inputs, output) pair

    @property
    def examples(self) -> list[Example]:
        return self.train + self.eval

    def counts(self) -> dict[str, int]:
        return {"cycles_seen": self.cycles_seen, "cycles_successful": self.cycles_successful,
                "examples": len(self.examples), "train": len(self.train), "eval": len(self.eval),
                "duplicates": self.duplicates, "capped": self.capped, "unusable": self.unusable}


# -- parsing ------------------------------------------------------------------------------------


def parse_event(fractal: Mapping[str, Any]) -> dict[str, Any]:
    """The Table 3 event inside a fractal (``full_json``), with fractal meta filling missing fields."""
    raw = fractal.get("full_json")
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    if isinstance(raw, str):
        try:
            event = json.loads(raw)
        except json.JSONDecodeError as e:
            raise CurationError(f"fractal {fractal.get('oid', '?')}: full_json is not JSON: {e}") from e
    elif isinstance(raw, Mapping):
        event = dict(raw)
    else:
        raise CurationError(f"fractal {fractal.get('oid', '?')}: no full_json")
    if not isinstance(event, dict):
        raise CurationError(f"fractal {fractal.get('oid', '?')}: full_json is not an object")
    meta = fractal.get("meta") or {}
    for key, meta_key in (("cycle_id", "cycle_id"), ("timestamp", "timestamp"), ("status", "status"),
                          ("event_type", "event_type"), ("psm_state", "psm_state"),
                          ("active_persona", "persona"), ("mission_type", "mission_type")):
        if not event.get(key) and meta.get(meta_key):
            event[key] = meta[meta_key]
    if not isinstance(event.get("event_data"), dict):
        event["event_data"] = {}
    return event


def mission_of(event: Mapping[str, Any]) -> str:
    data = event.get("event_data") or {}
    mission = event.get("mission_type") or data.get("mission_type") or ""
    if not mission:
        brief = _present(data, BRIEF_KEY)
        if isinstance(brief, Mapping):
            mission = str(brief.get("selector") or brief.get("mission") or "")
    return str(mission)


def group_cycles(events: Iterable[Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Events by cycle, each list in time order (batos.outcome.event_key's; ties in log order)."""
    cycles: dict[str, list[dict[str, Any]]] = {}
    for order, event in enumerate(events):
        cycle = str(event.get("cycle_id") or "")
        if cycle:
            cycles.setdefault(cycle, []).append({**event, "_order": order})
    for evs in cycles.values():
        evs.sort(key=lambda e: (event_key(e.get("timestamp"), "")[0], e["_order"]))
    return cycles


# -- extraction ---------------------------------------------------------------------------------


def _present(data: Mapping[str, Any], key: str) -> Any:
    value = data.get(key)
    return None if value in (None, "", [], {}) else value


_RENDERED_TURN = re.compile(r"^\[(system|user|assistant|tool)\] ", re.M)


def _as_messages(prompt: Any) -> list[dict[str, str]] | None:
    """A prompt stored as a chat -> messages; plain text -> None.

    Accepted: a list of {role, content}, its JSON text, or the audit log's rendering of a chat
    (``batos.audit.render_messages``: one ``[role] content`` block per message).
    """
    if isinstance(prompt, str) and prompt.lstrip().startswith("["):
        text = prompt.lstrip()
        try:
            prompt = json.loads(text)
        except json.JSONDecodeError:
            turns = list(_RENDERED_TURN.finditer(text))
            if not turns or turns[0].start() != 0:
                return None
            ends = [m.start() for m in turns[1:]] + [len(text)]
            return [{"role": m.group(1), "content": text[m.end():end].rstrip("\n")[:MAX_TEXT_CHARS]}
                    for m, end in zip(turns, ends, strict=True)]
    if isinstance(prompt, list) and all(isinstance(m, Mapping) and "role" in m and "content" in m for m in prompt):
        return [{"role": str(m["role"]), "content": str(m["content"])[:MAX_TEXT_CHARS]} for m in prompt]
    return None


def render_brief(brief: Any) -> str:
    """A mission brief (Table 1 ``mission_brief`` object or text) as the user's request."""
    if isinstance(brief, Mapping):
        selector = brief.get("selector", "")
        parts = [f"Write the method `{selector}` for object {brief.get('target_oid', '?')}."]
        if brief.get("args") or brief.get("kwargs"):
            parts.append(f"It is called with args={json.dumps(brief.get('args', []))} "
                         f"kwargs={json.dumps(brief.get('kwargs', {}), sort_keys=True)}.")
        if brief.get("intent"):
            parts.append(str(brief["intent"]))
        return " ".join(parts)
    return str(brief)


def normalize_output(text: str) -> str:
    """Whitespace-insensitive form used for deduplication (two answers differing in blanks are one)."""
    return re.sub(r"\s+", " ", text).strip()


def output_hash(text: str) -> str:
    return hashlib.sha256(normalize_output(text).encode("utf-8")).hexdigest()


def extract_example(event: Mapping[str, Any], system_prompt: str | None = None) -> Example | None:
    """The (inputs, validated output) pair an event carries, or None when it carries none."""
    event_type = str(event.get("event_type") or "")
    if event_type not in OUTPUT_KEYS or str(event.get("status") or "").upper() != SUCCESS:
        return None
    data = event.get("event_data") or {}
    output = _present(data, OUTPUT_KEYS[event_type])
    prompt = _present(data, PROMPT_KEY)
    brief = _present(data, BRIEF_KEY)
    if brief is None and event_type == "DNU_OUTCOME" and data.get("selector"):
        brief = {"selector": data["selector"], "target_oid": data.get("receiver_oid", "?"),
                 "args": data.get("args", []), "kwargs": data.get("kwargs", {})}
    if not isinstance(output, str) or not output.strip() or (prompt is None and brief is None):
        return None
    chat = _as_messages(prompt)
    if chat is not None:
        system = next((m["content"] for m in chat if m["role"] == "system"), None)
        users = [m for m in chat if m["role"] == "user"]
        if not users:
            return None
        user = users[-1]["content"]
    else:
        system = None
        user = str(prompt) if prompt is not None else render_brief(brief)
    system = system_prompt if system_prompt is not None else system
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": user[:MAX_TEXT_CHARS]},
                 {"role": "assistant", "content": output[:MAX_TEXT_CHARS]}]
    return Example(messages=tuple(messages), output_hash=output_hash(output),
                   cycle_id=str(event.get("cycle_id") or ""), event_id=str(event.get("event_id") or ""),
                   mission_type=mission_of(event), persona=str(event.get("active_persona") or ""),
                   timestamp=str(event.get("timestamp") or ""))


# -- the curation itself ------------------------------------------------------------------------


def is_held_out(example: Example, eval_percent: int) -> bool:
    """Deterministic split: an output's hash bucket decides, so growing the history never reshuffles."""
    return int(example.output_hash[:8], 16) % 100 < eval_percent


def curate(
    fractals: Iterable[Mapping[str, Any]],
    persona: str,
    mission_type: str | None = None,
    *,
    cap_per_mission: int = DEFAULT_CAP_PER_MISSION,
    eval_percent: int = DEFAULT_EVAL_PERCENT,
    system_prompt: str | None = None,
) -> Curation:
    """Golden-path examples of ``persona`` (optionally of one mission type) from fractals of whole cycles.

    Per successful cycle the LAST golden event of the persona is taken (a retried method counts once, with
    its final validated version). Newest cycles win when a mission exceeds the cap.
    """
    if not persona:
        raise CurationError("persona is required")
    if cap_per_mission < 1 or not 0 <= eval_percent < 100:
        raise CurationError("cap_per_mission must be >= 1 and eval_percent within [0, 100)")
    persona = persona.upper()
    out = Curation()
    candidates: list[Example] = []
    for events in group_cycles(parse_event(f) for f in fractals).values():
        out.cycles_seen += 1
        if Outcome.of(events).status != SUCCESS:  # how it ended: the rule memory's index keeps too
            continue
        ours = [e for e in events if str(e.get("active_persona") or "").upper() == persona]
        if mission_type and not any(mission_of(e) == mission_type for e in events):
            continue
        out.cycles_successful += 1
        found = None
        for event in reversed(ours):
            found = extract_example(event, system_prompt)
            if found is not None:
                break
        if found is None:
            out.unusable += 1
            continue
        if mission_type and not found.mission_type:
            found = _with_mission(found, mission_type)
        candidates.append(found)

    candidates.sort(key=lambda ex: ex.timestamp, reverse=True)  # newest first: they win dedup and the cap
    seen: set[str] = set()
    per_mission: dict[str, int] = {}
    kept: list[Example] = []
    for ex in candidates:
        if ex.output_hash in seen:
            out.duplicates += 1
            continue
        seen.add(ex.output_hash)
        if per_mission.get(ex.mission_type, 0) >= cap_per_mission:
            out.capped += 1
            continue
        per_mission[ex.mission_type] = per_mission.get(ex.mission_type, 0) + 1
        kept.append(ex)
    kept.sort(key=lambda ex: ex.output_hash)  # a stable order independent of query order
    out.train = [ex for ex in kept if not is_held_out(ex, eval_percent)]
    out.eval = [ex for ex in kept if is_held_out(ex, eval_percent)]
    if eval_percent and not out.eval and len(out.train) >= 2:
        # Tiny sets can miss every held-out bucket; hold out the first by hash so evaluation has data.
        out.eval.append(out.train.pop(0))
    return out


def _with_mission(ex: Example, mission_type: str) -> Example:
    return Example(ex.messages, ex.output_hash, ex.cycle_id, ex.event_id, mission_type, ex.persona, ex.timestamp)


# -- output ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetFiles:
    train_path: Path
    eval_path: Path
    sha256: str  # of train + eval contents: names the exact data a model was trained on
    train_ids: list[str]
    eval_ids: list[str]

    def describe(self) -> dict[str, Any]:
        return {"train_path": str(self.train_path), "eval_path": str(self.eval_path), "sha256": self.sha256,
                "train": len(self.train_ids), "eval": len(self.eval_ids)}


def to_jsonl(examples: Iterable[Example]) -> str:
    return "".join(json.dumps(ex.record(), ensure_ascii=False, sort_keys=True) + "\n" for ex in examples)


def write_dataset(curation: Curation, out_dir: Path) -> DatasetFiles:
    """Write ``train.jsonl`` and ``eval.jsonl`` (each by write-then-rename, so readers never see halves)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    paths = {}
    for name, examples in (("train", curation.train), ("eval", curation.eval)):
        text = to_jsonl(examples)
        digest.update(text.encode("utf-8"))
        path = out_dir / f"{name}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
        paths[name] = path
    return DatasetFiles(paths["train"], paths["eval"], digest.hexdigest(),
                        [ex.event_id or ex.cycle_id for ex in curation.train],
                        [ex.event_id or ex.cycle_id for ex in curation.eval])
