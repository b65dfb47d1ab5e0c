"""Benchmark ingestion.

(a) Chunking alone over the installed standard library (site-packages excluded): lines/s of our
    chunker beside astchunk (tree-sitter; ``pip install astchunk``) on the same files, CPU time,
    alternating rounds, medians (the machine is shared). Two figures for ours: ``core`` (parse, exact
    token pricing, split/merge, chunk texts) is what astchunk does; ``full`` adds Table 2 metadata,
    dependencies, context headers, content hashes and the file/class summaries. Then a quality table
    for both: chunks, token sizes (cl100k) median/p95/max, chunks over the budget, % parseable
    (``parsecheck.parses``, all chunks and without its clause rule), flagged chunks, non-blank line
    coverage (exactly once) and chunks whose text is the source lines they claim.
    astchunk counts non-whitespace characters, not tokens: it gets the same budget converted at the
    corpus's own ratio of non-whitespace characters per cl100k token.
    llama-index's CodeSplitter is not compared: ``llama-index-core`` pulls ~35 packages (SQLAlchemy,
    nltk, aiohttp, pillow, ...) into the shared venv, so it was left out.

(b) End to end through a running system: ``end_to_end(path)`` sends ``ingest`` to the ingest service
    through the broker and reports files, chunks, chunks/s and the progress stages seen
    (``--live PATH``; needs broker, zeo, memory and ingest up, e.g. under supervisord).

(c) Embedding throughput (``--embed N``): chunks/s of the bare encoder (one ``encode`` call, silent
    truncation) beside BAT OS's embedder as it was (slices of 128 in file order) and as it is
    (length-sorted batches, windows for long texts), memory's ``replace_files`` end to end against an
    in-process ZEO server, and a re-ingest of touched but unchanged files (vectors reused by hash).

    .venv/bin/python bench/ingest.py                 # (a), every stdlib file, 3 rounds
    .venv/bin/python bench/ingest.py --embed 600     # (c)
    .venv/bin/python bench/ingest.py --sample 5      # (a), every 5th file
    .venv/bin/python bench/ingest.py --live /path    # (b)
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import os
import statistics
import sys
import sysconfig
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from batos import tokens
from services.ingestor import parsecheck
from services.ingestor.chunker import _gc_paused, _Splitter, chunk_python
from services.ingestor.model import Chunk
from services.ingestor.source import Source, decode_python, split_lines
from services.ingestor.structure import module_container


def corpus(sample: int) -> list[tuple[str, str]]:
    """(path, text) of the stdlib's .py files that decode and parse, every ``sample``-th one."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    paths = []
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
        paths.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    out = []
    for p in paths[::sample]:
        try:
            text = decode_python(Path(p).read_bytes())
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ast.parse(text)
        except (SyntaxError, ValueError, UnicodeDecodeError, LookupError):
            continue  # py2 fixtures and friends: not a fair comparison for either chunker
        out.append((p, text))
    return out


# -- (a) speed ---------------------------------------------------------------------------------


def ours_core(text: str, budget: int) -> list[tuple[int, int, str]]:
    with _gc_paused():
        src = Source(text)
        sp = _Splitter(src, budget)
        sp.run(module_container(src, ast.parse(text)))
        return [(s.start, s.end, s.text) for p in sp.pieces if (s := p.span or src.span(p.start, p.end))]


def ours_full(path: str, text: str, budget: int) -> list[Chunk]:
    return chunk_python(text, path, budget).chunks


def astchunk_builder(size: int) -> Any:
    from astchunk import ASTChunkBuilder

    return ASTChunkBuilder(max_chunk_size=size, language="python", metadata_template="default")


def timed(fn: Any, files: list[tuple[str, str]]) -> float:
    start = time.process_time()
    for path, text in files:
        fn(path, text)
    return time.process_time() - start


# -- (a) quality -------------------------------------------------------------------------------


