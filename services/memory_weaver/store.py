"""Memory objects and their BTree indexes inside the Living Image.

Every function here runs inside a ZODB transaction on a connection-owning thread
(``Image.transact``/``read``); none of them commits. Layout, under ``root["memory"]``:

- ``objects``      LOBTree  oid -> every live MemoryChunk / ContextualSummary / ContextFractal / blob
- ``files``        OOBTree  file_path -> FileEntry (file hash, its summaries and chunks)
- ``by_node_name`` / ``by_node_type`` / ``by_hash`` ((file_path, content hash): a chunk is its
  text *at a place*, and keys clustered by file keep a file's inserts in few buckets):
  OOTreeSet of (key, oid) pairs; composite
  keys keep one structure per index instead of one set object per key (a unique content
  hash per chunk would otherwise add a record to every chunk's commit)
- ``counts``       OOBTree  prototype name -> Length (conflict-free counters)
- ``vectors``      VectorStore (append-only shards; see vectors.py)
- ``fractals_by_event`` OOBTree  event_id -> ContextFractal (an event is stored once)
- ``history``      the audit history's indexes (history_index.py): by time, cycle, persona, status, ...
- ``offsets``      OOBTree  audit-log path -> read position

MemoryChunk, ContextualSummary and ContextFractal are UvmObjects cloned from their
prototypes, so the kernel can send them messages like any other object.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable
from typing import Any

import msgspec
import numpy as np
import persistent
from BTrees.Length import Length
from BTrees.LOBTree import LOBTree
from BTrees.OOBTree import OOBTree, OOTreeSet
from ZODB.blob import Blob

from batos import paging
from batos.errors import ServiceError
from batos.uvm import UvmObject, parse_oid, prototype_of
from proto import ErrorCode
from proto.bodies.memory import ChunkIn, FractalEvent, QueryFractals, SummaryIn

from . import history_index
from .vectors import LEVEL_CHUNK, LEVEL_FRACTAL, LEVEL_SUMMARY, VectorStore

_SET_ATTRS = ("by_node_name", "by_node_type", "by_hash")
_MAP_ATTRS = ("files", "counts", "fractals_by_event", "offsets")
_MAX_OID = 2**64 - 1


class FileEntry(persistent.Persistent):
    """One ingested file: its hash and the objects made from it."""

    def __init__(self, file_path: str):
        self.file_path = file_path
        self.file_hash = ""
        self.summaries: tuple[UvmObject, ...] = ()
        self.chunks: tuple[UvmObject, ...] = ()
        self.updated = 0.0


class MemoryIndexes(persistent.Persistent):
    """The container of memory's indexes; its own attributes are set once and never change."""

    def __init__(self, dim: int, shard_rows: int):
        self.objects = LOBTree()
        for name in _SET_ATTRS:
            setattr(self, name, OOTreeSet())
        for name in _MAP_ATTRS:
            setattr(self, name, OOBTree())
        self.vectors = VectorStore(dim, shard_rows)
        self.history = history_index.HistoryIndex()


def ensure_memory(root: Any, dim: int, shard_rows: int) -> MemoryIndexes:
    """root["memory"], created on first start (idempotent); an older image's missing indexes are built."""
    mem = root.get("memory")
    if mem is None:
        mem = root["memory"] = MemoryIndexes(dim, shard_rows)
    history_index.ensure(mem)
    return mem


def memory(root: Any) -> MemoryIndexes:
    mem = root.get("memory")
    if mem is None:
        raise ServiceError(ErrorCode.UNAVAILABLE, "the image has no memory indexes yet")
    return mem


def oid_int(obj: persistent.Persistent) -> int:
    return int.from_bytes(obj._p_oid, "big")


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def chunk_hash(chunk: ChunkIn) -> str:
    return chunk.metadata.content_hash or text_hash(chunk.source_text)


def summary_hash(file_path: str, s: SummaryIn) -> str:
    return text_hash(f"summary\0{file_path}\0{s.kind}\0{s.key}\0{s.summary_text}")


def embed_text_of(item: ChunkIn | SummaryIn) -> str:
    if item.embed_text is not None:
        return item.embed_text
    return item.source_text if isinstance(item, ChunkIn) else item.summary_text


# -- index helpers --------------------------------------------------------------------------


