"""`verify`: memory's invariants hold after normal writes, each kind of damage is reported, repair
fixes it, and a damaged file is never "unchanged" to re-ingest (in-process ZEO, word embedder)."""

from __future__ import annotations

import hashlib

import numpy as np

from services.memory_weaver import store
from tests.unit.test_memory_image import image, settings, zeo_addr  # noqa: F401  (fixtures)
from tests.unit.test_memory_weaver import weaver  # noqa: F401  (fixture)


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def payload(path: str, version: str = "1", fns: tuple[str, ...] = ("alpha", "beta", "gamma")) -> dict:
    chunks = []
    for i, fn in enumerate(fns):
        text = f"def {fn}_{version}():\n    return '{path}'\n"
        chunks.append({"source_text": text, "summary_key": "f",
                       "metadata": {"file_path": path, "start_line": i * 3 + 1, "end_line": i * 3 + 2,
                                    "node_type": "FunctionDef", "node_name": fn, "parent_nodes": [],
                                    "dependencies": [], "content_hash": sha(f"{path}\0{text}")}})
    return {"file_path": path, "file_hash": f"{path}-{version}", "chunks": chunks,
            "summaries": [{"key": "f", "kind": "file", "summary_text": f"module {path} v{version}",
                           "metadata": {"node_name": path, "node_type": "Module"}}]}


async def ingest(w, *paths):
    await w.replace_files({"files": [payload(p) for p in paths]})


async def verify_reply(w, repair=False):
    return await w.verify({"repair": repair})


async def test_a_clean_image_verifies(weaver):  # noqa: F811
    await ingest(weaver, "/a.py", "/b.py", "/c.py")
    await weaver.replace_file(payload("/b.py", "2"))  # a rewrite leaves tombstones behind
    await weaver.delete_file({"file_path": "/c.py"})
    out = await verify_reply(weaver)
    assert out["ok"], out["problems"]
    assert out["checked"]["files"] == 2
    assert out["checked"]["objects.memory_chunk"] == 6
    assert out["checked"]["objects.contextual_summary"] == 2


async def cross_link(w):
    """What two objects sharing an oid leave behind: /b.py's entry lists /a.py's first chunk."""
    def damage(root, conn):
        mem = store.memory(root)
        a, b = mem.files["/a.py"], mem.files["/b.py"]
        b.chunks = (*b.chunks, a.chunks[0])

    await w.image.transact(damage)


async def test_a_cross_linked_object_is_reported_and_reingest_repairs_it(weaver):  # noqa: F811
    await ingest(weaver, "/a.py", "/b.py")
    await cross_link(weaver)
    out = await verify_reply(weaver)
    assert not out["ok"]
    assert out["problem_counts"].get("shared_object") == 1
    assert out["bad_files"] == ["/a.py", "/b.py"]
    hashes = (await weaver.file_hashes({}))["hashes"]
    assert hashes == {"/a.py": "", "/b.py": ""}  # ingest re-sends both
    again = await weaver.replace_files({"files": [payload("/a.py"), payload("/b.py")]})
    assert [f["unchanged"] for f in again["files"]] == [True, False]  # /b.py is broken, /a.py's own is fine
    out = await verify_reply(weaver)
    assert out["ok"], out["problems"]
    assert (await weaver.file_hashes({}))["hashes"] == {"/a.py": "/a.py-1", "/b.py": "/b.py-1"}