@dataclass
class Quality:
    sizes: list[int] = field(default_factory=list)
    parse: int = 0
    parse_plain: int = 0
    flagged: int = 0
    unflagged: int = 0
    parse_unflagged: int = 0
    exact: int = 0
    lines: int = 0
    once: int = 0
    twice: int = 0

    def row(self, name: str, budget: int) -> str:
        n = len(self.sizes) or 1
        s = sorted(self.sizes) or [0]
        over = sum(1 for x in s if x > budget)
        return (f"| {name} | {len(self.sizes)} | {statistics.median(s):.0f} | {s[int(0.95 * (len(s) - 1))]} | {s[-1]} "
                f"| {100 * over / n:.2f}% | {100 * self.parse / n:.2f}% | {100 * self.parse_plain / n:.2f}% "
                f"| {100 * self.flagged / n:.2f}% | {100 * self.parse_unflagged / max(self.unflagged, 1):.2f}% "
                f"| {100 * self.once / max(self.lines, 1):.2f}% "
                f"| {100 * self.twice / max(self.lines, 1):.2f}% | {100 * self.exact / n:.2f}% |")


def _nws(s: str) -> str:
    return "".join(s.split())


def measure(q: Quality, text: str, chunks: list[tuple[int, int, str, bool, bool]]) -> None:
    """chunks: (first line, last line, text, flagged, part of a cut line), lines 1-based inclusive."""
    lines = split_lines(text)
    seen = [0] * (len(lines) + 2)
    pieces: dict[int, list[str]] = {}
    for s, e, body, flagged, partial in chunks:
        size = tokens.count(body)
        q.sizes.append(size)
        q.parse += parsecheck.parses(body)
        q.parse_plain += parsecheck.parses_plain(body)
        q.flagged += flagged
        if not flagged:
            q.unflagged += 1
            q.parse_unflagged += parsecheck.parses(body)
        source = "".join(lines[s - 1:e])
        if partial:
            pieces.setdefault(s, []).append(body)
            continue
        q.exact += _nws(body) == _nws(source)
        for k in range(s, e + 1):
            seen[k] += 1
    for k, parts in pieces.items():  # the pieces of a cut line: exact if they join back to it, the line seen once
        if _nws("".join(parts)) == _nws(lines[k - 1]):
            q.exact += len(parts)
        seen[k] += 1
    for k, line in enumerate(lines, start=1):
        if line.strip():
            q.lines += 1
            q.once += seen[k] == 1
            q.twice += seen[k] > 1


def quality(files: list[tuple[str, str]], budget: int, ac_size: int | None) -> dict[str, Quality]:
    out = {"ours": Quality()}
    for path, text in files:
        chunks = ours_full(path, text, budget)
        measure(out["ours"], text, [(c.metadata["start_line"], c.metadata["end_line"], c.text,
                                     bool(c.metadata["flags"]), "partial_line" in c.metadata["flags"])
                                    for c in chunks])
    if ac_size is not None:
        builder = astchunk_builder(ac_size)
        out["astchunk"] = Quality()
        for _, text in files:
            windows = builder.chunkify(text)
            measure(out["astchunk"], text, [(w["metadata"]["start_line_no"] + 1, w["metadata"]["end_line_no"] + 1,
                                             w["content"], False, False) for w in windows])
    return out


def nws_per_token(files: list[tuple[str, str]]) -> float:
    nws = sum(len(_nws(t)) for _, t in files)
    return nws / max(1, sum(tokens.count(t) for _, t in files))


