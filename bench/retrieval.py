"""Retrieval benchmark, CodeSearchNet-style, on code nobody here wrote.

For each codebase (stdlib packages; sdists fetched by pip at run time with ``--pypi``), every
docstring in every file is blanked first (its first line becomes ``...``, the rest blank lines, so line
numbers stay put and no answer can be copied). Queries are the first paragraph of the docstrings of
functions and methods (not nested in functions, not dunders, no ``test*``, at least 3 words and 3 lines
of code; a docstring shared by two functions is dropped), at most ``--max-queries`` per codebase,
sampled with a fixed seed. Gold: any chunk of the same file overlapping the function's lines.

Methods, all over the same blanked files, in the same run, with the same MiniLM embedder (BAT OS's
``Embedder``: windows for long texts) and the same 256-token budget:
- ``per-function``: one chunk per function/method (decorators to end); the code between them
  line-packed; dense. The baseline of the targets.
- ``line-packing``: greedy runs of whole lines within the budget; dense.
- ``astchunk``: the ``astchunk`` package (tree-sitter), budget converted to its non-whitespace characters.
- ``BM25``: the per-function chunks, BM25 with BAT OS's code-aware tokens.
- ``batos <mode>``: BAT OS's real path: ``chunk_python`` on each file, ``MemoryWeaver.replace_files``
  into an in-process ZEO server, ``MemoryWeaver.search`` with ``level=chunks`` in each mode.
Embeddings are cached by text hash under ``--cache`` (default /tmp/batos-bench-retrieval) so reruns
only embed what changed.

    .venv/bin/python bench/retrieval.py                         # email + http, 150 queries each
    .venv/bin/python bench/retrieval.py --codebases email,logging --pypi requests==2.32.3
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import contextlib
import hashlib
import os
import random
import re
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from services.ingestor.chunker import chunk_python
from services.ingestor.source import Source
from services.memory_weaver.lexical import LexDoc, LexicalIndex

BUDGET = 256
TOP = 10
SKIP_DIRS = {"test", "tests", "testing", "docs", "doc", "examples", "__pycache__", "idlelib", "site-packages"}


# -- corpus ------------------------------------------------------------------------------------


def stdlib_files(pkg: str) -> list[tuple[str, str]]:
    base = Path(sysconfig.get_paths()["stdlib"])
    return _py_files(base / pkg, base)


def pypi_files(spec: str, tmp: Path) -> list[tuple[str, str]]:
    """The package's .py files from its sdist, downloaded by pip (no binaries, no dependencies)."""
    dest = tmp / "sdist"
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d",
                    str(dest), spec], check=True)
    archive = next(dest.iterdir())
    with tarfile.open(archive) as tf:
        tf.extractall(tmp / "src", filter="data")
    top = next((tmp / "src").iterdir())
    name = re.split(r"[=<>\[]", spec)[0].replace("-", "_").lower()
    for cand in (top / "src" / name, top / name):
        if cand.is_dir():
            return _py_files(cand, cand.parent)
    return _py_files(top, top)


def _py_files(root: Path, rel_to: Path) -> list[tuple[str, str]]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for f in sorted(filenames):
            if f.endswith(".py"):
                p = Path(dirpath) / f
                out.append((str(p.relative_to(rel_to)), p.read_text(encoding="utf-8", errors="replace")))
    return out


@dataclass
class Query:
    path: str
    qualname: str
    start: int
    end: int
    text: str


DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _docstring_node(node: ast.AST) -> ast.Expr | None:
    body = getattr(node, "body", None)
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        return body[0]
    return None


