"""LoRA experts in the Living Image: ``root["lora_experts"]``, an OOBTree name -> PersistentMapping.

Each expert holds the adapter directory as one ZODB Blob (an uncompressed tar: safetensors do not compress)
and what the incarnation needs: persona, metrics, training metadata, the instruction it came from, and once
the forge worker judged it, the decision. The steward writes it after a successful training run
(:func:`store`); the forge worker reads it back at start (:func:`pending`, :func:`extract`) and records its
decision (:func:`decide_expert`). Only generic persistent types are stored, so any process can load them.

Blobs travel through ZEO (``batos.image`` opens a ClientStorage with a private blob cache): the server
receives a committed blob file in pieces and a reader downloads it in pieces; no message frame carries it.

Every function takes ``(root, conn, ...)``: pass it to ``Image.transact`` / ``Image.read``.
"""

from __future__ import annotations

import io
import tarfile
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from BTrees.OOBTree import OOBTree
from persistent.mapping import PersistentMapping
from ZODB.blob import Blob
from ZODB.utils import u64

ROOT_KEY = "lora_experts"
MARKER = "incarnation.json"  # the forge's local note beside an extracted adapter (never stored)
DECISION_FIELDS = ("decision", "reason", "decided_at", "previous_adapter")


def tar_dir(adapter_dir: Path, out: Path) -> Path:
    """The adapter directory as an uncompressed tar at ``out``; local notes and dot files excluded."""
    with tarfile.open(out, mode="w") as tar:
        for path in sorted(adapter_dir.rglob("*")):
            if path.is_file() and path.name != MARKER and not path.name.startswith("."):
                tar.add(path, arcname=str(path.relative_to(adapter_dir)))
    return out


def untar(fileobj: io.BufferedIOBase | Any, target: Path) -> Path:
    """Restore an adapter from its blob; the ``data`` filter refuses paths that leave ``target`` and links."""
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=fileobj, mode="r") as tar:
        tar.extractall(target, filter="data")
    return target


def _experts(root: Any) -> Any:
    if ROOT_KEY not in root:
        root[ROOT_KEY] = OOBTree()
    return root[ROOT_KEY]


def store(root: Any, conn: Any, name: str, adapter_dir: str, info: dict[str, Any]) -> dict[str, Any]:
    """Write the adapter as a new expert (undecided). Idempotent by name: a stored expert is left as it is."""
    experts = _experts(root)
    if name in experts:
        return summary(experts[name])
    blob = Blob()
    with tempfile.TemporaryDirectory(prefix="lora-tar-") as tmp:
        tarred = tar_dir(Path(adapter_dir), Path(tmp) / "adapter.tar")
        size = tarred.stat().st_size
        # consumeFile moves the file into the blob: no copy in memory, whatever the adapter's size
        blob.consumeFile(str(tarred))
    expert = PersistentMapping({
        "name": name, "blob": blob, "size": size, "stored_at": datetime.now(UTC).isoformat(),
        "decision": None, "reason": None, "decided_at": None, "previous_adapter": None, "audited": False,
        **{k: v for k, v in info.items() if k not in ("blob", "name", "decision", "audited")}})
    conn.add(expert)  # its oid now, so the steward can name it before the commit
    experts[name] = expert
    return summary(expert)


def summary(expert: Any) -> dict[str, Any]:
    """The expert's plain fields (everything but the blob) and its oid in hex (as memory names objects)."""
    out = {k: v for k, v in dict(expert).items() if k != "blob"}
    out["oid"] = format(u64(expert._p_oid), "x") if expert._p_oid is not None else None
    return out


def get(root: Any, conn: Any, name: str) -> dict[str, Any] | None:
    experts = root.get(ROOT_KEY)
    return summary(experts[name]) if experts is not None and name in experts else None


def listing(root: Any, conn: Any) -> list[dict[str, Any]]:
    """Every expert, oldest first (names end in a sortable timestamp, stored_at breaks ties)."""
    experts = root.get(ROOT_KEY)
    if experts is None:
        return []
    return sorted((summary(e) for e in experts.values()), key=lambda e: (str(e.get("stored_at")), e["name"]))


def pending(root: Any, conn: Any) -> list[dict[str, Any]]:
    """Experts not yet judged, or judged but not yet audited, oldest first."""
    return [e for e in listing(root, conn) if e.get("decision") is None or not e.get("audited")]


def extract(root: Any, conn: Any, name: str, target: str) -> str:
    """Unpack the expert's blob into ``target`` (read from ZEO in pieces into the blob cache)."""
    with root[ROOT_KEY][name]["blob"].open("r") as f:
        untar(f, Path(target))
    return target


def decide_expert(root: Any, conn: Any, name: str, decision: dict[str, Any]) -> None:
    """Record the forge worker's decision (once: a second call for a decided expert changes nothing)."""
    expert = root[ROOT_KEY][name]
    if expert.get("decision") is None:
        expert.update({k: decision.get(k) for k in DECISION_FIELDS})


def mark_audited(root: Any, conn: Any, name: str) -> None:
    root[ROOT_KEY][name]["audited"] = True


def active(root: Any, conn: Any) -> dict[str, dict[str, Any]]:
    """persona -> the newest expert the forge activated for it."""
    out: dict[str, dict[str, Any]] = {}
    for expert in listing(root, conn):
        if expert.get("decision") == "activated":
            out[str(expert.get("persona"))] = expert
    return out
