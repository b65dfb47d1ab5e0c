"""`verify`: memory checks its own invariants, reports what is wrong, and can repair it.

Invariants of ``root["memory"]`` (store.py's layout):

- files: every chunk and summary of a file entry is live in ``objects`` under its own oid,
  carries the entry's file path, and belongs to that one entry only (an object in two entries,
  or twice in one, is the signature of two objects that got one oid: issue 14);
- summaries: each child chunk belongs to the same file and names this summary as its parent;
  a chunk's parent summary lists it exactly once;
- content: a chunk's ``content_hash`` matches its text (the ingestor hashes path + NUL + text,
  direct writers the text alone), and ``by_hash`` files it under (path, hash);
- objects: every chunk/summary in ``objects`` belongs to a file entry (no orphans);
- counters: ``counts[prototype]`` equals the objects of that prototype, ``vectors.live`` the
  live rows;
- vectors: every live row belongs to a live object whose ``row_of`` is that row, at the object's
  level, holding the object's own embedding; every chunk, summary and fractal has a live row;
  the worker's in-memory matrix has the same live oids as the image;
- history: the audit history's indexes (history_index.py) hold exactly the stored fractals, each
  under its own fields, and each cycle's outcome as its events say.

``suspect_files`` is the cheap structural part (file entries only, objects stay ghosts): the
``file_hashes`` reply gives such files an empty hash, so the next ingest re-sends them and
``replace_file`` rewrites them, instead of calling them unchanged. ``repair`` does the rest:
files that fail get an empty hash (re-ingest rewrites them), orphans are dropped, missing
vector rows are re-added from the object's stored embedding, dead rows tombstoned, counters set,
and history indexes that disagree with the fractals are rebuilt from them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from proto.bodies.memory import Verify, VerifyReply

from . import history_index, store
from .vectors import LEVEL_CHUNK, LEVEL_FRACTAL, LEVEL_SUMMARY, VectorIndex, VectorStore, normalize

VECTOR_PROTOS = {"memory_chunk": LEVEL_CHUNK, "contextual_summary": LEVEL_SUMMARY, "context_fractal": LEVEL_FRACTAL}
FILE_PROTOS = ("memory_chunk", "contextual_summary")
MAX_LISTED = 200  # problems listed in a reply (all are counted)
GC_EVERY = 2000  # objects read between cache trims: a full check must not hold the whole image in RAM
PREFETCH_FILES = 100  # file entries whose objects are fetched in one round trip
VECTOR_TOLERANCE = 1e-3  # a stored row and the object's own embedding agree to float32 rounding


@dataclass
class Report:
    problems: list[dict[str, Any]] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)  # problem kind -> how many
    bad_files: set[str] = field(default_factory=set)
    orphans: list[int] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)
    counters: dict[str, tuple[int, int]] = field(default_factory=dict)  # proto -> (counter, actual)
    dead_rows: list[tuple[int, int]] = field(default_factory=list)  # (row, oid) live rows without their object
    missing_rows: list[int] = field(default_factory=list)  # oids of objects without a live row
    live: tuple[int, int] = (0, 0)  # (vectors.live counter, live rows)
    stale_keys: list[tuple[Any, int]] = field(default_factory=list)  # by_hash pairs of no such object
    history_bad: bool = False  # the history indexes disagree with the fractals: repair rebuilds them

    def add(self, kind: str, detail: str, *, file_path: str | None = None, oid: int | None = None) -> None:
        self.counts[kind] += 1
        if file_path is not None:
            self.bad_files.add(file_path)
        if len(self.problems) < MAX_LISTED:
            item: dict[str, Any] = {"kind": kind, "detail": detail}
            if file_path is not None:
                item["file_path"] = file_path
            if oid is not None:
                item["oid"] = format(oid, "x")
            self.problems.append(item)

    def reply(self) -> VerifyReply:
        return VerifyReply(ok=not self.counts, problems=self.problems, problem_counts=dict(self.counts),
                           bad_files=sorted(self.bad_files), checked=self.checked)


def _oid(obj: Any) -> int:
    return store.oid_int(obj)


def _namer(prototypes: Any) -> Callable[[Any], str]:
    """``batos.uvm.prototype_of`` with the prototype table built once, not once per object."""
    by_id = {id(p): name for name, p in prototypes.items()}

    def name(obj: Any) -> str:
        return next((by_id[id(o)] for o in obj._chain() if id(o) in by_id), "")

    return name


# -- the cheap part: file entries only ------------------------------------------------------


def suspect_files(root: Any, paths: Any = None) -> set[str]:
    """Files (of ``paths``, default all) whose entry is structurally broken: an object shared with
    another of these entries or listed twice, or missing from ``objects``. Reads each FileEntry
    (which ``file_hashes`` does anyway) and BTree buckets; the objects themselves stay ghosts."""
    mem = store.memory(root)
    owners: dict[int, str] = {}
    bad: set[str] = set()
    entries = mem.files.items() if paths is None else ((p, mem.files[p]) for p in paths if p in mem.files)
    for path, entry in entries:
        objs = (*entry.summaries, *entry.chunks)
        if len({_oid(o) for o in objs}) != len(objs):  # an object listed twice
            bad.add(path)
        for obj in objs:
            oid = _oid(obj)
            other = owners.setdefault(oid, path)
            if other != path or mem.objects.get(oid) is not obj:
                bad.update((path, other))
    return bad


def file_is_broken(root: Any, entry: Any) -> bool:
    """One file's own invariants, cheaply (its objects are loaded anyway when it is rewritten):
    each object live under its oid, listed once, of this file, and summary/chunk links inside it.
    Catches both sides of a cross-link: the entry whose object was overwritten holds an object of
    another file; the other's rewrite (store._remove_file_objects) leaves that object alone."""
    mem = store.memory(root)
    objs = (*entry.summaries, *entry.chunks)
    own = {_oid(o) for o in objs}
    if len(own) != len(objs):
        return True
    for obj in objs:
        meta = obj.get_slot("metadata") or {}
        if mem.objects.get(_oid(obj)) is not obj or meta.get("file_path") != entry.file_path:
            return True
        parent = obj.get_slot("parent_summary")
        kids = obj.get_slot("child_chunks") or ()
        if (parent is not None and _oid(parent) not in own) or any(_oid(k) not in own for k in kids):
            return True
    return False


