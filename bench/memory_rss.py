"""Issue 14 item 10: where memory_weaver's resident memory goes, and what bounds it.

Runs the memory service's logic in this process (MemoryWeaver, the real MiniLM embedder, an
in-process ZEO server on a temp FileStorage) and records RSS:

1. idle: model loaded, weaver started, empty image;
2. after ingesting LINES lines of the standard library (25-line chunks and one summary per
   file, sent as ingestion sends them: ``replace_files`` batches of 8 files);
3. after 50 searches;
4. after ``malloc_trim(0)``: what glibc held on to without using it.

It also prints the ZODB object caches (objects and estimated bytes per connection). Each variant
runs in a fresh subprocess so their figures do not mix:

- ``default``: the allocator as is;
- ``mallopt``: ``batos.malloc_tuning.bound_heap`` with the default settings (a fixed 1 MiB mmap
  threshold, two malloc arenas) before the model loads, as the memory_weaver program does.

    .venv/bin/python bench/memory_rss.py [--lines 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CHUNK_LINES = 25
FILES_PER_BATCH = 8
SEARCHES = 50


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def stdlib_files(lines: int) -> list[tuple[str, list[str]]]:
    out, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if "test" in path.parts or "site-packages" in path.parts:
            continue
        try:
            text = path.read_text().splitlines(keepends=True)
        except (UnicodeDecodeError, OSError):
            continue
        if not text:
            continue
        out.append((str(path), text))
        total += len(text)
        if total >= lines:
            break
    return out


def payload(path: str, text: list[str]) -> dict:
    import hashlib

    chunks = []
    for i in range(0, len(text), CHUNK_LINES):
        body = "".join(text[i:i + CHUNK_LINES])
        if not body.strip():
            continue
        chunks.append({"source_text": body, "summary_key": "f",
                       "metadata": {"file_path": path, "start_line": i + 1, "end_line": min(i + CHUNK_LINES, len(text)),
                                    "node_type": "Window", "node_name": f"{Path(path).name}:{i + 1}",
                                    "parent_nodes": [], "dependencies": [],
                                    "content_hash": hashlib.sha256(f"{path}\0{body}".encode()).hexdigest()}})
    return {"file_path": path, "file_hash": hashlib.sha256("".join(text).encode()).hexdigest(), "chunks": chunks,
            "summaries": [{"key": "f", "kind": "file", "summary_text": f"module {path}: {text[0][:200]}",
                           "metadata": {"node_name": path, "node_type": "Module"}}]}


def cache_report(db) -> dict:
    """The ZODB object caches of every connection: objects, non-ghosts, estimated bytes."""
    caches = []
    db._connectionMap(lambda conn: caches.append(conn._cache))
    return {"connections": len(caches), "objects": sum(len(c) for c in caches),
            "non_ghosts": sum(c.cache_non_ghost_count for c in caches),
            "estimated_mib": round(sum(c.total_estimated_size for c in caches) / 2**20, 1)}


async def measure(lines: int, variant: str) -> dict:
    import msgspec
    import ZEO

    from batos.config import load
    from batos.image import Image
    from batos.malloc_tuning import bound_heap
    from proto.bodies import memory as M
    from services.memory_weaver.embedder import Embedder
    from services.memory_weaver.weaver import MemoryWeaver

    defaults = load()
    if variant == "mallopt":
        assert bound_heap(defaults.malloc_mmap_threshold, defaults.malloc_arena_max)
    tmp = Path(tempfile.mkdtemp(prefix="rss-"))
    addr, stop = ZEO.server(path=str(tmp / "image.fs"), blob_dir=str(tmp / "blobs"))
    settings = load(var_dir=tmp / "var", cache_dir=tmp / "cache")
    out: dict = {"variant": variant, "start_mib": round(rss_mib(), 1)}
    image = await Image(settings, addr=addr).open()
    embedder = await asyncio.to_thread(Embedder().load)
    weaver = MemoryWeaver(image, embedder, settings.vector_shard_rows)
    await weaver.start()
    gc.collect()
    out["idle_mib"] = round(rss_mib(), 1)
    files = stdlib_files(lines)
    started = time.perf_counter()
    chunks = 0
    for i in range(0, len(files), FILES_PER_BATCH):
        batch = [payload(p, t) for p, t in files[i:i + FILES_PER_BATCH]]
        chunks += sum(len(b["chunks"]) for b in batch)
        await weaver.replace_files(msgspec.convert({"files": batch}, M.ReplaceFiles))
    gc.collect()
    out.update(lines=sum(len(t) for _, t in files), chunks=chunks, ingest_s=round(time.perf_counter() - started, 1),
               after_ingest_mib=round(rss_mib(), 1), caches_after_ingest=cache_report(image.db))
    for q in range(SEARCHES):
        await weaver.search(M.Search(text=f"how does {files[q % len(files)][0]} open a file", k=8))
    gc.collect()
    out["after_searches_mib"] = round(rss_mib(), 1)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    out["after_trim_mib"] = round(rss_mib(), 1)
    out["index"] = {k: v for k, v in weaver.index.stats().items() if not isinstance(v, dict)}
    await weaver.close()
    await image.close()
    stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=100_000)
    ap.add_argument("--variant", choices=("default", "mallopt"))
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(asyncio.run(measure(args.lines, args.variant))))
        return
    results = []
    for variant in ("default", "mallopt"):
        r = subprocess.run([sys.executable, __file__, "--lines", str(args.lines), "--variant", variant],
                           capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if r.returncode != 0:
            raise SystemExit(r.stderr[-3000:])
        results.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1], indent=1))
    base, tuned = results
    growth = lambda r: r["after_searches_mib"] - r["idle_mib"]
    print(f"\ngrowth idle -> after ingest + {SEARCHES} searches: default {growth(base):.0f} MiB, "
          f"mallopt {growth(tuned):.0f} MiB (ratio {growth(tuned) / max(growth(base), 1):.2f}); "
          f"after malloc_trim default {base['after_trim_mib'] - base['idle_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