def blank_docstrings(text: str) -> tuple[str, dict[int, str]]:
    """``text`` with every docstring replaced by ``...`` (same line count), and the docstrings blanked,
    by the line of the node that owned them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tree = ast.parse(text)
    lines = text.split("\n")
    blanked: dict[int, str] = {}
    for node in ast.walk(tree):
        if not isinstance(node, DOCUMENTED):
            continue
        ds = _docstring_node(node)
        if ds is None or ds.end_lineno is None or ds.end_col_offset is None:
            continue
        first, last = lines[ds.lineno - 1], lines[ds.end_lineno - 1]
        if first[:ds.col_offset].strip() or last[ds.end_col_offset:].strip():
            continue  # shares a line with code: left alone (and not used as a query)
        lines[ds.lineno - 1] = first[:ds.col_offset] + "..."
        for i in range(ds.lineno, ds.end_lineno):
            lines[i] = ""
        blanked[getattr(node, "lineno", 0)] = ds.value.value  # type: ignore[union-attr]
    return "\n".join(lines), blanked


def _defs(body: list[ast.stmt], prefix: str = "") -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Functions and methods not nested in a function, with qualified names."""
    out: list[tuple[str, Any]] = []
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.append((prefix + node.name, node))
        elif isinstance(node, ast.ClassDef):
            out.extend(_defs(node.body, prefix + node.name + "."))
    return out


def def_start(node: ast.AST) -> int:
    decorators = getattr(node, "decorator_list", None) or []
    return min([node.lineno, *(d.lineno for d in decorators)])  # type: ignore[attr-defined]


def first_paragraph(doc: str) -> str:
    para = re.split(r"\n\s*\n", doc.strip(), maxsplit=1)[0]
    return " ".join(para.split())


def queries_of(path: str, original: str, docs: dict[int, str]) -> list[Query]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tree = ast.parse(original)
    out = []
    for qual, node in _defs(tree.body):
        name = node.name
        if name.startswith("test") or (name.startswith("__") and name.endswith("__")):
            continue
        doc = docs.get(node.lineno)
        if not doc:
            continue
        text = first_paragraph(doc)
        ds = _docstring_node(node)
        code_lines = (node.end_lineno or node.lineno) - node.lineno + 1 - ((ds.end_lineno - ds.lineno + 1) if ds else 0)
        if len(text.split()) < 3 or code_lines < 3:
            continue
        out.append(Query(path, qual, node.lineno, node.end_lineno or node.lineno, text[:400]))
    return out


@dataclass
class Codebase:
    name: str
    files: list[tuple[str, str]]  # (path, blanked text)
    queries: list[Query]


def prepare(name: str, raw: list[tuple[str, str]], max_queries: int) -> Codebase:
    files, queries = [], []
    for path, text in raw:
        try:
            blanked, docs = blank_docstrings(text)
            ast.parse(blanked)
        except (SyntaxError, ValueError):
            continue
        files.append((path, blanked))
        queries.extend(queries_of(path, text, docs))
    counts: dict[str, int] = {}
    for q in queries:
        counts[q.text] = counts.get(q.text, 0) + 1
    queries = [q for q in queries if counts[q.text] == 1]
    if len(queries) > max_queries:
        queries = random.Random(0).sample(queries, max_queries)
    return Codebase(name, files, queries)


# -- chunkers ----------------------------------------------------------------------------------

Chunk = tuple[str, int, int, str]  # path, start, end, text


def line_packing(path: str, text: str) -> list[Chunk]:
    src = Source(text)
    return [(path, s.start, s.end, s.text) for s in src.windows(1, src.n, BUDGET)]


def per_function(path: str, text: str) -> list[Chunk]:
    src = Source(text)
    tree = ast.parse(text)
    spans = sorted((def_start(n), n.end_lineno or n.lineno) for _, n in _defs(tree.body))
    out: list[Chunk] = []
    line = 1
    for start, end in spans:
        if start > line:
            out.extend((path, s.start, s.end, s.text) for s in src.windows(line, start - 1, BUDGET))
        out.append((path, start, end, src.text_of(start, end)))
        line = end + 1
    if line <= src.n:
        out.extend((path, s.start, s.end, s.text) for s in src.windows(line, src.n, BUDGET))
    return [c for c in out if c[3].strip()]