# -- the full check -------------------------------------------------------------------------


def check(root: Any, conn: Any = None, index: VectorIndex | None = None) -> Report:
    """Every invariant above, in the caller's (read) transaction."""
    mem = store.memory(root)
    protos = _namer(root["prototypes"])
    rep = Report()
    owner: dict[int, str] = {}
    batch: list[tuple[str, Any]] = []
    for n, item in enumerate(mem.files.items(), start=1):
        batch.append(item)
        if len(batch) == PREFETCH_FILES or n == len(mem.files):
            if conn is not None:  # one round trip for a batch of files' objects, not one per object
                conn.prefetch(o for _, e in batch for o in (*e.summaries, *e.chunks))
            for path, entry in batch:
                _check_file(rep, mem, protos, path, entry, owner)
            batch = []
            if conn is not None:
                conn.cacheGC()
    actual: Counter = Counter()
    vector_oids: dict[int, tuple[int, Any]] = {}
    for n, (oid, obj) in enumerate(mem.objects.items()):
        proto = protos(obj)
        actual[proto] += 1
        if _oid(obj) != oid:
            rep.add("object_misfiled", f"objects[{oid:x}] holds the object with oid {_oid(obj):x}", oid=oid)
        if proto in FILE_PROTOS and oid not in owner:
            rep.orphans.append(oid)
            file_path = (obj.get_slot("metadata") or {}).get("file_path")
            rep.add("orphan", f"a {proto} that no file entry lists (file {file_path!r})", oid=oid)
        if proto in VECTOR_PROTOS:
            vector_oids[oid] = (VECTOR_PROTOS[proto], obj.get_slot("vector_embedding"))
        if conn is not None and n % GC_EVERY == GC_EVERY - 1:
            conn.cacheGC()
    for proto, counter in mem.counts.items():
        rep.counters[proto] = (counter(), actual.get(proto, 0))
    for proto, n in actual.items():
        rep.counters.setdefault(proto, (0, n))
    for proto, (said, real) in sorted(rep.counters.items()):
        if said != real:
            rep.add("counter", f"counts[{proto!r}] says {said}, {real} objects exist")
    _check_key_sets(rep, mem)
    for problem in history_index.problems(mem.history, mem.fractals_by_event.values()):
        rep.history_bad = True
        rep.add("history_index", problem)
    _check_vectors(rep, mem.vectors, vector_oids, owner)
    if index is not None:
        _check_index(rep, mem.vectors, index)
    rep.checked = {"files": len(mem.files), "objects": sum(actual.values()), "vector_rows": mem.vectors.total_rows,
                   **{f"objects.{k}": v for k, v in sorted(actual.items())}}
    return rep