def _set_add(tree: OOTreeSet, key: Any, oid: int) -> None:
    if key is not None and key != "":
        tree.insert((key, oid))


def _set_remove(tree: OOTreeSet, key: Any, oid: int) -> None:
    if key is None or key == "":  # never filed (see _set_add); a None key cannot be compared with str
        return
    if (key, oid) in tree:
        tree.remove((key, oid))


def members(tree: OOTreeSet, key: Any) -> list[int]:
    """OIDs filed under ``key`` in a (key, oid) set."""
    return [oid for _, oid in tree.keys(min=(key, 0), max=(key, _MAX_OID))]


def _count(mem: MemoryIndexes, proto: str, delta: int) -> None:
    counter = mem.counts.get(proto)
    if counter is None:
        counter = mem.counts[proto] = Length(0)
    counter.change(delta)


def _index(mem: MemoryIndexes, obj: UvmObject, proto: str, key_hash: tuple[str, str] | None) -> int:
    oid = oid_int(obj)
    mem.objects[oid] = obj
    meta = obj.get_slot("metadata") or {}
    _set_add(mem.by_node_name, meta.get("node_name"), oid)
    _set_add(mem.by_node_type, meta.get("node_type"), oid)
    _set_add(mem.by_hash, key_hash, oid)
    _count(mem, proto, 1)
    return oid


def _unindex(mem: MemoryIndexes, obj: UvmObject, proto: str) -> int | None:
    """Drop ``obj`` from every index; returns its oid (whose vector the caller tombstones), or None."""
    oid = oid_int(obj)
    if mem.objects.pop(oid, None) is None:
        return None
    meta = obj.get_slot("metadata") or {}
    _set_remove(mem.by_node_name, meta.get("node_name"), oid)
    _set_remove(mem.by_node_type, meta.get("node_type"), oid)
    _set_remove(mem.by_hash, obj._key_hash, oid)
    _count(mem, proto, -1)
    return oid


# -- chunks and summaries -------------------------------------------------------------------


def _new_summary(root: Any, conn: Any, file_path: str, s: SummaryIn, vec: np.ndarray) -> UvmObject:
    meta = {**s.metadata, "file_path": file_path, "kind": s.kind}  # the file it is filed under
    obj = root["prototypes"]["contextual_summary"].clone(
        "summary", summary_text=s.summary_text, kind=s.kind, metadata=meta, child_chunks=[],
        vector_embedding=vec.astype(np.float32).tobytes(),
    )
    obj._key_hash = (file_path, summary_hash(file_path, s))
    obj._embed_hash = text_hash(embed_text_of(s))
    conn.add(obj)
    return obj


def _new_chunk(root: Any, conn: Any, c: ChunkIn, vec: np.ndarray, windows: int, parent: UvmObject | None) -> UvmObject:
    meta = msgspec.to_builtins(c.metadata)
    if meta.get("context_header") is None:  # optional: only chunks of a split class/function have one
        meta.pop("context_header", None)
    meta["content_hash"] = chunk_hash(c)
    meta["embed_windows"] = windows
    obj = root["prototypes"]["memory_chunk"].clone(
        "chunk", source_text=c.source_text, metadata=meta, parent_summary=parent,
        vector_embedding=vec.astype(np.float32).tobytes(),
    )
    obj._key_hash = (c.metadata.file_path, meta["content_hash"])
    obj._embed_hash = text_hash(embed_text_of(c))
    conn.add(obj)
    return obj


def _link(summaries: dict[str, UvmObject], chunk: UvmObject, key: str | None) -> None:
    if key is None:
        return
    parent = summaries[key]
    parent.get_slot("child_chunks").append(chunk)
    parent.mark_changed()  # plain list mutated in place: the _p_changed discipline


def _remove_file_objects(mem: MemoryIndexes, entry: FileEntry) -> int:
    # An object of another file (two objects that got one oid; verify.py) is that file's to remove.
    def mine(o: UvmObject) -> bool:
        return (o.get_slot("metadata") or {}).get("file_path") == entry.file_path

    gone = [_unindex(mem, c, "memory_chunk") for c in entry.chunks if mine(c)]
    gone += [_unindex(mem, s, "contextual_summary") for s in entry.summaries if mine(s)]
    oids = [oid for oid in gone if oid is not None]
    mem.vectors.remove(oids)  # tombstones, one shard update per shard touched
    entry.chunks, entry.summaries = (), ()
    return len(oids)


