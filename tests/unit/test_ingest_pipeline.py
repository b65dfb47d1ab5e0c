"""The ingest pipeline against a fake memory service: counts, incremental runs, overlap, errors, progress."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from batos.errors import ServiceError
from proto import ErrorCode, contract
from services.ingestor import pipeline


class FakeMemory:
    """Holds file hashes like memory does; optional delay, failures and a command it does not know."""

    def __init__(self, delay: float = 0.0, fail: dict[str, ServiceError] | None = None):
        self.hashes: dict[str, str] = {}
        self.files: dict[str, dict[str, Any]] = {}
        self.calls: list[str] = []
        self.delay = delay
        self.fail = fail or {}
        self.in_flight = 0
        self.max_in_flight = 0

    async def request(self, typed: contract.Call[Any], *, timeout: float = 60.0, idempotent: bool = False) -> Any:
        """Like batos.client's: memory's typed bodies in, its typed replies out (the dicts between are the wire's)."""
        s = contract.spec_of(typed)
        assert s.service == "memory"
        return contract.decode_reply(s, await self.call(s.command, contract.encode(typed)))

    async def call(self, command: str, body: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(command)
        if command in self.fail:
            raise self.fail[command]
        if command == "file_hashes":
            root = body["root"]
            return {"hashes": {p: h for p, h in self.hashes.items() if p == root or p.startswith(root + "/")}}
        if command == "delete_file":
            self.hashes.pop(body["file_path"], None)
            return {"deleted": int(self.files.pop(body["file_path"], None) is not None)}
        assert command == "replace_files", command  # the ingestor writes in batches, nothing else
        files = body["files"]
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.in_flight -= 1
        for f in files:
            self.hashes[f["file_path"]] = f["file_hash"]
            self.files[f["file_path"]] = f
        return {"files": [{"file_path": f["file_path"], "chunks": len(f["chunks"]), "summaries": len(f["summaries"]),
                           "oids": [], "unchanged": False, "reused_vectors": 0} for f in files]}


def _tree(root: Path, n_modules: int = 6) -> None:
    (root / "pkg").mkdir(parents=True)
    for i in range(n_modules):
        funcs = "".join(f"def f{j}(x):\n    '''Doc {j}.'''\n    return x * {j} + {i}\n\n\n" for j in range(30))
        (root / "pkg" / f"m{i}.py").write_text(f'"""Module {i}."""\nimport os\n\n\n{funcs}')
    (root / "README.md").write_text("# Project\n\nSome words.\n")
    (root / "broken.py").write_text("def broken(:\n    pass\n")
    (root / "blob.json").write_bytes(b"\x00\x01\x02")
    (root / "huge.txt").write_text("x" * 5000)
    (root / "image.png").write_bytes(b"\x89PNG")
    (root / ".gitignore").write_text("ignored/\n")
    (root / "ignored").mkdir()
    (root / "ignored" / "x.py").write_text("x = 1\n")


async def _run(root: Path, mem: FakeMemory, events: list[dict] | None = None, **kw: Any) -> dict[str, Any]:
    async def emit(name: str, **data: Any) -> None:
        if events is not None:
            events.append({"event": name, **data})

    return await pipeline.ingest(str(root), client=mem, emit=emit, max_chunk_tokens=kw.pop("max_chunk_tokens", 64),
                                 max_file_bytes=4000, **kw)


async def test_first_run_counts_everything(tmp_path: Path) -> None:
    _tree(tmp_path)
    mem = FakeMemory()
    events: list[dict] = []
    reply = await _run(tmp_path, mem, events)
    assert reply["files"] == 8  # 6 modules, README.md, broken.py (as line windows); .gitignore is not ingested
    assert reply["skipped"] == 2 and reply["skipped_by_reason"] == {"binary": 1, "too_large": 1}
    assert reply["unsupported"] == 2  # image.png, .gitignore
    assert reply["unchanged"] == 0 and reply["removed"] == 0
    assert [e["file_path"] for e in reply["errors"]] == [str(tmp_path / "broken.py")]
    assert reply["chunks"] == sum(len(f["chunks"]) for f in mem.files.values()) > 8
    assert not any("ignored" in p for p in mem.files)
    stages = [e["stage"] for e in events]
    assert stages[-1] == "COMPLETE" and "CHUNKING" in stages and "INDEXING" in stages
    last = events[-1]
    assert last["files_done"] == last["files_total"] and last["chunks"] == reply["chunks"]
    assert set(last) == {"event", "stage", "files_done", "files_total", "chunks", "rate", "eta_s"}
    module = mem.files[str(tmp_path / "pkg" / "m0.py")]
    assert module["summaries"][0]["kind"] == "file"
    assert all(c["metadata"]["file_path"] == module["file_path"] for c in module["chunks"])


async def test_rerun_is_incremental(tmp_path: Path) -> None:
    _tree(tmp_path)
    mem = FakeMemory()
    await _run(tmp_path, mem)
    mem.calls.clear()
    again = await _run(tmp_path, mem)
    assert again["files"] == 0 and again["unchanged"] == 8 and again["chunks"] == 0 and again["removed"] == 0
    assert "replace_files" not in mem.calls and "delete_file" not in mem.calls
    (tmp_path / "pkg" / "m1.py").write_text("X = 2\n")
    (tmp_path / "pkg" / "m2.py").unlink()
    third = await _run(tmp_path, mem)
    assert third["files"] == 1 and third["unchanged"] == 6 and third["removed"] == 1
    assert str(tmp_path / "pkg" / "m2.py") not in mem.files
    assert mem.files[str(tmp_path / "pkg" / "m1.py")]["chunks"][0]["source_text"] == "X = 2\n"


async def test_chunking_overlaps_indexing_with_bounded_concurrency(tmp_path: Path) -> None:
    _tree(tmp_path, n_modules=12)
    mem = FakeMemory(delay=0.05)
    reply = await _run(tmp_path, mem, max_chunk_tokens=24)
    assert reply["files"] == 14
    assert 1 < mem.max_in_flight <= pipeline.MAX_IN_FLIGHT


async def test_memory_errors(tmp_path: Path) -> None:
    _tree(tmp_path)
    mem = FakeMemory(fail={"replace_files": ServiceError(ErrorCode.BAD_ARGS, "rejected")})
    reply = await _run(tmp_path, mem)
    assert reply["files"] == 0 and len(reply["errors"]) == 1 + 8  # broken.py's parse error + every file
    down = FakeMemory(fail={"replace_files": ServiceError(ErrorCode.UNAVAILABLE, "no worker")})
    with pytest.raises(ServiceError) as e:
        await _run(tmp_path, down)
    assert e.value.code == ErrorCode.UNAVAILABLE


async def test_cancel_and_missing_path(tmp_path: Path) -> None:
    _tree(tmp_path)
    stop = threading.Event()
    stop.set()
    with pytest.raises(ServiceError) as e:
        await _run(tmp_path, FakeMemory(), cancelled=stop)
    assert e.value.code == ErrorCode.CANCELLED
    with pytest.raises(ServiceError) as e:
        await _run(tmp_path / "nope", FakeMemory())
    assert e.value.code == ErrorCode.NOT_FOUND


async def test_single_file(tmp_path: Path) -> None:
    _tree(tmp_path)
    mem = FakeMemory()
    reply = await _run(tmp_path / "pkg" / "m3.py", mem)
    assert reply["files"] == 1 and list(mem.files) == [str(tmp_path / "pkg" / "m3.py")]