def _check_file(rep: Report, mem: Any, protos: Any, path: str, entry: Any, owner: dict[int, str]) -> None:
    own = {_oid(o) for o in (*entry.summaries, *entry.chunks)}
    here: set[int] = set()
    for kind, objs, proto in (("summary", entry.summaries, "contextual_summary"),
                              ("chunk", entry.chunks, "memory_chunk")):
        for obj in objs:
            oid = _oid(obj)
            if oid in here:
                rep.add("listed_twice", f"{kind} {oid:x} is listed twice", file_path=path, oid=oid)
                continue
            here.add(oid)
            other = owner.setdefault(oid, path)
            if other != path:
                rep.add("shared_object", f"{kind} {oid:x} is listed by {other!r} too", file_path=path, oid=oid)
                rep.bad_files.add(other)
                continue
            if mem.objects.get(oid) is not obj:
                rep.add("not_live", f"{kind} {oid:x} is not in the objects index", file_path=path, oid=oid)
            real = protos(obj)
            if real != proto:
                rep.add("wrong_kind", f"the entry lists {oid:x} as a {kind}, it is a {real or 'plain object'}",
                        file_path=path, oid=oid)
                continue
            meta = obj.get_slot("metadata") or {}
            if meta.get("file_path") != path:
                rep.add("wrong_file", f"{kind} {oid:x} says it belongs to {meta.get('file_path')!r}",
                        file_path=path, oid=oid)
            if proto == "memory_chunk":
                _check_chunk(rep, mem, path, obj, oid, meta, own)
            else:
                _check_summary(rep, path, obj, oid, own)


def _check_chunk(rep: Report, mem: Any, path: str, obj: Any, oid: int, meta: dict, own: set[int]) -> None:
    text = obj.get_slot("source_text") or ""
    h = meta.get("content_hash")
    if h not in (store.text_hash(text), store.text_hash(f"{path}\0{text}")):
        rep.add("content_hash", f"chunk {oid:x}: content_hash does not match its text", file_path=path, oid=oid)
    key = getattr(obj, "_key_hash", None)
    if key is None or (key, oid) not in mem.by_hash:
        rep.add("hash_index", f"chunk {oid:x} is not filed under its content hash", file_path=path, oid=oid)
    parent = obj.get_slot("parent_summary")
    if parent is not None:
        if _oid(parent) not in own:
            rep.add("parent", f"chunk {oid:x}'s summary {_oid(parent):x} is not this file's", file_path=path, oid=oid)
        elif sum(1 for c in parent.get_slot("child_chunks") or () if c is obj) != 1:
            rep.add("parent", f"chunk {oid:x} is not listed once by its summary {_oid(parent):x}",
                    file_path=path, oid=oid)


def _check_summary(rep: Report, path: str, obj: Any, oid: int, own: set[int]) -> None:
    for child in obj.get_slot("child_chunks") or ():
        coid = _oid(child)
        if coid not in own:
            rep.add("child", f"summary {oid:x} lists chunk {coid:x} of another file", file_path=path, oid=oid)
        elif child.get_slot("parent_summary") is not obj:
            rep.add("child", f"summary {oid:x} lists chunk {coid:x}, whose parent is another summary",
                    file_path=path, oid=oid)