def part_a(args: argparse.Namespace) -> None:
    files = corpus(args.sample)
    n_lines = sum(len(split_lines(t)) for _, t in files)
    tokens.line_prefix_counts("warm\n", 1)  # encoder and byte-length table built outside the timing
    ratio = nws_per_token(files)
    ac_size = round(args.budget * ratio)
    try:
        builder = astchunk_builder(ac_size)
    except ImportError:
        builder = None
        print("astchunk is not installed: .venv/bin/pip install astchunk")
    print(f"corpus: {len(files)} stdlib files, {n_lines} lines; budget {args.budget} cl100k tokens "
          f"= {ac_size} non-whitespace chars for astchunk ({ratio:.2f} per token)")
    runs: dict[str, list[float]] = {"ours core": [], "ours full": [], "astchunk": []}
    for _ in range(args.repeats):  # alternating rounds: drift in the machine's load hits all alike
        runs["ours core"].append(timed(lambda p, t: ours_core(t, args.budget), files))
        runs["ours full"].append(timed(lambda p, t: ours_full(p, t, args.budget), files))
        if builder is not None:
            runs["astchunk"].append(timed(lambda p, t: builder.chunkify(t), files))
    print("\n| chunker | CPU s (median) | lines/s | rounds (s) |\n|---|---|---|---|")
    for name, secs in runs.items():
        if secs:
            med = statistics.median(secs)
            print(f"| {name} | {med:.2f} | {n_lines / med:,.0f} | {', '.join(f'{s:.2f}' for s in secs)} |")
    q = quality(files, args.budget, ac_size if builder is not None else None)
    print("\n| chunker | chunks | tokens median | p95 | max | over budget | parseable | parseable (no clause rule) "
          "| flagged | parseable (unflagged) | lines once | lines twice+ | text = source lines |\n" + "|---" * 13 + "|")
    for name, stats in q.items():
        print(stats.row(name, args.budget))


# -- (c) embedding throughput -------------------------------------------------------------------


def _timed_call(fn: Any) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads): on a shared machine CPU time is steadier."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def part_c(n_chunks: int, budget: int) -> None:
    """Chunks/s: the bare encoder, the embedder as before (slices of 128 in file order), the embedder now
    (length-sorted batches), and memory's replace_files end to end (in-process ZEO), then a re-ingest."""
    import tempfile

    import msgspec
    import ZEO

    from batos.config import load
    from batos.image import Image
    from proto.bodies import memory as M
    from services.memory_weaver.embedder import Embedder
    from services.memory_weaver.weaver import MemoryWeaver

    base = Path(sysconfig.get_paths()["stdlib"])
    results = []
    for pkg in ("email", "http", "logging", "json"):
        for p in sorted((base / pkg).glob("*.py")):
            results.append(chunk_python(decode_python(p.read_bytes()), str(p), budget))
            if sum(len(r.chunks) for r in results) >= n_chunks:
                break
        else:
            continue
        break
    texts = [c.embed_text for r in results for c in r.chunks]
    emb = Embedder().load()
    model = emb._model
    emb.embed(texts[:8])  # warm up
    rows: list[tuple[str, int, tuple[float, float]]] = []
    bare = _timed_call(lambda: model.encode(texts, batch_size=32, show_progress_bar=False))
    rows.append(("bare encoder (one encode call, truncates at 256 pieces)", len(texts), bare))
    rows.append(("embedder before (slices of 128 in file order)", len(texts),
                 _timed_call(lambda: [emb.embed(texts[i:i + 128]) for i in range(0, len(texts), 128)])))
    rows.append(("embedder now (length-sorted batches)", len(texts), _timed_call(lambda: emb.embed(texts))))

    async def through_memory() -> tuple[tuple[float, float], tuple[float, float], int]:
        with tempfile.TemporaryDirectory() as tmp:
            addr, stop = ZEO.server(path=f"{tmp}/x.fs", blob_dir=f"{tmp}/blobs")
            settings = load(var_dir=Path(tmp) / "var", cache_dir=Path(tmp) / "cache")
            image = await Image(settings, addr=addr).open()
            weaver = MemoryWeaver(image, emb, settings.vector_shard_rows)
            await weaver.start()
            try:
                items = sum(len(r.chunks) + len(r.summaries) for r in results)
                t0, c0 = time.perf_counter(), time.process_time()
                batch: list[dict] = []
                for r in results:  # ingestion's batches (pipeline.BATCH_CHUNKS)
                    batch.append(r.payload(with_context_header=True))
                    if sum(len(b["chunks"]) for b in batch) >= 64:
                        await weaver.replace_files(msgspec.convert({"files": batch}, M.ReplaceFiles))
                        batch = []
                if batch:
                    await weaver.replace_files(msgspec.convert({"files": batch}, M.ReplaceFiles))
                first = time.perf_counter() - t0, time.process_time() - c0
                weaver._recent.clear()  # the re-ingest must find its vectors in the image, not in this cache
                t0, c0 = time.perf_counter(), time.process_time()
                for r in results:  # every file "touched": new file hash, same chunks
                    payload = r.payload(with_context_header=True)
                    payload["file_hash"] += "-touched"
                    await weaver.replace_files(msgspec.convert({"files": [payload]}, M.ReplaceFiles))
                return first, (time.perf_counter() - t0, time.process_time() - c0), items
            finally:
                await weaver.close()
                await image.close()
                stop()

    first, again, items = asyncio.run(through_memory())
    rows.append((f"memory replace_files end to end ({items} chunks+summaries)", items, first))
    rows.append(("re-ingest of touched, unchanged files", items, again))
    rows.append(("bare encoder again (drift check)", len(texts),
                 _timed_call(lambda: model.encode(texts, batch_size=32, show_progress_bar=False))))
    windows = sum(len(emb.windows(t)) for t in texts)
    print(f"\n{len(texts)} chunks from {len(results)} stdlib files, {windows} windows of <=256 pieces")
    print("| path | items | wall s | CPU s | items/s | items per CPU-s | / bare (CPU) |\n|---|---|---|---|---|---|---|")
    bare_rate = len(texts) / bare[1]
    for name, n, (wall, cpu) in rows:
        print(f"| {name} | {n} | {wall:.1f} | {cpu:.1f} | {n / wall:.1f} | {n / cpu:.1f} | {n / cpu / bare_rate:.2f} |")