def _make_objects(
    root: Any,
    conn: Any,
    file_path: str,
    summaries: list[SummaryIn],
    chunks: list[ChunkIn],
    vectors: dict[str, tuple[np.ndarray, int]],
) -> tuple[dict[str, UvmObject], list[UvmObject]]:
    """Create one file's (not yet indexed) summaries and chunks; ``vectors`` maps embed-hash -> (vec, windows)."""
    made_s = {s.key: _new_summary(root, conn, file_path, s, _vector(vectors, s)[0]) for s in summaries}
    made_c = []
    for c in chunks:
        vec, windows = _vector(vectors, c)
        obj = _new_chunk(root, conn, c, vec, windows, made_s.get(c.summary_key) if c.summary_key else None)
        _link(made_s, obj, c.summary_key)
        made_c.append(obj)
    return made_s, made_c


def _vector(vectors: dict[str, tuple[np.ndarray, int]], item: ChunkIn | SummaryIn) -> tuple[np.ndarray, int]:
    found = vectors.get(text_hash(embed_text_of(item)))
    if found is None:  # it existed when we decided what to embed, and was deleted since
        raise ServiceError(ErrorCode.CONFLICT, "memory changed concurrently (an object was deleted); retry")
    return found


def lex_doc(obj: UvmObject, level: int) -> tuple[str, str, str]:
    """(file path, name, text) the lexical channel indexes for a memory object: a chunk's source with its
    scope and context header (what its embedding reads, recomputed from the object so that an image
    written before segments carried documents gives the same), a summary's outline, a fractal's summary."""
    meta = obj.get_slot("metadata") or {}
    if level == LEVEL_CHUNK:
        scope = ".".join([*(meta.get("parent_nodes") or ()), meta.get("node_name") or ""])
        text = "\n".join(x for x in (meta.get("file_path", ""), scope, meta.get("context_header") or "",
                                      obj.get_slot("source_text") or "") if x)
        return str(meta.get("file_path", "")), str(meta.get("node_name") or ""), text
    if level == LEVEL_SUMMARY:
        return str(meta.get("file_path", "")), str(meta.get("node_name") or ""), obj.get_slot("summary_text") or ""
    return "", "", obj.get_slot("summary") or ""


def lex_doc_of_oid(root: Any, oid: int, level: int) -> tuple[str, str, str] | None:
    obj = memory(root).objects.get(oid)
    return None if obj is None else lex_doc(obj, level)


def _index_and_embed(mem: MemoryIndexes, summaries: Iterable[UvmObject], chunks: Iterable[UvmObject]) -> None:
    oids, levels, vecs, docs = [], [], [], []
    for obj, proto, level in [*((s, "contextual_summary", LEVEL_SUMMARY) for s in summaries),
                              *((c, "memory_chunk", LEVEL_CHUNK) for c in chunks)]:
        oids.append(_index(mem, obj, proto, obj._key_hash))
        levels.append(level)
        vecs.append(np.frombuffer(obj.get_slot("vector_embedding"), dtype=np.float32))
        docs.append(lex_doc(obj, level))
    if oids:
        mem.vectors.append(np.stack(vecs), oids, levels, docs)


def reusable_vectors(root: Any, file_path: str) -> dict[str, tuple[np.ndarray, int]]:
    """Embeddings already in the image for a file's objects, by embed-text hash (saves re-embedding)."""
    entry = memory(root).files.get(file_path)
    out: dict[str, tuple[np.ndarray, int]] = {}
    if entry is None:
        return out
    for obj in (*entry.chunks, *entry.summaries):
        h = getattr(obj, "_embed_hash", None)
        vec = obj.get_slot("vector_embedding")
        if h and vec:
            windows = (obj.get_slot("metadata") or {}).get("embed_windows", 1)
            out[h] = (np.frombuffer(vec, dtype=np.float32).copy(), windows)
    return out


def file_state(root: Any, file_path: str) -> dict[str, Any] | None:
    entry = memory(root).files.get(file_path)
    if entry is None:
        return None
    from .verify import file_is_broken

    # a broken file is never "unchanged": its re-ingest rewrites it
    file_hash = "" if file_is_broken(root, entry) else entry.file_hash
    return {"file_hash": file_hash, "oids": _oids(entry.summaries) + _oids(entry.chunks),
            "chunks": len(entry.chunks), "summaries": len(entry.summaries)}