def astchunk_chunker(files: list[tuple[str, str]]) -> Any:
    from batos import tokens

    sys.path.append("/tmp/bench_pkgs")  # where `pip install --target /tmp/bench_pkgs astchunk` put it
    try:
        from astchunk import ASTChunkBuilder
    except ImportError:
        return None
    nonws = sum(len(re.sub(r"\s", "", t)) for _, t in files)
    toks = sum(tokens.count(t) for _, t in files)
    builder = ASTChunkBuilder(max_chunk_size=int(BUDGET * nonws / toks), language="python",
                              metadata_template="default")

    def chunk(path: str, text: str) -> list[Chunk]:
        out = []
        for w in builder.chunkify(text):
            m = w["metadata"]
            out.append((path, m["start_line_no"] + 1, m["end_line_no"] + 1, w["content"]))
        return out

    return chunk


# -- embedding with a disk cache ---------------------------------------------------------------


class CachedEmbedder:
    """BAT OS's Embedder behind a cache keyed by text hash (the bench reruns embed only what changed)."""

    def __init__(self, cache_dir: Path):
        from services.memory_weaver.embedder import Embedder

        self.inner = Embedder()
        self.dim = self.inner.dim
        self.path = cache_dir / "minilm.npz"
        self.store: dict[str, tuple[np.ndarray, int]] = {}
        self.embedded = 0
        self.seconds = 0.0
        if self.path.exists():
            data = np.load(self.path)
            for k, v, w in zip(data["keys"], data["vecs"], data["windows"], strict=True):
                self.store[str(k)] = (v, int(w))

    def embed(self, texts: list[str], cancelled: Any = None) -> tuple[np.ndarray, list[int]]:
        keys = [hashlib.sha256(t.encode("utf-8", "surrogatepass")).hexdigest() for t in texts]
        todo = {k: t for k, t in zip(keys, texts, strict=True) if k not in self.store}
        if todo:
            t0 = time.perf_counter()
            vecs, windows = self.inner.embed(list(todo.values()), cancelled)
            self.seconds += time.perf_counter() - t0
            self.embedded += len(todo)
            for k, v, w in zip(todo, vecs, windows, strict=True):
                self.store[k] = (v, w)
        out = np.stack([self.store[k][0] for k in keys]) if keys else np.zeros((0, self.dim), np.float32)
        return out.astype(np.float32), [self.store[k][1] for k in keys]

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = list(self.store)
        np.savez(self.path, keys=np.asarray(keys), vecs=np.stack([self.store[k][0] for k in keys]),
                 windows=np.asarray([self.store[k][1] for k in keys]))


# -- scoring -----------------------------------------------------------------------------------


@dataclass
class Score:
    method: str
    chunks: int
    ranks: list[int | None] = field(default_factory=list)  # rank of the first gold hit, None if not in top

    @property
    def recall(self) -> float:
        return sum(r is not None for r in self.ranks) / max(len(self.ranks), 1)

    @property
    def mrr(self) -> float:
        return sum(1.0 / r for r in self.ranks if r is not None) / max(len(self.ranks), 1)

    @property
    def r1(self) -> float:
        return sum(r == 1 for r in self.ranks) / max(len(self.ranks), 1)


def first_gold(q: Query, hits: list[tuple[str, int, int]]) -> int | None:
    for i, (path, start, end) in enumerate(hits[:TOP], start=1):
        if path == q.path and start <= q.end and end >= q.start:
            return i
    return None


def dense_method(name: str, chunks: list[Chunk], cb: Codebase, emb: CachedEmbedder, qvecs: np.ndarray) -> Score:
    vecs, _ = emb.embed([c[3] for c in chunks])
    sims = qvecs @ vecs.T
    score = Score(name, len(chunks))
    for q, row in zip(cb.queries, sims, strict=True):
        top = np.argsort(-row, kind="stable")[:TOP]
        score.ranks.append(first_gold(q, [chunks[i][:3] for i in top]))
    return score


