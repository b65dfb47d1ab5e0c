"""The memory service's logic against an in-process ZEO server (two clients where it matters).

A bag-of-words hashing embedder stands in for the model (the real one has its own slow
test): texts sharing words get similar vectors, so ranking is checkable.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import threading

import numpy as np
import pytest

from batos.errors import ServiceError
from batos.image import Image
from services.memory_weaver.weaver import MemoryWeaver
from tests.unit.memory_wire import Wire
from tests.unit.test_memory_image import image, image2, settings, zeo_addr  # noqa: F401  (fixtures)

DIM = 384


class WordEmbedder:
    dim = DIM

    def __init__(self):
        self.calls: list[list[str]] = []

    def embed(self, texts, cancelled=None):
        self.calls.append(list(texts))
        out = np.zeros((len(texts), DIM), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in re.findall(r"\w+", t.lower()):
                out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % DIM] += 1.0
            out[i, DIM - 1] += 0.01  # never all-zero
        return out / np.linalg.norm(out, axis=1, keepdims=True), [1] * len(texts)


def meta(path, name, start=1, end=5, node_type="FunctionDef", **extra):
    return {"file_path": path, "start_line": start, "end_line": end, "node_type": node_type, "node_name": name,
            "parent_nodes": [], "dependencies": ["os"], **extra}


def file_payload(path, version="1", fns=("alpha", "beta")):
    return {
        "file_path": path,
        "file_hash": f"hash-{path}-{version}",
        "summaries": [{"key": "f", "kind": "file", "summary_text": f"file {path} defines {' '.join(fns)} v{version}",
                       "metadata": {"node_name": path, "node_type": "Module"}}],
        "chunks": [
            {"source_text": f"def {fn}():\n    return '{fn}'\n", "summary_key": "f",
             "metadata": meta(path, fn, start=i * 10 + 1, end=i * 10 + 3, content_hash=f"{path}:{fn}:{version}",
                              token_count=12)}
            for i, fn in enumerate(fns)
        ],
    }


@pytest.fixture
async def weaver(image):  # noqa: F811
    w = MemoryWeaver(image, WordEmbedder(), shard_rows=image.settings.vector_shard_rows)
    await w.start()
    yield Wire(w)
    await w.close()


@pytest.fixture
async def weaver2(image2):  # noqa: F811
    w = MemoryWeaver(image2, WordEmbedder(), shard_rows=image2.settings.vector_shard_rows)
    await w.start()
    yield Wire(w)
    await w.close()


async def test_replace_file_creates_objects_and_is_idempotent(weaver):
    r1 = await weaver.replace_file(file_payload("/a.py"))
    assert (r1["chunks"], r1["summaries"], r1["unchanged"]) == (2, 1, False)
    calls = len(weaver.embedder.calls)
    r2 = await weaver.replace_file(file_payload("/a.py"))
    assert r2["unchanged"] is True and r2["oids"] == r1["oids"]
    assert len(weaver.embedder.calls) == calls  # nothing re-embedded
    stats = await weaver.stats()
    assert stats["counts"] == {"contextual_summary": 1, "memory_chunk": 2}
    assert stats["vectors"]["live"] == 3
    assert (await weaver.file_hashes({}))["hashes"] == {"/a.py": "hash-/a.py-1"}


async def test_chunk_metadata_summary_links_and_inspect(weaver):
    r = await weaver.replace_file(file_payload("/a.py"))
    summary_oid, chunk_oid = r["oids"][0], r["oids"][1]
    view = await weaver.inspect({"oid": chunk_oid})
    assert view["prototype"] == "memory_chunk" and view["live"] is True
    assert set(view["slots"]) >= {"source_text", "metadata", "vector_embedding", "parent_summary"}
    assert view["slots"]["vector_embedding"] == f"<{DIM * 4} bytes>"
    hit = (await weaver.search({"text": "alpha", "k": 1, "level": "chunks"}))["hits"][0]
    assert hit["summary_oid"] == summary_oid
    md = hit["metadata"]
    assert set(md) == {"file_path", "start_line", "end_line", "node_type", "node_name", "parent_nodes",
                       "dependencies", "content_hash", "token_count", "flags", "embed_windows"}
    assert md["embed_windows"] == 1 and hit["token_count"] == 12
    root_view = await weaver.inspect({"oid": "0"})
    assert root_view["name"] == "root" and "prototypes" in root_view["slots"]


async def test_replace_swaps_atomically_with_tombstones_and_reuses_vectors(weaver):
    r1 = await weaver.replace_file(file_payload("/a.py", "1", ("alpha", "beta")))
    before = len(weaver.embedder.calls)
    r2 = await weaver.replace_file(file_payload("/a.py", "2", ("alpha", "gamma")))
    assert set(r1["oids"]).isdisjoint(r2["oids"])
    stats = await weaver.stats()
    assert stats["counts"] == {"contextual_summary": 1, "memory_chunk": 2}
    assert stats["vectors"]["rows"] == 6 and stats["vectors"]["live"] == 3  # 3 tombstoned
    hits = (await weaver.search({"text": "beta", "k": 10, "level": "both"}))["hits"]
    assert all(h["oid"] in r2["oids"] for h in hits)  # old rows masked
    # only the changed summary and the new function were embedded: alpha's vector was reused
    assert weaver.embedder.calls[before] == ["file /a.py defines alpha gamma v2", "def gamma():\n    return 'gamma'\n"]
    assert r2["reused_vectors"] == 1
    old = await weaver.inspect({"oid": r1["oids"][1]})
    assert old["live"] is False


async def test_failed_replace_commits_nothing(weaver):
    await weaver.replace_file(file_payload("/a.py"))
    bad = file_payload("/a.py", "2")
    bad["chunks"][1]["metadata"]["start_line"] = "one"
    with pytest.raises(ServiceError) as ei:
        await weaver.replace_file(bad)
    assert ei.value.code == "bad_args" and "start_line" in ei.value.message
    assert (await weaver.file_hashes({}))["hashes"] == {"/a.py": "hash-/a.py-1"}

    # a failure inside the transaction (after objects were made) rolls everything back
    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    import services.memory_weaver.store as store_mod

    orig = store_mod._index_and_embed
    store_mod._index_and_embed = boom
    try:
        with pytest.raises(RuntimeError):
            await weaver.replace_file(file_payload("/a.py", "3"))
    finally:
        store_mod._index_and_embed = orig
    stats = await weaver.stats()
    assert stats["counts"] == {"contextual_summary": 1, "memory_chunk": 2} and stats["vectors"]["rows"] == 3
    assert (await weaver.file_hashes({}))["hashes"] == {"/a.py": "hash-/a.py-1"}


async def test_two_clients_agree_after_commit(weaver, weaver2):
    await weaver.replace_file(file_payload("/a.py"))
    h2 = (await weaver2.search({"text": "alpha", "k": 3}))["hits"]
    h1 = (await weaver.search({"text": "alpha", "k": 3}))["hits"]
    assert [h["oid"] for h in h1] == [h["oid"] for h in h2] and h1
    reloads = weaver2.index.refreshed_shards
    await weaver.replace_file(file_payload("/a.py", "2", ("gamma",)))
    h2 = (await weaver2.search({"text": "gamma", "k": 3}))["hits"]
    h1 = (await weaver.search({"text": "gamma", "k": 3}))["hits"]
    assert [h["oid"] for h in h1] == [h["oid"] for h in h2]
    assert h2[0]["text"].startswith("def gamma")
    assert weaver2.index.refreshed_shards > reloads
    # a search with nothing new reloads no shard
    reloads = weaver2.index.refreshed_shards
    await weaver2.search({"text": "gamma", "k": 3})
    assert weaver2.index.refreshed_shards == reloads


async def test_vectors_span_shards_and_compact(weaver, weaver2):
    # shard_rows is 8 in these tests: 5 files x 3 rows = 15 rows over 2 shards, the first compacted
    for i in range(5):
        await weaver.replace_file(file_payload(f"/f{i}.py"))
    await weaver.delete_file({"file_path": "/f0.py"})
    stats = await weaver2.stats()
    assert stats["vectors"]["shards"] == 2 and stats["vectors"]["live"] == 12
    hits2 = (await weaver2.search({"text": "alpha beta", "k": 20}))["hits"]
    hits1 = (await weaver.search({"text": "alpha beta", "k": 20}))["hits"]
    assert [h["oid"] for h in hits1] == [h["oid"] for h in hits2]
    assert len(hits1) == 12
    assert np.allclose(weaver.index.matrix[:15], weaver2.index.matrix[:15])

    def segs(root, conn):
        return [len(s.segments) for s in root["memory"].vectors.shards]

    assert (await weaver.image.read(segs))[0] == 1


async def test_search_levels_filters_within(weaver):
    ra = await weaver.replace_file(file_payload("/a.py", fns=("alpha", "beta")))
    rb = await weaver.replace_file(file_payload("/b.py", fns=("alpha", "delta")))
    levels = {h["level"] for h in (await weaver.search({"text": "alpha", "k": 10, "level": "summaries"}))["hits"]}
    assert levels == {"summary"}
    levels = {h["level"] for h in (await weaver.search({"text": "alpha", "k": 10, "level": "chunks"}))["hits"]}
    assert levels == {"chunk"}
    hits = (await weaver.search({"text": "alpha", "k": 10, "filters": {"file_path": "/b.py"}}))["hits"]
    assert {h["oid"] for h in hits} == set(rb["oids"])
    hits = (await weaver.search({"text": "alpha", "k": 10, "filters": {"node_name": "alpha"}}))["hits"]
    assert len(hits) == 2 and all(h["metadata"]["node_name"] == "alpha" for h in hits)
    hits = (await weaver.search({"text": "x", "k": 10, "filters": {"node_name": "alpha", "file_path": "/a.py"}}))
    assert [h["oid"] for h in hits["hits"]] == [ra["oids"][1]]
    hits = (await weaver.search({"text": "alpha", "k": 10, "within": [ra["oids"][0]]}))["hits"]
    assert {h["oid"] for h in hits} == set(ra["oids"][1:])
    assert hits[0]["metadata"]["node_name"] == "alpha"  # ranked
    hits = (await weaver.search({"text": "nothing", "k": 5, "filters": {"node_name": "nope"}}))["hits"]
    assert hits == []
    top = (await weaver.search({"text": "file /a.py defines alpha beta", "k": 1}))["hits"][0]
    assert top["level"] == "summary" and top["child_oids"] == ra["oids"][1:]


async def test_search_by_vector_and_bad_vectors(weaver):
    await weaver.replace_file(file_payload("/a.py"))
    vec, _ = WordEmbedder().embed(["alpha"])
    hits = (await weaver.search({"vector": vec[0].tolist(), "k": 1, "level": "chunks"}))["hits"]
    assert hits[0]["metadata"]["node_name"] == "alpha"
    with pytest.raises(ServiceError, match="dimension"):
        await weaver.search({"vector": [1.0, 2.0]})
    with pytest.raises(ServiceError, match="text"):
        await weaver.search({"k": 3})
    with pytest.raises(ServiceError, match=r"\$\.k"):
        await weaver.search({"text": "a", "k": 0})
    with pytest.raises(ServiceError) as ei:
        await weaver.search({"text": "a", "within": ["ffffff"]})
    assert ei.value.code == "not_found"


async def test_fractals_and_offset_atomic(weaver):
    def ev(i, persona="BRICK", status="SUCCESS"):
        return {"event_id": f"e{i}", "summary": f"BRICK compiled method number {i}",
                "full_json": json.dumps({"i": i, "status": status}),
                "meta": {"cycle_id": f"c{i % 2}", "mission_type": "jit", "persona": persona, "status": status,
                         "timestamp": f"2025-01-01T00:00:0{i}Z", "event_type": "LLM_CALL", "psm_state": "REASONING"}}

    r = await weaver.create_fractals({"events": [ev(1), ev(2), ev(3, status="FAILURE")],
                                      "offset": {"path": "/var/m.jsonl", "value": 300}})
    assert r == {"created": 3, "skipped": 0}
    assert (await weaver.audit_offset({"path": "/var/m.jsonl"}))["value"] == 300
    r = await weaver.create_fractals({"events": [ev(1), ev(4)], "offset": {"path": "/var/m.jsonl", "value": 400}})
    assert r == {"created": 1, "skipped": 1}
    # a bad event: nothing of the batch, not even the offset, is committed
    with pytest.raises(ServiceError):
        await weaver.create_fractals({"events": [ev(5), {**ev(6), "full_json": "{not json"}],
                                      "offset": {"path": "/var/m.jsonl", "value": 999}})
    assert (await weaver.audit_offset({"path": "/var/m.jsonl"}))["value"] == 400
    got = (await weaver.query_fractals({"persona": "BRICK", "status": "SUCCESS"}))["fractals"]
    assert [json.loads(f["full_json"])["i"] for f in got] == [1, 2, 4]
    got = (await weaver.query_fractals({"cycle_id": "c1"}))["fractals"]
    assert [f["meta"]["cycle_id"] for f in got] == ["c1", "c1"]
    got = (await weaver.query_fractals({"since": "2025-01-01T00:00:02Z", "until": "2025-01-01T00:00:03Z"}))
    assert [f["event_id"] for f in got["fractals"]] == ["e2", "e3"]
    assert len((await weaver.query_fractals({"limit": 2}))["fractals"]) == 2
    hits = (await weaver.search({"text": "compiled method", "k": 10, "level": "fractals"}))["hits"]
    assert len(hits) == 4 and {h["level"] for h in hits} == {"fractal"}
    assert (await weaver.search({"text": "compiled method", "k": 10}))["hits"] == []  # not in "both"


@pytest.mark.parametrize(
    ("method", "body", "code"),
    [
        ("inspect", {"oid": "ffffffff"}, "not_found"),
        ("inspect", {"oid": 3.5}, "bad_args"),
        ("inspect", {"oid": True}, "bad_args"),
        ("delete_file", {}, "bad_args"),
        ("audit_offset", {"path": 7}, "bad_args"),
        ("file_hashes", {"root": 3}, "bad_args"),
        ("query_fractals", {"limit": 0}, "bad_args"),
        ("replace_file", {"file_path": "/a.py"}, "bad_args"),
        ("replace_file", {**file_payload("/a.py"), "extra": 1}, "bad_args"),
        ("replace_file", {**file_payload("/a"), "chunks": [{"source_text": "x",
                                                            "metadata": {**meta("/a", "f"), "colour": "red"}}]},
         "bad_args"),
        ("replace_file", {**file_payload("/a"), "chunks": [{"source_text": "x" * 200_001,
                                                            "metadata": meta("/a", "f")}]}, "bad_args"),
        ("replace_file", {**file_payload("/a"), "chunks": [{"source_text": "x", "metadata": meta("/a", "f"),
                                                            "summary_key": "k"}]}, "bad_args"),
        ("replace_file", {**file_payload("/a"), "chunks": [{"source_text": "x", "metadata": meta("/b", "f")}]},
         "bad_args"),
        ("replace_file", {**file_payload("/a"), "chunks": [{"source_text": "x", "metadata": meta("/a", "f", 5, 2)}]},
         "bad_args"),
        ("search", {"text": "a", "k": 1001}, "bad_args"),
        ("search", {"mode": "lexical", "vector": [0.0]}, "bad_args"),
        ("create_fractals", {"events": [{"event_id": "e", "summary": "s", "full_json": "{"}]}, "bad_args"),
        ("create_fractals", {"events": [{"event_id": "e", "summary": "s", "full_json": "{}"}] * 2}, "bad_args"),
        ("create_fractals", {"events": [], "offset": {"path": "/l", "value": -1}}, "bad_args"),
        ("create_fractals", {"events": [{"event_id": "", "summary": "s", "full_json": "{}"}]}, "bad_args"),
    ],
)
async def test_bad_input_is_a_clear_error_and_commits_nothing(weaver, method, body, code):
    with pytest.raises(ServiceError) as ei:
        await getattr(weaver, method)(body)
    assert ei.value.code == code and ei.value.message
    stats = await weaver.stats()
    assert stats["counts"] == {} and stats["vectors"]["rows"] == 0


async def test_cancelled_embedding_commits_nothing(image):  # noqa: F811
    from services.memory_weaver.embedder import EmbeddingCancelled

    class Cancelling(WordEmbedder):
        def embed(self, texts, cancelled=None):
            if cancelled is not None and cancelled.is_set():
                raise EmbeddingCancelled("cancelled")
            return super().embed(texts, cancelled)

    w = MemoryWeaver(image, Cancelling(), shard_rows=8)
    await w.start()
    ev = threading.Event()
    ev.set()
    with pytest.raises(ServiceError) as ei:
        await Wire(w).replace_file(file_payload("/a.py"), cancelled=ev)
    assert ei.value.code == "cancelled"
    assert (await Wire(w).file_hashes({}))["hashes"] == {}
    await w.close()


async def test_weaver_restart_cold_loads_matrix(image, settings, zeo_addr):  # noqa: F811
    w = Wire(MemoryWeaver(image, WordEmbedder(), shard_rows=8))
    await w.start()
    for i in range(3):
        await w.replace_file(file_payload(f"/f{i}.py"))
    expected = [h["oid"] for h in (await w.search({"text": "alpha", "k": 5}))["hits"]]
    await w.close()
    fresh = Image(settings, addr=zeo_addr)
    await fresh.open()
    w2 = Wire(MemoryWeaver(fresh, WordEmbedder(), shard_rows=8))
    await w2.start()
    assert w2.index.rows == 9
    assert [h["oid"] for h in (await w2.search({"text": "alpha", "k": 5}))["hits"]] == expected
    await w2.close()
    await fresh.close()


async def test_replace_files_batches_in_one_transaction(weaver):
    await weaver.replace_file(file_payload("/a.py"))
    body = {"files": [file_payload("/a.py"), file_payload("/b.py"), file_payload("/c.py", "2", ("gamma",))]}
    calls = len(weaver.embedder.calls)
    out = (await weaver.replace_files(body))["files"]
    assert [f["unchanged"] for f in out] == [True, False, False]
    assert [f["file_path"] for f in out] == ["/a.py", "/b.py", "/c.py"]
    assert len(weaver.embedder.calls) == calls + 1  # one embedding batch for both changed files
    hashes = (await weaver.file_hashes({"root": "/"}))["hashes"]
    assert hashes == {"/a.py": "hash-/a.py-1", "/b.py": "hash-/b.py-1", "/c.py": "hash-/c.py-2"}
    # all or nothing: a failure while writing the batch leaves every file as it was
    import services.memory_weaver.store as store_mod

    orig = store_mod.replace_file
    seen = []

    def fail_second(root, conn, path, *a):
        seen.append(path)
        if len(seen) == 2:
            raise RuntimeError("boom")
        return orig(root, conn, path, *a)

    store_mod.replace_file = fail_second
    try:
        with pytest.raises(RuntimeError):
            await weaver.replace_files({"files": [file_payload("/b.py", "9"), file_payload("/c.py", "9")]})
    finally:
        store_mod.replace_file = orig
    assert (await weaver.file_hashes({}))["hashes"] == hashes
    with pytest.raises(ServiceError, match="unique"):
        await weaver.replace_files({"files": [file_payload("/a.py"), file_payload("/a.py", "2")]})


async def test_file_hashes_prefix_is_a_directory(weaver):
    for p in ("/src/a.py", "/src/pkg/b.py", "/srcx/c.py"):
        await weaver.replace_file(file_payload(p))
    assert set((await weaver.file_hashes({"root": "/src"}))["hashes"]) == {"/src/a.py", "/src/pkg/b.py"}
    assert set((await weaver.file_hashes({"root": "/src/"}))["hashes"]) == {"/src/a.py", "/src/pkg/b.py"}


async def test_offset_only_batch(weaver):
    r = await weaver.create_fractals({"events": [], "offset": {"path": "/log", "value": 12}})
    assert r == {"created": 0, "skipped": 0}
    assert (await weaver.audit_offset({"path": "/log"}))["value"] == 12
    assert (await weaver.audit_offset({"path": "/other"}))["value"] == 0


async def test_concurrent_writers_in_two_clients_both_land(weaver, weaver2):
    import asyncio

    # both append to the same tail vector shard and the same indexes: conflicts are retried.
    # 6 writes in all: a writer can lose at most 5 times, within WRITE_RETRIES, so none may fail
    a = [weaver.replace_file(file_payload(f"/a{i}.py")) for i in range(3)]
    b = [weaver2.replace_file(file_payload(f"/b{i}.py")) for i in range(3)]
    await asyncio.gather(*a, *b)
    s1, s2 = await weaver.stats(), await weaver2.stats()
    assert s1["counts"] == s2["counts"] == {"contextual_summary": 6, "memory_chunk": 12}
    assert s1["vectors"]["live"] == 18 and s1["vectors"]["rows"] == 18
    h1 = [h["oid"] for h in (await weaver.search({"text": "alpha", "k": 30}))["hits"]]
    h2 = [h["oid"] for h in (await weaver2.search({"text": "alpha", "k": 30}))["hits"]]
    assert h1 == h2 and len(h1) == 18


async def test_rewriting_a_file_whose_summary_lacks_name_and_type(weaver):
    """Index keys may be missing: removing them on a rewrite must not compare None with str."""
    await weaver.replace_file(file_payload("/src/other.py"))
    bare = file_payload("/src/bare.py")
    bare["summaries"][0]["metadata"] = {}
    await weaver.replace_file(bare)
    again = file_payload("/src/bare.py", version="2")
    again["summaries"][0]["metadata"] = {}
    out = await weaver.replace_file(again)
    assert out["chunks"] == 2


async def test_a_write_brings_the_search_index_up_to_date_before_any_search(weaver):
    """The next search must not pay for loading what this worker just wrote (issue 14 item 6)."""
    w = weaver.weaver
    rows = w.index.rows
    await weaver.replace_file(file_payload("/fresh.py"))
    await asyncio.gather(*w._refreshes)  # the refresh the write started, on the search lane
    assert w.index.rows == rows + 3  # one summary and two chunks, loaded without a search
    served = w.index.refreshed_shards
    assert (await weaver.search({"text": "alpha", "k": 1, "level": "chunks"}))["hits"]
    assert w.index.refreshed_shards == served  # the search found nothing left to load