# -- (b) end to end ----------------------------------------------------------------------------


async def end_to_end(path: str, *, max_chunk_tokens: int | None = None, timeout: float = 3600.0) -> dict[str, Any]:
    """Ingest ``path`` through the running system's ``ingest`` service; the reply plus rates and stages seen."""
    from batos.client import Client

    stages: dict[str, int] = {}
    last: dict[str, Any] = {}

    async def on_event(body: dict[str, Any]) -> None:
        if body.get("event") == "progress":
            stages[body["stage"]] = stages.get(body["stage"], 0) + 1
            last.update(body)

    body: dict[str, Any] = {"path": os.path.abspath(path)}
    if max_chunk_tokens:
        body["max_chunk_tokens"] = max_chunk_tokens
    async with Client() as client:
        start = time.monotonic()
        reply = await client.call("ingest", "ingest", body, on_event=on_event, timeout=timeout)
        wall = time.monotonic() - start
    return {**reply, "wall_s": round(wall, 2), "chunks_per_s": round(reply.get("chunks", 0) / max(wall, 1e-9), 2),
            "progress_events": stages, "last_progress": last}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sample", type=int, default=1, help="take every N-th stdlib file")
    ap.add_argument("--budget", type=int, default=256, help="max chunk tokens (cl100k)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--live", metavar="PATH", help="(b): ingest PATH through the running system")
    ap.add_argument("--embed", type=int, metavar="N", help="(c): embedding throughput on ~N stdlib chunks")
    args = ap.parse_args()
    if args.embed:
        part_c(args.embed, args.budget)
    elif args.live:
        print(asyncio.run(end_to_end(args.live, max_chunk_tokens=args.budget)))
    else:
        part_a(args)


if __name__ == "__main__":
    main()