def _oids(objs: Iterable[persistent.Persistent]) -> list[str]:
    return [format(oid_int(o), "x") for o in objs]


def replace_file(
    root: Any, conn: Any, file_path: str, file_hash: str, summaries: list[SummaryIn], chunks: list[ChunkIn],
    vectors: dict[str, tuple[np.ndarray, int]],
) -> dict[str, Any]:
    """Swap a file's summaries and chunks for new ones, in the caller's transaction."""
    mem = memory(root)
    entry = mem.files.get(file_path)
    if entry is None:
        entry = mem.files[file_path] = FileEntry(file_path)
    _remove_file_objects(mem, entry)
    made_s, made_c = _make_objects(root, conn, file_path, summaries, chunks, vectors)
    _index_and_embed(mem, made_s.values(), made_c)
    entry.summaries, entry.chunks = tuple(made_s.values()), tuple(made_c)
    entry.file_hash, entry.updated = file_hash, time.time()
    return {"file_path": file_path, "chunks": len(made_c), "summaries": len(made_s),
            "oids": _oids(made_s.values()) + _oids(made_c)}


def file_hashes(root: Any, prefix: str | None) -> dict[str, str]:
    """Each file's hash; "" for a file whose objects are broken (verify.py), so ingest re-sends it."""
    from .verify import file_hashes_marking_suspects

    files = memory(root).files
    if not prefix:
        return file_hashes_marking_suspects(root, {path: e.file_hash for path, e in files.items()})
    base = prefix.rstrip("/")
    out = {}
    for path in files.keys(min=base):
        if not path.startswith(base):
            break
        if path == base or path.startswith(base + "/") or base == "":
            out[path] = files[path].file_hash
    return file_hashes_marking_suspects(root, out)


def delete_file(root: Any, file_path: str) -> int:
    mem = memory(root)
    entry = mem.files.get(file_path)
    if entry is None:
        return 0
    removed = _remove_file_objects(mem, entry)
    del mem.files[file_path]
    return removed


# -- lookups --------------------------------------------------------------------------------


def live_object(root: Any, oid: str | int) -> UvmObject:
    """A live memory object by OID; ServiceError(not_found) otherwise."""
    try:
        value = parse_oid(oid)
    except KeyError as e:
        raise ServiceError(ErrorCode.BAD_ARGS, str(e.args[0])) from None
    obj = memory(root).objects.get(value)
    if obj is None:
        raise ServiceError(ErrorCode.NOT_FOUND, f"no memory object with oid {oid!r}")
    return obj


def candidate_oids(root: Any, file_path: str | None, node_type: str | None, node_name: str | None,
                   within: list[str] | None) -> set[int]:
    """OIDs satisfying every given filter (intersection)."""
    mem = memory(root)
    sets: list[set[int]] = []
    if file_path is not None:
        entry = mem.files.get(file_path)
        sets.append({oid_int(o) for o in (*entry.chunks, *entry.summaries)} if entry else set())
    for tree, key in ((mem.by_node_type, node_type), (mem.by_node_name, node_name)):
        if key is not None:
            sets.append(set(members(tree, key)))
    if within is not None:
        kids: set[int] = set()
        for oid in within:
            summary = live_object(root, oid)
            if prototype_of(summary, root["prototypes"]) != "contextual_summary":
                raise ServiceError(ErrorCode.BAD_ARGS, f"`within` oid {oid!r} is not a ContextualSummary")
            kids.update(oid_int(c) for c in summary.get_slot("child_chunks") or ())
        sets.append(kids)
    return set.intersection(*sets) if sets else set()


def render_hit(root: Any, obj: UvmObject, level: str, score: float) -> dict[str, Any]:
    oid = format(oid_int(obj), "x")
    if level == "chunk":
        meta = dict(obj.get_slot("metadata") or {})
        parent = obj.get_slot("parent_summary")
        hit = {"oid": oid, "level": level, "score": score, "text": obj.get_slot("source_text"), "metadata": meta,
               "token_count": meta.get("token_count")}
        if parent is not None:
            hit["summary_oid"] = format(oid_int(parent), "x")
        return hit
    if level == "summary":
        meta = dict(obj.get_slot("metadata") or {})
        return {"oid": oid, "level": level, "score": score, "text": obj.get_slot("summary_text"), "metadata": meta,
                "child_oids": _oids(obj.get_slot("child_chunks") or ()), "token_count": meta.get("token_count")}
    return {"oid": oid, "level": level, "score": score, "text": obj.get_slot("summary"),
            "metadata": dict(obj.get_slot("meta") or {}), "token_count": None}


