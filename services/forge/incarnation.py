"""``_incarnate_lora_experts``: a forged adapter becomes a LoRA expert in the Living Image (blueprint §5.3).

At forge-worker start, every adapter directory under ``var/lora_adapters/`` that has not been incarnated is:

1. judged by its ``metrics.json`` (written by :mod:`services.forge.evaluation` on the held-out split): it is
   activated for its persona only if its eval loss is lower than the best of the base model and the adapter
   active when it was forged (a tie, within :data:`LOSS_TIE`, goes to the better format validity); otherwise
   the previous adapter stays active (rollback = never switching);
2. activated through the llm service's adapter manager when chosen;
3. stored in ZODB as a blob (a tar of the directory, through memory's ``blob_put``) with its training-data ids,
   dataset hash, metrics and the decision;
4. recorded: an audit event (Table 3, ``ADAPTER_INCARNATION``) and ``incarnation.json`` in the directory.

Steps 3 and 4 need other services (memory, kernel), which may start after us: what fails is retried later
(``incarnation.json`` says what is still owed), and never holds back the decision or the llm service.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger("batos.forge.incarnation")

MARKER = "incarnation.json"
LOSS_TIE = 1e-3  # eval losses closer than this are a tie (noise on a handful of held-out examples)
MISSION_TYPE = "fineTuneNewLoRA_"
EVENT_TYPE = "ADAPTER_INCARNATION"

ACTIVATED = "activated"
KEPT_PREVIOUS = "kept_previous"
ACTIVATION_FAILED = "activation_failed"


@dataclass
class Deps:
    """What incarnation needs from the rest of the system (injected: tests pass fakes)."""

    active: Callable[[str], dict[str, Any] | None]  # persona -> {path, meta} of its active adapter, or None
    activate: Callable[[str, str, dict[str, Any]], Awaitable[Any]]  # (persona, path, meta)
    blob_put: Callable[[bytes, dict[str, Any]], Awaitable[str]]  # (data, meta) -> oid
    record: Callable[[dict[str, Any]], Awaitable[None]]  # one Table 3 event
    # (instruction id, decision) -> None: tells whoever follows the forge run (the steward's log) the outcome
    notify: Callable[[str, dict[str, Any]], None] | None = None


# -- pure parts --------------------------------------------------------------------------------------


def decide(metrics: dict[str, Any] | None) -> tuple[bool, str]:
    """(activate?, why) from an evaluation's metrics."""
    if not metrics:
        return False, "no metrics.json: the adapter was never evaluated"
    cand = metrics.get("adapter") or {}
    loss = cand.get("eval_loss")
    if loss is None:
        return False, "no held-out eval loss (empty held-out split)"
    refs = [("base", metrics.get("base") or {})]
    if metrics.get("previous"):
        refs.append(("previous adapter", metrics["previous"]))
    refs = [(name, m) for name, m in refs if m.get("eval_loss") is not None]
    if not refs:
        return True, f"eval loss {loss:.4f}; no reference to compare with"
    name, best = min(refs, key=lambda r: r[1]["eval_loss"])
    ref = best["eval_loss"]
    if loss < ref - LOSS_TIE:
        return True, f"eval loss {loss:.4f} < {name} {ref:.4f}"
    if loss > ref + LOSS_TIE:
        return False, f"eval loss {loss:.4f} > {name} {ref:.4f}"
    fv, ref_fv = cand.get("format_valid"), best.get("format_valid")
    if fv is not None and ref_fv is not None and fv > ref_fv:
        return True, f"eval loss tie with {name} ({loss:.4f} vs {ref:.4f}); format validity {fv:.2f} > {ref_fv:.2f}"
    return False, f"eval loss tie with {name} ({loss:.4f} vs {ref:.4f}) and no better format validity"


