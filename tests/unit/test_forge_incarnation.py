"""_incarnate_lora_experts: LoRA experts stored in a real image (FileStorage + blobs through batos.image) are read
back, judged on their metrics, activated or not (the previous adapter stays), decided in the image, audited."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from ZODB.FileStorage import FileStorage

from batos.audit import AuditEvent
from batos.image import Image
from services.forge import incarnation, lora_experts
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


@pytest.fixture
async def image(tmp_path):
    """The Living Image as the forge and the steward open it, over a local FileStorage with a blob dir."""
    settings = SimpleNamespace(zodb_cache_size=1000, zodb_cache_bytes=0)
    img = Image(settings, storage_factory=lambda: FileStorage(str(tmp_path / "image.fs"),
                                                              blob_dir=str(tmp_path / "blobs")),
                pool_threads=1, do_awaken=False)
    await img.open()
    yield img
    await img.close()


class FakeSystem:
    def __init__(self, image, cache_dir, active=None, fail_activate=False, fail_record=0):
        self.image = image
        self.cache_dir = cache_dir
        self.active_adapters = dict(active or {})
        self.fail_activate = fail_activate
        self.fail_record = fail_record
        self.events: list[dict] = []

    def deps(self) -> Deps:
        async def activate(persona, path, meta):
            if self.fail_activate:
                raise RuntimeError("cannot load adapter: size mismatch")
            self.active_adapters[persona] = {"path": path, "meta": meta}

        async def record(event):
            if self.fail_record:
                self.fail_record -= 1
                raise ConnectionError("kernel unavailable")
            AuditEvent.model_validate(event)  # a valid Table 3 event
            self.events.append(event)

        return Deps(active=self.active_adapters.get, activate=activate, read=self.image.read,
                    transact=self.image.transact, record=record, cache_dir=self.cache_dir)


def make_adapter(root: Path, name: str) -> Path:
    """What a training run leaves: config, weights, its own notes."""
    d = root / name
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text('{"r": 16}')
    (d / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 4096)  # 1 MiB: many ZEO blob chunks
    (d / "training_meta.json").write_text(json.dumps({"dataset_sha256": "abc"}))
    (d / lora_experts.MARKER).write_text("{}")  # a local note: never stored
    return d


async def store(image, tmp_path, name, m, persona="BRICK", **info) -> Path:
    """What the steward does after a good run: the adapter into the image, undecided."""
    d = make_adapter(tmp_path / "trained", name)
    await image.transact(lora_experts.store, name, str(d),
                         {"persona": persona, "metrics": m, "dataset_sha256": "abc", "train_ids": ["e1", "e2"],
                          **info})
    return d


async def test_better_adapter_is_read_back_activated_decided_and_audited(image, tmp_path):
    cache = tmp_path / "cache"
    system = FakeSystem(image, cache, active={"BRICK": {"path": "/old", "meta": {"expert": "brick_old"}}})
    trained = await store(image, tmp_path, "brick_i1", metrics(0.8, 1.2, previous=0.9),
                          cycle_id="2a1f8a0e-8a53-4a55-9b43-1c7f1c3c8f11")
    (report,) = await incarnation.incarnate_lora_experts(system.deps())
    assert report["decision"] == ACTIVATED and report["previous_adapter"] == "brick_old"
    active = system.active_adapters["BRICK"]
    assert active["path"] == str(cache / "brick_i1") and active["meta"]["expert"] == "brick_i1"
    # read back from the image: the same bytes the training run wrote, without its local notes
    local = Path(active["path"])
    assert sorted(p.name for p in local.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                       "training_meta.json"]
    assert (local / "adapter_model.safetensors").read_bytes() == (trained / "adapter_model.safetensors").read_bytes()
    (event,) = system.events
    assert event["event_type"] == "ADAPTER_INCARNATION" and event["event_data"]["adapter"] == "brick_i1"
    assert event["cycle_id"] == "2a1f8a0e-8a53-4a55-9b43-1c7f1c3c8f11"  # joins the forge's cycle
    stored = await image.read(lora_experts.get, "brick_i1")
    assert event["event_data"]["blob_oid"] == stored["oid"] is not None
    assert stored["decision"] == ACTIVATED and stored["audited"] is True and stored["train_ids"] == ["e1", "e2"]
    assert stored["reason"] == report["reason"] and stored["size"] > 1024 * 1024
    # Nothing is left to do: a second pass (the next start) touches nothing.
    assert await incarnation.incarnate_lora_experts(system.deps()) == []
    assert len(system.events) == 1


async def test_worse_adapter_keeps_previous_and_is_never_unpacked(image, tmp_path):
    system = FakeSystem(image, tmp_path / "cache", active={"ROBIN": {"path": "/good"}})
    await store(image, tmp_path, "robin_i2", metrics(1.5, 1.2), persona="ROBIN")
    (report,) = await incarnation.incarnate_lora_experts(system.deps())
    assert report["decision"] == KEPT_PREVIOUS and system.active_adapters["ROBIN"] == {"path": "/good"}
    assert not (tmp_path / "cache" / "robin_i2").exists()  # rollback = never switching
    assert (await image.read(lora_experts.get, "robin_i2"))["decision"] == KEPT_PREVIOUS
    assert system.events[0]["event_data"]["decision"] == KEPT_PREVIOUS and system.events[0]["status"] == "SUCCESS"
    assert await image.read(lora_experts.active) == {}


async def test_activation_failure_is_recorded(image, tmp_path):
    system = FakeSystem(image, tmp_path / "cache", fail_activate=True)
    await store(image, tmp_path, "brick_i3", metrics(0.5, 1.2))
    (report,) = await incarnation.incarnate_lora_experts(system.deps())
    assert report["decision"] == ACTIVATION_FAILED and "size mismatch" in report["reason"]
    assert system.events[0]["status"] == "FAILURE" and "BRICK" not in system.active_adapters


async def test_an_unavailable_kernel_is_retried_without_deciding_again(image, tmp_path):
    system = FakeSystem(image, tmp_path / "cache", fail_record=1)
    await store(image, tmp_path, "brick_i4", metrics(0.5, 1.2))
    (first,) = await incarnation.incarnate_lora_experts(system.deps())
    assert first["decision"] == ACTIVATED and not first.get("audited") and not system.events
    system.active_adapters.clear()  # if it decided again it would re-activate: it must not
    (second,) = await incarnation.incarnate_lora_experts(system.deps())
    assert second["audited"] is True and len(system.events) == 1 and system.active_adapters == {}
    assert await image.read(lora_experts.pending) == []


async def test_experts_are_judged_oldest_first_and_the_image_restores_the_active_one(image, tmp_path):
    system = FakeSystem(image, tmp_path / "cache")
    await store(image, tmp_path, "brick_a", metrics(0.9, 1.2))
    await store(image, tmp_path, "brick_b", metrics(0.7, 1.2))
    await store(image, tmp_path, "babs_c", None, persona="BABS")  # no metrics: never activated
    reports = await incarnation.incarnate_lora_experts(system.deps())
    assert [r["name"] for r in reports] == ["brick_a", "brick_b", "babs_c"]
    assert reports[2]["decision"] == KEPT_PREVIOUS and "never evaluated" in reports[2]["reason"]
    assert system.active_adapters["BRICK"]["meta"]["expert"] == "brick_b"  # the newest good one is in service
    # A fresh worker on another host: no cache, nothing active. The image says what runs.
    fresh = FakeSystem(image, tmp_path / "other_cache")
    assert await incarnation.restore_active(fresh.deps()) == {"BRICK": "restored brick_b"}
    assert (tmp_path / "other_cache" / "brick_b" / "adapter_config.json").is_file()
    assert await incarnation.restore_active(fresh.deps()) == {}  # already in service: nothing to do


def test_untar_refuses_escaping_paths(tmp_path):
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("../evil.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    buf.seek(0)
    with pytest.raises(tarfile.TarError):
        lora_experts.untar(buf, tmp_path / "t")
    assert not (tmp_path / "evil.txt").exists()