async def test_counters_rows_orphans_and_text_are_checked_and_repaired(weaver):  # noqa: F811
    await ingest(weaver, "/a.py", "/b.py")

    def damage(root, conn):
        mem = store.memory(root)
        mem.counts["memory_chunk"].change(5)  # a counter that disagrees
        a = mem.files["/a.py"]
        orphan = a.chunks[-1]
        a.chunks = a.chunks[:-1]  # an object no file lists
        lost_row = mem.files["/b.py"].chunks[1]
        mem.vectors.remove([store.oid_int(lost_row)])  # an object without its vector row
        return store.oid_int(orphan)

    await weaver.image.transact(damage)
    out = await verify_reply(weaver)
    counts = out["problem_counts"]
    assert counts.get("counter") == 1
    assert counts.get("orphan") == 1
    assert counts.get("object_without_row") == 1
    assert counts.get("child") == 1  # /a.py's summary still lists the chunk its entry dropped
    fixed = await verify_reply(weaver, repair=True)
    assert fixed["repaired"]["orphans_dropped"] == 1
    assert fixed["repaired"]["rows_readded"] == 1
    assert fixed["repaired"]["counters_fixed"] >= 1
    assert fixed["after"]["problem_counts"] == {"child": 1}  # left for the file's re-ingest
    assert (await weaver.replace_file(payload("/a.py")))["unchanged"] is False
    assert (await verify_reply(weaver))["ok"]


async def test_tampered_text_fails_its_content_hash(weaver):  # noqa: F811
    await ingest(weaver, "/a.py")

    def damage(root, conn):
        chunk = store.memory(root).files["/a.py"].chunks[0]
        chunk.set_slot("source_text", "def tampered(): pass\n")

    await weaver.image.transact(damage)
    out = await verify_reply(weaver)
    assert out["problem_counts"] == {"content_hash": 1}
    assert out["bad_files"] == ["/a.py"]
    fixed = await verify_reply(weaver, repair=True)
    assert fixed["repaired"]["files_marked"] == 1
    assert (await weaver.file_hashes({}))["hashes"] == {"/a.py": ""}
    await weaver.replace_file(payload("/a.py"))
    assert (await verify_reply(weaver))["ok"]


async def test_a_live_row_without_its_object_is_tombstoned(weaver):  # noqa: F811
    await ingest(weaver, "/a.py")

    def damage(root, conn):
        mem = store.memory(root)
        mem.vectors.append(np.ones((1, mem.vectors.dim), dtype=np.float32), [987654321], [0])

    await weaver.image.transact(damage)
    out = await verify_reply(weaver)
    assert out["problem_counts"].get("row_without_object") == 1
    fixed = await verify_reply(weaver, repair=True)
    assert fixed["repaired"]["rows_tombstoned"] == 1
    assert fixed["after"]["ok"], fixed["after"]


async def test_the_in_memory_matrix_is_compared_with_the_image(weaver):  # noqa: F811
    await ingest(weaver, "/a.py")
    assert (await verify_reply(weaver))["ok"]
    with weaver.index.lock:
        weaver.index.alive[0] = False  # the worker's matrix lost a row the image still has
    out = await verify_reply(weaver)
    assert out["problem_counts"] == {"index": 1}


def test_the_console_and_the_kernel_route_verify_to_memory():
    import pytest

    from proto import contract
    from services.console.commands import CommandError, parse_line
    from services.kernel.handlers import HANDLERS

    for line, repair in (("verify", False), ("verify repair", True)):
        call = parse_line(line).call
        assert contract.spec_of(call).name == "kernel.verify" and call.repair is repair
    with pytest.raises(CommandError):
        parse_line("verify everything")
    assert "verify" in HANDLERS


async def test_an_object_listed_twice_is_reported(weaver):  # noqa: F811
    await ingest(weaver, "/a.py")

    def damage(root, conn):
        entry = store.memory(root).files["/a.py"]
        entry.chunks = (*entry.chunks, entry.chunks[0])

    await weaver.image.transact(damage)
    out = await verify_reply(weaver)
    assert out["problem_counts"] == {"listed_twice": 1} and out["bad_files"] == ["/a.py"]
    assert (await weaver.file_hashes({}))["hashes"] == {"/a.py": ""}
    assert (await weaver.replace_file(payload("/a.py")))["unchanged"] is False
    assert (await verify_reply(weaver))["ok"]