def bm25_method(chunks: list[Chunk], cb: Codebase) -> Score:
    lex = LexicalIndex()
    for i, c in enumerate(chunks):
        lex.add(i, LexDoc(c[0], "", c[3]))
    score = Score("BM25 (per-function)", len(chunks))
    for q in cb.queries:
        s = lex.scores(q.text, len(chunks))
        top = [i for i in np.argsort(-s, kind="stable")[:TOP] if s[i] > 0]
        score.ranks.append(first_gold(q, [chunks[i][:3] for i in top]))
    return score


async def batos_methods(cb: Codebase, emb: CachedEmbedder, tmp: Path, modes: list[str]) -> tuple[list[Score], dict]:
    import msgspec
    import ZEO

    from batos.config import load
    from batos.image import Image
    from proto.bodies import memory as M
    from services.memory_weaver.weaver import MemoryWeaver

    t0 = time.perf_counter()
    results = [chunk_python(text, path, BUDGET) for path, text in cb.files]
    chunk_s = time.perf_counter() - t0
    n_chunks = sum(len(r.chunks) for r in results)
    addr, stop = ZEO.server(path=str(tmp / "image.fs"), blob_dir=str(tmp / "blobs"))
    settings = load(var_dir=tmp / "var", cache_dir=tmp / "cache")
    image = await Image(settings, addr=addr).open()
    weaver = MemoryWeaver(image, emb, settings.vector_shard_rows)
    info: dict[str, Any] = {"chunk_s": chunk_s}
    try:
        await weaver.start()
        t0 = time.perf_counter()
        batch: list[dict] = []
        for r in results:
            batch.append(r.payload(with_context_header=True))
            if sum(len(p["chunks"]) + len(p["summaries"]) for p in batch) > 400:
                await weaver.replace_files(msgspec.convert({"files": batch}, M.ReplaceFiles))
                batch = []
        if batch:
            await weaver.replace_files(msgspec.convert({"files": batch}, M.ReplaceFiles))
        info["store_s"] = time.perf_counter() - t0
        scores = []
        for variant in modes:
            mode, params = parse_variant(variant)
            score = Score(f"batos {variant}", n_chunks)
            t0 = time.perf_counter()
            with tuned(params):
                for q in cb.queries:
                    hits = await weaver.search(M.Search(text=q.text, k=TOP, level="chunks", mode=mode))
                    spans = [(h["metadata"]["file_path"], h["metadata"]["start_line"], h["metadata"]["end_line"])
                             for h in hits]
                    score.ranks.append(first_gold(q, spans))
            info[f"search_ms_{variant}"] = 1000 * (time.perf_counter() - t0) / max(len(cb.queries), 1)
            scores.append(score)
    finally:
        await weaver.close()
        await image.close()
        stop()
    return scores, info


def parse_variant(variant: str) -> tuple[str, dict[str, float]]:
    """``hybrid[NAME_BONUS=0,RRF_K=20,dense=2]``: a mode and hybrid.py settings to try (names in
    WEIGHTS set a channel's weight)."""
    m = re.fullmatch(r"(\w+)(?:\[(.*)\])?", variant)
    if m is None:
        raise SystemExit(f"bad mode variant {variant!r}")
    params = dict(kv.split("=", 1) for kv in (m.group(2) or "").split(",") if kv)
    return m.group(1), {k: float(v) for k, v in params.items()}


@contextlib.contextmanager
def tuned(params: dict[str, float]) -> Any:
    from services.memory_weaver import hybrid

    saved = {k: getattr(hybrid, k) for k in params if hasattr(hybrid, k)}
    weights = dict(hybrid.WEIGHTS)
    for k, v in params.items():
        if k in hybrid.WEIGHTS:
            hybrid.WEIGHTS[k] = v
        elif k in saved:
            setattr(hybrid, k, type(saved[k])(v))
        else:
            raise SystemExit(f"hybrid.py has no setting {k}")
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(hybrid, k, v)
        hybrid.WEIGHTS.clear()
        hybrid.WEIGHTS.update(weights)


