"""_incarnate_lora_experts: decide on metrics, activate or keep the previous adapter, blob it, audit it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batos.audit import AuditEvent
from services.forge import incarnation
from services.forge.incarnation import ACTIVATED, ACTIVATION_FAILED, KEPT_PREVIOUS, Deps, decide


def metrics(adapter, base, previous=None, fv=(None, None, None)):
    m = {"eval_examples": 3, "format_kind": "python",
         "base": {"eval_loss": base, "format_valid": fv[0]},
         "adapter": {"eval_loss": adapter, "format_valid": fv[2]}, "previous": None}
    if previous is not None:
        m["previous"] = {"eval_loss": previous, "format_valid": fv[1], "path": "/prev"}
    return m


@pytest.mark.parametrize("m, activate, why", [
    (metrics(1.0, 1.2), True, "< base"),
    (metrics(1.3, 1.2), False, "> base"),
    (metrics(1.0, 1.2, previous=0.9), False, "> previous adapter"),  # must beat the active adapter too
    (metrics(0.8, 1.2, previous=0.9), True, "< previous adapter"),
    (metrics(1.0, 1.0004, fv=(0.25, None, 0.5)), True, "format validity 0.50 > 0.25"),
    (metrics(1.0, 1.0004, fv=(0.5, None, 0.5)), False, "no better format validity"),
    (metrics(1.0, 1.0004), False, "tie"),
    (metrics(None, 1.0), False, "no held-out"),
    (None, False, "never evaluated"),
])
def test_decide(m, activate, why):
    chosen, reason = decide(m)
    assert chosen is activate and why in reason


class FakeSystem:
    def __init__(self, active=None, fail_activate=False, fail_blob=0, fail_record=0):
        self.active_adapters = dict(active or {})
        self.fail_activate = fail_activate
        self.fail_blob = fail_blob
        self.fail_record = fail_record
        self.blobs: list[tuple[bytes, dict]] = []
        self.events: list[dict] = []
        self.notes: list[tuple[str, dict]] = []

    def deps(self) -> Deps:
        async def activate(persona, path, meta):
            if self.fail_activate:
                raise RuntimeError("cannot load adapter: size mismatch")
            self.active_adapters[persona] = {"path": path, "meta": meta}

        async def blob_put(data, meta):
            if self.fail_blob:
                self.fail_blob -= 1
                raise ConnectionError("memory unavailable")
            self.blobs.append((data, meta))
            return f"{len(self.blobs):x}"

        async def record(event):
            if self.fail_record:
                self.fail_record -= 1
                raise ConnectionError("kernel unavailable")
            AuditEvent.model_validate(event)  # a valid Table 3 event
            self.events.append(event)

        return Deps(active=self.active_adapters.get, activate=activate, blob_put=blob_put, record=record,
                    notify=lambda ident, outcome: self.notes.append((ident, outcome)))


def make_adapter(lora_dir: Path, name: str, m: dict | None, persona="BRICK", **meta) -> Path:
    d = lora_dir / name
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text('{"r": 16}')
    (d / "adapter_model.safetensors").write_bytes(b"\0" * 1024)
    (d / "training_meta.json").write_text(json.dumps({"persona": persona, "dataset_sha256": "abc",
                                                      "train_ids": ["e1", "e2"], "eval_ids": ["e3"], **meta}))
    if m is not None:
        (d / "metrics.json").write_text(json.dumps(m))
    return d


async def test_better_adapter_is_activated_stored_and_audited(tmp_path):
    system = FakeSystem(active={"BRICK": {"path": "/old"}})
    lora = tmp_path / "lora"
    d = make_adapter(lora, "brick_20250901T120000Z", metrics(0.8, 1.2, previous=0.9), instruction_id="i1",
                     cycle_id="2a1f8a0e-8a53-4a55-9b43-1c7f1c3c8f11")
    (report,) = await incarnation.incarnate_lora_experts(lora, system.deps())
    assert report["decision"] == ACTIVATED and report["previous_adapter"] == "/old"
    assert system.active_adapters["BRICK"]["path"] == str(d)
    data, meta = system.blobs[0]
    assert meta["kind"] == "lora_adapter" and meta["train_ids"] == ["e1", "e2"] and meta["dataset_sha256"] == "abc"
    assert meta["metrics"]["adapter"]["eval_loss"] == 0.8 and meta["decision"] == ACTIVATED
    (event,) = system.events
    assert event["event_type"] == "ADAPTER_INCARNATION" and event["event_data"]["blob_oid"] == "1"
    assert event["cycle_id"] == "2a1f8a0e-8a53-4a55-9b43-1c7f1c3c8f11"  # joins the forge's cycle
    assert system.notes == [("i1", {"persona": "BRICK", "adapter_dir": str(d), "decision": ACTIVATED,
                                    "reason": report["reason"], "metrics": report["metrics"]})]
    marker = json.loads((d / incarnation.MARKER).read_text())
    assert marker["blob_oid"] == "1" and marker["audited"] is True
    # The tar restores the directory byte for byte (without the marker).
    restored = incarnation.untar(data, tmp_path / "restored")
    assert sorted(p.name for p in restored.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                          "metrics.json", "training_meta.json"]
    assert (restored / "adapter_model.safetensors").read_bytes() == b"\0" * 1024
    # Nothing is left to do: a second pass (the next start) touches nothing.
    assert await incarnation.incarnate_lora_experts(lora, system.deps()) == []
    assert len(system.blobs) == 1


async def test_worse_adapter_keeps_previous_but_is_stored(tmp_path):
    system = FakeSystem(active={"ROBIN": {"path": "/good"}})
    make_adapter(tmp_path, "robin_20250901T120000Z", metrics(1.5, 1.2), persona="ROBIN")
    (report,) = await incarnation.incarnate_lora_experts(tmp_path, system.deps())
    assert report["decision"] == KEPT_PREVIOUS and system.active_adapters["ROBIN"] == {"path": "/good"}
    assert system.blobs[0][1]["decision"] == KEPT_PREVIOUS
    assert system.events[0]["event_data"]["decision"] == KEPT_PREVIOUS and system.events[0]["status"] == "SUCCESS"


async def test_activation_failure_is_recorded(tmp_path):
    system = FakeSystem(fail_activate=True)
    make_adapter(tmp_path, "brick_20250901T120000Z", metrics(0.5, 1.2))
    (report,) = await incarnation.incarnate_lora_experts(tmp_path, system.deps())
    assert report["decision"] == ACTIVATION_FAILED and "size mismatch" in report["reason"]
    assert system.events[0]["status"] == "FAILURE" and "BRICK" not in system.active_adapters


async def test_unavailable_memory_and_kernel_are_retried_without_deciding_again(tmp_path):
    system = FakeSystem(fail_blob=1, fail_record=1)
    d = make_adapter(tmp_path, "brick_20250901T120000Z", metrics(0.5, 1.2))
    (first,) = await incarnation.incarnate_lora_experts(tmp_path, system.deps())
    assert first["decision"] == ACTIVATED and first["blob_oid"] is None and not system.events
    assert incarnation.pending_dirs(tmp_path) == [d]
    system.active_adapters.clear()  # if it decided again it would re-activate: it must not
    (second,) = await incarnation.incarnate_lora_experts(tmp_path, system.deps())
    assert second["blob_oid"] == "1" and second["audited"] is False  # the kernel failed once more
    (third,) = await incarnation.incarnate_lora_experts(tmp_path, system.deps())
    assert third["audited"] is True and len(system.blobs) == 1 and len(system.events) == 1
    assert system.active_adapters == {} and incarnation.pending_dirs(tmp_path) == []


async def test_scan_skips_non_adapters_and_orders_by_name(tmp_path):
    (tmp_path / "llm_adapters.json").write_text("{}")  # the llm service's registry lives here too
    (tmp_path / "half_written").mkdir()  # no adapter_config.json
    system = FakeSystem()
    make_adapter(tmp_path, "brick_20250902T000000Z", metrics(0.7, 1.2))
    make_adapter(tmp_path, "brick_20250901T000000Z", metrics(0.9, 1.2))
    make_adapter(tmp_path, "babs_20250903T000000Z", None, persona="")  # persona from the name; no metrics
    reports = await incarnation.incarnate_lora_experts(tmp_path, system.deps())
    assert [r["name"] for r in reports] == ["babs_20250903T000000Z", "brick_20250901T000000Z",
                                            "brick_20250902T000000Z"]
    assert reports[0]["persona"] == "BABS" and reports[0]["decision"] == KEPT_PREVIOUS
    # Oldest first, so the newest good adapter is the one left active.
    assert system.active_adapters["BRICK"]["path"].endswith("brick_20250902T000000Z")


def test_untar_refuses_escaping_paths(tmp_path):
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("../evil.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(tarfile.TarError):
        incarnation.untar(buf.getvalue(), tmp_path / "t")
    assert not (tmp_path / "evil.txt").exists()