def pending_dirs(lora_dir: Path) -> list[Path]:
    """Adapter directories not fully incarnated yet, oldest first (names end in a sortable timestamp)."""
    if not lora_dir.is_dir():
        return []
    out = []
    for d in sorted(p for p in lora_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not (d / "adapter_config.json").is_file():
            continue
        marker = read_json(d / MARKER)
        if marker is None or marker.get("blob_oid") is None or not marker.get("audited"):
            out.append(d)
    return out


def persona_of(adapter_dir: Path, meta: dict[str, Any]) -> str:
    return str(meta.get("persona") or adapter_dir.name.split("_", 1)[0]).upper()


def tar_dir(adapter_dir: Path) -> bytes:
    """The adapter directory as an uncompressed tar (safetensors do not compress); the marker excluded."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path in sorted(adapter_dir.rglob("*")):
            if path.is_file() and path.name != MARKER and not path.name.startswith("."):
                tar.add(path, arcname=str(path.relative_to(adapter_dir)))
    return buf.getvalue()


def untar(data: bytes, target: Path) -> Path:
    """Restore an adapter from its blob (after the directory was lost); refuses paths that leave ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        tar.extractall(target, filter="data")
    return target


def brief_metrics(metrics: dict[str, Any] | None) -> dict[str, Any]:
    if not metrics:
        return {}
    pick = lambda m: {k: (m or {}).get(k) for k in ("eval_loss", "format_valid")} if m else None
    return {"base": pick(metrics.get("base")), "previous": pick(metrics.get("previous")),
            "adapter": pick(metrics.get("adapter")), "eval_examples": metrics.get("eval_examples"),
            "format_kind": metrics.get("format_kind")}


def audit_event(persona: str, adapter_dir: Path, marker: dict[str, Any], cycle_id: str | None) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "cycle_id": cycle_id or str(uuid.uuid4()),
        "timestamp": datetime.now(UTC).isoformat(),
        "psm_state": "COMPLETE",
        "active_persona": "ALFRED",
        "event_type": EVENT_TYPE,
        "mission_type": MISSION_TYPE,
        "status": "FAILURE" if marker["decision"] == ACTIVATION_FAILED else "SUCCESS",
        "event_data": {"persona": persona, "adapter_dir": str(adapter_dir), "decision": marker["decision"],
                       "reason": marker["reason"], "blob_oid": marker.get("blob_oid"),
                       "previous_adapter": marker.get("previous_adapter"), "metrics": marker.get("metrics")},
    }


# -- the protocol ------------------------------------------------------------------------------------


async def incarnate_one(adapter_dir: Path, deps: Deps) -> dict[str, Any]:
    """Decide/activate once (the marker remembers), then settle what is still owed: blob, audit event."""
    marker = read_json(adapter_dir / MARKER)
    meta = read_json(adapter_dir / "training_meta.json") or {}
    metrics = read_json(adapter_dir / "metrics.json")
    persona = persona_of(adapter_dir, meta)
    if marker is None:
        previous = deps.active(persona)
        chosen, reason = decide(metrics)
        marker = {"persona": persona, "decision": ACTIVATED if chosen else KEPT_PREVIOUS, "reason": reason,
                  "previous_adapter": (previous or {}).get("path"), "metrics": brief_metrics(metrics),
                  "decided_at": datetime.now(UTC).isoformat(), "blob_oid": None, "audited": False}
        if chosen:
            try:
                await deps.activate(persona, str(adapter_dir), {"metrics": marker["metrics"], "reason": reason,
                                                                "dataset_sha256": meta.get("dataset_sha256")})
            except Exception as e:  # a corrupt adapter: the previous one stays in service
                marker.update(decision=ACTIVATION_FAILED, reason=f"{reason}; activation failed: {e}")
        write_json(adapter_dir / MARKER, marker)
        log.info("adapter %s for %s: %s (%s)", adapter_dir.name, persona, marker["decision"], marker["reason"])
        if deps.notify is not None and meta.get("instruction_id"):
            deps.notify(str(meta["instruction_id"]), {"persona": persona, "adapter_dir": str(adapter_dir),
                                                      "decision": marker["decision"], "reason": marker["reason"],
                                                      "metrics": marker["metrics"]})
    if marker.get("blob_oid") is None:
        try:
            blob_meta = {"kind": "lora_adapter", "persona": persona, "name": adapter_dir.name,
                         "path": str(adapter_dir), "decision": marker["decision"], "reason": marker["reason"],
                         "metrics": marker["metrics"], "dataset_sha256": meta.get("dataset_sha256"),
                         "train_ids": meta.get("train_ids", []), "eval_ids": meta.get("eval_ids", []),
                         "base_model": meta.get("base_model"), "lora": meta.get("lora"),
                         "training": meta.get("training")}
            marker["blob_oid"] = await deps.blob_put(tar_dir(adapter_dir), blob_meta)
            write_json(adapter_dir / MARKER, marker)
        except Exception as e:
            log.warning("adapter %s: blob not stored yet (%s); retried later", adapter_dir.name, e)
    if marker.get("blob_oid") is not None and not marker.get("audited"):
        # Audited after the blob so the event can name it; a retry may record the event twice (at least once).
        try:
            await deps.record(audit_event(persona, adapter_dir, marker, meta.get("cycle_id")))
            marker["audited"] = True
            write_json(adapter_dir / MARKER, marker)
        except Exception as e:
            log.warning("adapter %s: audit event not recorded yet (%s); retried later", adapter_dir.name, e)
    return {"name": adapter_dir.name, **marker}


async def incarnate_lora_experts(lora_dir: Path, deps: Deps) -> list[dict[str, Any]]:
    """Every pending adapter, oldest first (so the newest decision for a persona is the last one taken)."""
    return [await incarnate_one(d, deps) for d in pending_dirs(lora_dir)]


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
    os.replace(tmp, path)
