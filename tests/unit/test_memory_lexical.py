"""The lexical channel and hybrid search: code-aware tokens, BM25, exact names, fusion, and the lexical
index following the image across memory processes (in-process ZEO, two clients)."""

from __future__ import annotations

import numpy as np

from services.memory_weaver.lexical import LexDoc, LexicalIndex, named_identifiers, split_identifier, tokenize
from tests.unit.test_memory_image import image, image2, settings, zeo_addr  # noqa: F401  (fixtures)
from tests.unit.test_memory_weaver import file_payload, meta, weaver, weaver2  # noqa: F401  (fixtures)


def test_identifiers_split_on_case_and_underscores() -> None:
    assert split_identifier("parseHTTPHeader_line2") == ["parse", "http", "header", "line", "2"]
    assert split_identifier("read_header_line") == ["read", "header", "line"]
    toks = tokenize("def readHeaderLine(self): return the headers")
    assert toks == ["read", "header", "line", "readheaderline", "header"]  # stop words gone, plural folded


def test_named_identifiers_finds_code_names_and_paths() -> None:
    names, paths = named_identifiers("how does `Broker.on_dead` call purge_worker() in broker/broker.py?")
    assert {"broker", "on_dead", "purge_worker"} <= names
    assert paths == {"broker/broker.py"}
    assert named_identifiers("how does the broker handle a dead worker?") == (set(), set())


def test_bm25_prefers_rare_terms_and_exact_rows() -> None:
    lex = LexicalIndex()
    docs = ["the worker sends heartbeats", "def purge_worker(self): drop the dead worker",
            "worker worker worker pool", "unrelated text about parsing"]
    for i, d in enumerate(docs):
        lex.add(i, LexDoc(f"/p/{i}.py", f"name{i}", d))
    lex.add(1, LexDoc("/p/x.py", "ignored", "a row is indexed once"))  # rows never change
    s = lex.scores("purge dead worker", 4)
    assert int(np.argmax(s)) == 1 and s[3] == 0
    assert lex.exact_rows({"name2"}, set(), 4) == [2]
    assert lex.exact_rows(set(), {"p/3.py"}, 4) == [3]


async def test_hybrid_finds_a_named_identifier_dense_misses(weaver):  # noqa: F811
    payload = file_payload("/repo/pkg/io.py", fns=("alpha", "beta"))
    payload["chunks"].append({"source_text": "def zz_reader_helper():\n    return 0\n", "summary_key": "f",
                              "metadata": meta("/repo/pkg/io.py", "zz_reader_helper", start=30, end=31,
                                               content_hash="zz", token_count=8)})
    await weaver.replace_file(payload)
    q = "what does zz_reader_helper return?"
    hybrid = (await weaver.search({"text": q, "k": 3, "level": "chunks"}))["hits"]
    assert hybrid[0]["metadata"]["node_name"] == "zz_reader_helper"
    assert hybrid[0]["channels"]["exact"] == 1 and 0 < hybrid[0]["score"] <= 1
    assert [h["score"] for h in hybrid] == sorted((h["score"] for h in hybrid), reverse=True)
    calls = len(weaver.embedder.calls)
    lexical = (await weaver.search({"text": "reader helper", "k": 3, "mode": "lexical"}))["hits"]
    assert lexical[0]["metadata"]["node_name"] == "zz_reader_helper"
    assert len(weaver.embedder.calls) == calls  # a lexical search embeds nothing
    dense = (await weaver.search({"text": "alpha", "k": 2, "mode": "dense", "level": "chunks"}))["hits"]
    assert "channels" not in dense[0] and -1 <= dense[0]["score"] <= 1
    # a path named in the question brings that file's rows
    by_path = (await weaver.search({"text": "what is in pkg/io.py", "k": 5, "level": "chunks"}))["hits"]
    assert all(h["metadata"]["file_path"] == "/repo/pkg/io.py" for h in by_path) and by_path


async def test_hybrid_scores_follow_the_returned_order_after_the_rerank(weaver):  # noqa: F811
    chunks = [("parse_header", "def parse_header(raw):\n    return tokens(raw)\n"),
              ("other", "def other():\n    header = parse(header)\n    return parse(header, header)\n"),
              ("read_lines", "def read_lines(f):\n    return f.readlines()\n")]
    payload = {"file_path": "/p/h.py", "file_hash": "1", "summaries": [], "chunks": [
        {"source_text": text, "metadata": meta("/p/h.py", name, start=i * 5 + 1, end=i * 5 + 3,
                                                content_hash=name, token_count=9)}
        for i, (name, text) in enumerate(chunks)]}
    await weaver.replace_file(payload)
    for q in ("parse header", "how are header lines parsed", "read the lines"):
        hits = (await weaver.search({"text": q, "k": 3, "level": "chunks"}))["hits"]
        scores = [h["score"] for h in hits]
        assert scores == sorted(scores, reverse=True) and all(0 < s <= 1 for s in scores), (q, scores)
    top = (await weaver.search({"text": "parse header", "k": 1, "level": "chunks"}))["hits"][0]
    assert top["metadata"]["node_name"] == "parse_header"  # its name is the question: the rerank lifts it


async def test_lexical_index_follows_another_process_and_old_segments(weaver, weaver2):  # noqa: F811
    await weaver.search({"text": "warm", "k": 1})
    await weaver2.replace_file(file_payload("/b.py", fns=("gamma_reader",)))
    hits = (await weaver.search({"text": "gamma reader", "k": 2, "mode": "lexical"}))["hits"]
    assert hits and hits[0]["metadata"]["node_name"] == "gamma_reader"
    await weaver2.replace_file(file_payload("/b.py", "2", fns=("delta_writer",)))
    hits = (await weaver.search({"text": "gamma reader", "k": 2, "mode": "lexical", "level": "chunks"}))["hits"]
    assert hits == []  # the replaced chunk's row is dead for the lexical channel too

    def strip_documents(root, conn):  # an image written before segments carried lexical documents
        for shard in root["memory"].vectors.shards:
            for seg in shard.segments:
                seg.lex = None

    await weaver2.image.transact(strip_documents)
    from services.memory_weaver.weaver import MemoryWeaver
    from tests.unit.memory_wire import Wire

    fresh = Wire(MemoryWeaver(weaver2.image, weaver2.embedder, weaver2.shard_rows))
    await fresh.start()
    try:
        hits = (await fresh.search({"text": "delta writer", "k": 2, "mode": "lexical", "level": "chunks"}))["hits"]
        assert hits and hits[0]["metadata"]["node_name"] == "delta_writer"
    finally:
        await fresh.close()