def _check_key_sets(rep: Report, mem: Any) -> None:
    """Every (key, oid) in by_hash names a live object filed under that key (a stale pair makes
    ingestion skip a chunk as "already there")."""
    for key, oid in mem.by_hash.keys():
        obj = mem.objects.get(oid)
        if obj is None or getattr(obj, "_key_hash", None) != key:
            rep.stale_keys.append((key, oid))
            rep.add("stale_hash_key", f"by_hash files {oid:x} under {key[0]!r}, which "
                    + ("is not live" if obj is None else "has another key"), file_path=key[0], oid=oid)


def _rows(vs: VectorStore) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
    """(oid, level, alive) of every global row, and each shard's vectors, read from the image."""
    oids = np.zeros(vs.total_rows, dtype=np.uint64)
    levels = np.zeros(vs.total_rows, dtype=np.uint8)
    alive = np.zeros(vs.total_rows, dtype=bool)
    vectors = []
    for shard in vs.shards:
        base = shard.index * vs.shard_rows
        at = base
        parts = []
        for seg in shard.segments:
            v, o, lv = seg.arrays(vs.dim)
            oids[at:at + seg.n], levels[at:at + seg.n] = o, lv
            parts.append(v)
            at += seg.n
        alive[base:base + shard.nrows] = True
        for dead in shard.dead:
            alive[base + dead] = False
        vectors.append(np.concatenate(parts) if parts else np.zeros((0, vs.dim), dtype=np.float32))
    return oids, levels, alive, vectors


