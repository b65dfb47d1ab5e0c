"""``_incarnate_lora_experts``: a forged adapter becomes a LoRA expert of its persona (blueprint §5.3).

The steward stores every successfully trained and evaluated adapter in the Living Image as a LoRA expert
(services/forge/lora_experts.py: a ZODB Blob through ZEO, undecided). At forge-worker start, every expert
not yet judged is:

1. read back from the image into the worker's own adapter cache (``settings.lora_dir/<name>``);
2. judged by its metrics (written by :mod:`services.forge.evaluation` on the held-out split): it is
   activated for its persona only if its eval loss is lower than the best of the base model and the adapter
   active when it was forged (a tie, within :data:`LOSS_TIE`, goes to the better format validity); otherwise
   the previous adapter stays active (rollback = never switching);
3. activated through the llm service's adapter manager when chosen;
4. decided in the image (the steward, waiting on the same expert, reports the decision to the kernel), then
   recorded as an audit event (Table 3, ``ADAPTER_INCARNATION``) through the kernel, which may start after us:
   what fails is retried later, and never holds back the decision or the llm service.

The image is the source of truth for what is active: an activated expert whose files are missing from the
cache (a new host, a wiped var/) is extracted and activated again (:func:`restore_active`).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from services.forge import lora_experts

log = logging.getLogger("batos.forge.incarnation")

LOSS_TIE = 1e-3  # eval losses closer than this are a tie (noise on a handful of held-out examples)
MISSION_TYPE = "fineTuneNewLoRA_"
EVENT_TYPE = "ADAPTER_INCARNATION"

ACTIVATED = "activated"
KEPT_PREVIOUS = "kept_previous"
ACTIVATION_FAILED = "activation_failed"

ImageRead = Callable[..., Awaitable[Any]]  # Image.read / Image.transact: (fn, *args) -> fn(root, conn, *args)


@dataclass
class Deps:
    """What incarnation needs from the rest of the system (injected: tests pass fakes)."""

    active: Callable[[str], dict[str, Any] | None]  # persona -> {path, meta} of its active adapter, or None
    activate: Callable[[str, str, dict[str, Any]], Awaitable[Any]]  # (persona, path, meta)
    read: ImageRead  # Image.read
    transact: ImageRead  # Image.transact
    record: Callable[[dict[str, Any]], Awaitable[None]]  # one Table 3 event
    cache_dir: Path  # where adapters are unpacked (the forge worker's own)


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


def brief_metrics(metrics: dict[str, Any] | None) -> dict[str, Any]:
    if not metrics:
        return {}

    def pick(m: Any) -> dict[str, Any] | None:
        return {k: m.get(k) for k in ("eval_loss", "format_valid")} if isinstance(m, dict) else None

    return {"base": pick(metrics.get("base")), "previous": pick(metrics.get("previous")),
            "adapter": pick(metrics.get("adapter")), "eval_examples": metrics.get("eval_examples"),
            "format_kind": metrics.get("format_kind")}


def audit_event(persona: str, adapter: str | Path, marker: dict[str, Any], cycle_id: str | None) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "cycle_id": cycle_id or str(uuid.uuid4()),
        "timestamp": datetime.now(UTC).isoformat(),
        "psm_state": "COMPLETE",
        "active_persona": "ALFRED",
        "event_type": EVENT_TYPE,
        "mission_type": MISSION_TYPE,
        "status": "FAILURE" if marker["decision"] == ACTIVATION_FAILED else "SUCCESS",
        "event_data": {"persona": persona, "adapter": str(adapter), "decision": marker["decision"],
                       "reason": marker["reason"], "blob_oid": marker.get("blob_oid"),
                       "previous_adapter": marker.get("previous_adapter"), "metrics": marker.get("metrics")},
    }


# -- the protocol ------------------------------------------------------------------------------------


async def materialize(name: str, deps: Deps) -> Path:
    """The expert's files in the cache, read back from the image unless already there."""
    local = deps.cache_dir / name
    if not (local / "adapter_config.json").is_file():
        await deps.read(lora_experts.extract, name, str(local))
    return local


async def incarnate_one(expert: dict[str, Any], deps: Deps) -> dict[str, Any]:
    """Decide/activate once (the image remembers), then settle what is still owed: the audit event."""
    name = str(expert["name"])
    persona = str(expert.get("persona") or name.split("_", 1)[0]).upper()
    metrics = expert.get("metrics")
    marker = {k: expert.get(k) for k in lora_experts.DECISION_FIELDS}
    marker.update(blob_oid=expert.get("oid"), metrics=brief_metrics(metrics))
    if expert.get("decision") is None:
        previous = deps.active(persona) or {}
        chosen, reason = decide(metrics)
        marker.update(decision=ACTIVATED if chosen else KEPT_PREVIOUS, reason=reason,
                      previous_adapter=(previous.get("meta") or {}).get("expert") or previous.get("path"),
                      decided_at=datetime.now(UTC).isoformat())
        if chosen:
            try:
                local = await materialize(name, deps)
                await deps.activate(persona, str(local), {"expert": name, "metrics": marker["metrics"],
                                                          "reason": reason,
                                                          "dataset_sha256": expert.get("dataset_sha256")})
            except Exception as e:  # a corrupt adapter: the previous one stays in service
                marker.update(decision=ACTIVATION_FAILED, reason=f"{reason}; activation failed: {e}")
        await deps.transact(lora_experts.decide_expert, name, marker)
        log.info("adapter %s for %s: %s (%s)", name, persona, marker["decision"], marker["reason"])
    if not expert.get("audited"):
        # Audited after the decision is stored; a retry may record the event twice (at least once).
        try:
            await deps.record(audit_event(persona, name, marker, expert.get("cycle_id")))
            await deps.transact(lora_experts.mark_audited, name)
            marker["audited"] = True
        except Exception as e:
            log.warning("adapter %s: audit event not recorded yet (%s); retried later", name, e)
    return {"name": name, "persona": persona, **marker}


async def incarnate_lora_experts(deps: Deps) -> list[dict[str, Any]]:
    """Every pending expert, oldest first (so the newest decision for a persona is the last one taken)."""
    return [await incarnate_one(e, deps) for e in await deps.read(lora_experts.pending)]


async def restore_active(deps: Deps) -> dict[str, str]:
    """Each persona's newest activated expert is the one in service: extracted and activated when the worker
    runs another (or none), e.g. after its adapter cache was lost. persona -> outcome."""
    outcome: dict[str, str] = {}
    for persona, expert in (await deps.read(lora_experts.active)).items():
        current = deps.active(persona) or {}
        name = str(expert["name"])
        if (current.get("meta") or {}).get("expert") == name and Path(str(current.get("path"))).is_dir():
            continue
        try:
            local = await materialize(name, deps)
            await deps.activate(persona, str(local), {"expert": name, "reason": expert.get("reason"),
                                                      "metrics": brief_metrics(expert.get("metrics"))})
            outcome[persona] = f"restored {name}"
        except Exception as e:
            log.warning("adapter %s for %s not restored from the image: %s", name, persona, e)
            outcome[persona] = f"failed: {e}"
    return outcome