# -- main --------------------------------------------------------------------------------------


def report(cb: Codebase, scores: list[Score], base_name: str) -> None:
    base = next(s for s in scores if s.method == base_name)
    print(f"\n## {cb.name}: {len(cb.files)} files, {len(cb.queries)} queries")
    print("| method | chunks | R@1 | R@10 | MRR@10 | R@10 - base | R@10 / base | MRR / base |")
    print("|---|---|---|---|---|---|---|---|")
    for s in scores:
        print(f"| {s.method} | {s.chunks} | {s.r1:.3f} | {s.recall:.3f} | {s.mrr:.3f} | {s.recall - base.recall:+.3f} "
              f"| {s.recall / max(base.recall, 1e-9):.3f} | {s.mrr / max(base.mrr, 1e-9):.3f} |")


def run_codebase(cb: Codebase, emb: CachedEmbedder, modes: list[str], baselines: bool) -> list[Score]:
    qvecs, _ = emb.embed([q.text for q in cb.queries])
    scores: list[Score] = []
    pf = [c for path, text in cb.files for c in per_function(path, text)]
    if baselines:
        scores.append(dense_method("per-function", pf, cb, emb, qvecs))
        emb.save()
        lp = [c for path, text in cb.files for c in line_packing(path, text)]
        scores.append(dense_method("line-packing", lp, cb, emb, qvecs))
        emb.save()
        chunker = astchunk_chunker(cb.files)
        if chunker is None:
            print("astchunk is not importable (pip install --target /tmp/bench_pkgs astchunk): row left out")
        else:
            ac = [c for path, text in cb.files for c in chunker(path, text)]
            scores.append(dense_method("astchunk", ac, cb, emb, qvecs))
            emb.save()
        scores.append(bm25_method(pf, cb))
    with tempfile.TemporaryDirectory() as tmp:
        batos, info = asyncio.run(batos_methods(cb, emb, Path(tmp), modes))
    emb.save()
    scores.extend(batos)
    print(f"[{cb.name}] batos: chunking {info['chunk_s']:.1f} s, storing {info['store_s']:.1f} s, search ms/query "
          + ", ".join(f"{m} {info[f'search_ms_{m}']:.1f}" for m in modes), flush=True)
    return scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codebases", default="email,http", help="stdlib packages, comma-separated")
    ap.add_argument("--pypi", default="", help="sdists to fetch with pip, comma-separated (e.g. requests==2.32.3)")
    ap.add_argument("--max-queries", type=int, default=150)
    ap.add_argument("--modes", default="hybrid,dense,lexical",
                    help="BAT OS search modes, each optionally with hybrid.py settings: hybrid[NAME_BONUS=0]")
    ap.add_argument("--no-baselines", action="store_true", help="only BAT OS's rows (faster iteration)")
    ap.add_argument("--cache", default=os.environ.get("BATOS_BENCH_CACHE", "/tmp/batos-bench-retrieval"))
    args = ap.parse_args()
    emb = CachedEmbedder(Path(args.cache))
    modes = re.findall(r"\w+(?:\[[^\]]*\])?", args.modes)
    sources: list[tuple[str, list[tuple[str, str]]]] = [(n, stdlib_files(n)) for n in args.codebases.split(",") if n]
    with tempfile.TemporaryDirectory() as tmp:
        for spec in (s for s in args.pypi.split(",") if s):
            where = Path(tmp) / re.sub(r"\W", "_", spec)
            where.mkdir()
            sources.append((spec, pypi_files(spec, where)))
    t_start = time.perf_counter()
    for name, raw in sources:
        cb = prepare(name, raw, args.max_queries)
        scores = run_codebase(cb, emb, modes, not args.no_baselines)
        report(cb, scores, "per-function" if not args.no_baselines else scores[0].method)
    print(f"\nembedded {emb.embedded} new texts in {emb.seconds:.0f} s; total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