def _check_vectors(rep: Report, vs: VectorStore, vector_oids: dict[int, tuple[int, Any]],
                   owner: dict[int, str]) -> None:
    oids, levels, alive, shard_vectors = _rows(vs)
    live_rows = np.flatnonzero(alive)
    rep.live = (vs.live(), int(live_rows.size))
    if vs.live() != live_rows.size or live_rows.size != len(vs.row_of):
        rep.add("live_counter", f"vectors.live says {vs.live()}, {live_rows.size} rows are live, "
                f"row_of maps {len(vs.row_of)} oids")
    for row in live_rows.tolist():
        oid = int(oids[row])
        if oid not in vector_oids or vs.row_of.get(oid) != row:
            rep.dead_rows.append((row, oid))
            rep.add("row_without_object", f"live vector row {row} belongs to {oid:x}, which "
                    + ("is not a live object" if oid not in vector_oids else "has another row"),
                    file_path=owner.get(oid), oid=oid)
    for oid, (level, emb) in vector_oids.items():
        row = vs.row_of.get(oid)
        if row is None or row >= alive.size or not alive[row]:
            rep.missing_rows.append(oid)
            rep.add("object_without_row", f"object {oid:x} has no live vector row", file_path=owner.get(oid), oid=oid)
            continue
        if int(oids[row]) != oid or int(levels[row]) != level:
            rep.add("row_mismatch", f"row {row} of object {oid:x} holds {int(oids[row]):x} at level "
                    f"{int(levels[row])}", file_path=owner.get(oid), oid=oid)
            continue
        if emb:
            stored = shard_vectors[row // vs.shard_rows][row % vs.shard_rows]
            own = normalize(np.frombuffer(emb, dtype=np.float32))[0]
            if own.shape != stored.shape or float(np.abs(own - stored).max()) > VECTOR_TOLERANCE:
                rep.add("vector_mismatch", f"row {row} does not hold object {oid:x}'s embedding",
                        file_path=owner.get(oid), oid=oid)


def _check_index(rep: Report, vs: VectorStore, index: VectorIndex) -> None:
    """The worker's in-memory matrix (refreshed by the caller) against the image."""
    with index.lock:
        mem_oids = {int(o) for o in index.oids[: index.rows][index.alive[: index.rows]]}
    image_oids = {int(o) for o in vs.row_of.keys()}
    if mem_oids != image_oids:
        rep.add("index", f"the in-memory vector index has {len(mem_oids - image_oids)} live oids the image "
                f"lacks and lacks {len(image_oids - mem_oids)}")


# -- repair ---------------------------------------------------------------------------------


def repair(root: Any, rep: Report) -> dict[str, int]:
    """Fix what ``rep`` found, in the caller's write transaction; returns what was done."""
    mem = store.memory(root)
    protos = _namer(root["prototypes"])
    vs = mem.vectors
    marked = 0
    for path in sorted(rep.bad_files):
        entry = mem.files.get(path)
        if entry is not None and entry.file_hash:
            entry.file_hash = ""  # the next ingest re-sends the file and replace_file rewrites it
            marked += 1
    dropped = 0
    for oid in rep.orphans:
        obj = mem.objects.get(oid)
        if obj is not None:
            store._unindex(mem, obj, protos(obj))
            vs.remove([oid])
            dropped += 1
    for row, oid in rep.dead_rows:  # live rows of no live object, or of an object that has another row
        if vs.row_of.get(oid) == row:
            del vs.row_of[oid]
    vs.tombstone_rows([row for row, _ in rep.dead_rows])
    for pair in rep.stale_keys:
        if pair in mem.by_hash:
            mem.by_hash.remove(pair)
    readded = 0
    for oid in rep.missing_rows:
        obj = mem.objects.get(oid)
        level = VECTOR_PROTOS.get(protos(obj)) if obj is not None else None
        emb = obj.get_slot("vector_embedding") if obj is not None else None
        if level is None or not emb:
            continue
        vs.append(np.frombuffer(emb, dtype=np.float32)[None, :], [oid], [level], [store.lex_doc(obj, level)])
        readded += 1
    counted: Counter = Counter(protos(o) for o in mem.objects.values())
    fixed = 0
    for proto in set(counted) | set(mem.counts.keys()):
        counter = mem.counts.get(proto)
        if counter is None or counter() != counted.get(proto, 0):
            store._count(mem, proto, counted.get(proto, 0) - (counter() if counter is not None else 0))
            fixed += 1
    live = sum(1 for _ in vs.row_of.keys())
    if vs.live() != live:
        vs.live.set(live)
        fixed += 1
    rebuilt = mem.history.rebuild(mem.fractals_by_event.values()) if rep.history_bad else 0
    return {"files_marked": marked, "orphans_dropped": dropped, "rows_tombstoned": len(rep.dead_rows),
            "rows_readded": readded, "counters_fixed": fixed,
            "stale_keys_removed": len(rep.stale_keys), "history_reindexed": rebuilt}


# -- the command ----------------------------------------------------------------------------


async def run(weaver: Any, req: Verify) -> VerifyReply:
    """The `verify` command: ``{"repair": bool}``. Checks in a read transaction on the search lane
    (so the in-memory index is compared with the same snapshot), repairs in a write transaction
    that checks again first, then reports the state after."""
    lane = weaver._search_lane()

    def read(root: Any, conn: Any) -> Report:
        weaver._refresh(root)
        return check(root, conn, weaver.index)

    rep = await weaver.image.read(read, lane=lane)
    out = rep.reply()
    if req.repair and not out.ok:
        def fix(root: Any, conn: Any) -> dict[str, int]:
            return repair(root, check(root, conn))

        out.repaired = await weaver._write(fix)
        after = (await weaver.image.read(read, lane=lane)).reply()
        out.after = {"ok": after.ok, "problem_counts": after.problem_counts, "bad_files": after.bad_files}
    return out


def file_hashes_marking_suspects(root: Any, hashes: dict[str, str]) -> dict[str, str]:
    """``file_hashes`` with an empty hash for structurally broken files (ingest re-sends them).
    Only the files asked about are read; a file's own checks (``file_is_broken``) run again when
    it is sent, which catches the other side of a link to a file outside them."""
    for path in suspect_files(root, list(hashes)):
        hashes[path] = ""
    return hashes


__all__ = ["Report", "check", "file_hashes_marking_suspects", "file_is_broken", "repair", "run", "suspect_files"]