# -- fractals, offsets ---------------------------------------------------------------------


def existing_events(root: Any, event_ids: Iterable[str]) -> set[str]:
    by_event = memory(root).fractals_by_event
    return {e for e in event_ids if e in by_event}


def _write_blob(data: bytes) -> Blob:
    blob = Blob()
    with blob.open("w") as f:
        f.write(data)
    return blob


def read_blob(blob: Blob) -> bytes:
    with blob.open("r") as f:
        return f.read()


def create_fractals(
    root: Any, conn: Any, events: list[FractalEvent], vectors: dict[str, np.ndarray],
    offset: tuple[str, int] | None,
) -> int:
    """ContextFractals for new event ids (idempotent) and the audit offset, in one transaction; how many
    were created."""
    mem = memory(root)
    hx = mem.history
    proto = root["prototypes"]["context_fractal"]
    made: list[UvmObject] = []
    for ev in events:
        if ev.event_id in mem.fractals_by_event:
            continue
        meta = msgspec.to_builtins(ev.meta)
        obj = proto.clone("fractal", summary=ev.summary, meta=meta, event_id=ev.event_id,
                          full_content_blob=_write_blob(ev.full_json.encode("utf-8")),
                          vector_embedding=vectors[ev.event_id].astype(np.float32).tobytes())
        obj._key_hash = None
        conn.add(obj)
        oid = _index(mem, obj, "context_fractal", None)
        mem.fractals_by_event[ev.event_id] = obj
        hx.add(history_index.key_of(meta, ev.event_id), history_index.Row.of(oid, meta))
        made.append(obj)
    if made:
        mem.vectors.append(np.stack([np.frombuffer(o.get_slot("vector_embedding"), dtype=np.float32) for o in made]),
                           [oid_int(o) for o in made], [LEVEL_FRACTAL] * len(made),
                           [lex_doc(o, LEVEL_FRACTAL) for o in made])
    if offset is not None:
        mem.offsets[offset[0]] = offset[1]
    return len(made)


def audit_offset(root: Any, path: str) -> int:
    return int(memory(root).offsets.get(path, 0))


def query_fractals(root: Any, q: QueryFractals, page_bytes: int = paging.PAGE_BYTES) -> dict[str, Any]:
    """One page of the fractals matching ``q`` in (timestamp, event id) order, and the ``next`` cursor (None on
    the last page), answered from the history indexes. A cursor is the last returned key: fractals are never
    deleted, so a page that follows it is exact even while new events are ingested."""
    after = _parse_fractal_cursor(q.after) if q.after is not None else None
    mem = memory(root)
    rendered = (_render_fractal(mem.objects[row.oid]) for _, row in mem.history.matching(q, after))
    page, more = paging.take_page(rendered, page_bytes, q.limit)
    return {"fractals": page, "next": _fractal_cursor(page[-1]) if more else None}


def _fractal_cursor(rendered: dict[str, Any]) -> str:
    return json.dumps([rendered["meta"].get("timestamp") or "", rendered["event_id"]])


def _parse_fractal_cursor(cursor: str) -> tuple[str, str]:
    try:
        ts, event_id = json.loads(cursor)
        if isinstance(ts, str) and isinstance(event_id, str):
            return ts, event_id
    except (ValueError, TypeError):
        pass
    raise ServiceError(ErrorCode.BAD_ARGS, "`after` is not a cursor this query returned")


def _render_fractal(f: UvmObject) -> dict[str, Any]:
    return {"oid": format(oid_int(f), "x"), "summary": f.get_slot("summary"),
            "full_json": read_blob(f.get_slot("full_content_blob")).decode("utf-8"),
            "meta": dict(f.get_slot("meta") or {}), "event_id": f.get_slot("event_id")}


def counts(root: Any) -> dict[str, int]:
    return {name: counter() for name, counter in memory(root).counts.items()}


def vector_store(root: Any) -> VectorStore:
    return memory(root).vectors
