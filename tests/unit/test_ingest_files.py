"""One file to chunks: classification, skips, hashes, decoding, the syntax-error fallback, text windows."""

from __future__ import annotations

from pathlib import Path

from services.ingestor import quality
from services.ingestor.files import chunk_file, classify, ingest_hash
from services.ingestor.source import file_hash
from services.ingestor.textfiles import chunk_text

BIG = 10_000_000


def test_classify() -> None:
    assert classify("/x/a.py") == "python" and classify("/x/a.pyi") == "python"
    for name in ("README", "README.md", "notes.rst", "pyproject.toml", "a.txt", "setup.cfg", "tox.ini", "c.yaml",
                 "d.yml", "e.json", "LICENSE"):
        assert classify(f"/x/{name}") == "text", name
    for name in ("a.c", "img.png", "Makefile", "a.pyc"):
        assert classify(f"/x/{name}") is None, name


def test_skips_and_hashes(tmp_path: Path) -> None:
    big = tmp_path / "big.py"
    big.write_text("x = 1\n" * 100)
    assert chunk_file(str(big), 256, 50).reason == "too_large"
    binary = tmp_path / "data.json"
    binary.write_bytes(b"{\x00\x01}")
    assert chunk_file(str(binary), 256, BIG).reason == "binary"
    bad = tmp_path / "bad.md"
    bad.write_bytes(b"caf\xe9\n")
    out = chunk_file(str(bad), 256, BIG)
    assert (out.status, out.reason) == ("skipped", "undecodable") and "UTF-8" in (out.error or "")
    assert chunk_file(str(tmp_path / "x.c"), 256, BIG).reason == "unsupported"
    assert chunk_file(str(tmp_path / "missing.py"), 256, BIG).reason == "unreadable"
    ok = tmp_path / "ok.py"
    ok.write_text("def f():\n    return 1\n")
    digest = ingest_hash(ok.read_bytes(), 256)
    assert chunk_file(str(ok), 256, BIG, known_hash=digest).status == "unchanged"
    out = chunk_file(str(ok), 256, BIG, known_hash="stale")
    assert out.status == "chunked" and out.result is not None and out.result.file_hash == digest


def test_a_file_chunked_by_another_recipe_is_chunked_again(tmp_path: Path) -> None:
    ok = tmp_path / "ok.py"
    ok.write_text("def f():\n    return 1\n")
    raw = ok.read_bytes()
    # memory holds the bare sha256 an ingest before CHUNKING_VERSION 2 wrote, or another budget's hash
    for stale in (file_hash(raw), ingest_hash(raw, 128), ingest_hash(raw, 256, use_unparse=True)):
        assert chunk_file(str(ok), 256, BIG, known_hash=stale).status == "chunked"
    assert chunk_file(str(ok), 256, BIG, known_hash=ingest_hash(raw, 256)).status == "unchanged"


def test_python_with_a_coding_cookie(tmp_path: Path) -> None:
    p = tmp_path / "latin.py"
    p.write_bytes("# -*- coding: latin-1 -*-\nNAME = 'café'\n".encode("latin-1"))
    out = chunk_file(str(p), 256, BIG)
    assert out.result is not None and "café" in out.result.chunks[0].text


def test_syntax_error_falls_back_to_windows_and_is_reported(tmp_path: Path) -> None:
    p = tmp_path / "py2.py"
    src = "".join(f"print 'line {i} of an old python 2 file'\n" for i in range(80))
    p.write_text(src)
    out = chunk_file(str(p), 64, BIG)
    assert out.status == "chunked" and out.error and out.error.startswith("SyntaxError") and "(line 1)" in out.error
    assert out.result is not None and out.result.kind == "python" and len(out.result.chunks) > 1
    for c in out.result.chunks:
        assert c.metadata["node_type"] == "TextWindow" and "syntax_error_fallback" in c.metadata["flags"]
    assert not quality.check(src, out.result.chunks, 64, parse=False).problems


def test_text_windows_cover_every_line_with_headings() -> None:
    text = "# Title\n\nIntro text here.\n\n## Usage\n" + "".join(f"- item {i} with several words\n" for i in range(60))
    fc = chunk_text(text, "/r/README.md", 40)
    assert not quality.check(text, fc.chunks, 40, parse=False).problems
    assert fc.chunks[0].metadata["node_name"] == "Title"
    assert fc.chunks[-1].metadata["node_name"] == "Usage"
    assert fc.chunks[-1].embed_text.startswith("# README.md :: Usage")
    assert all(c.metadata["token_count"] <= 40 and c.summary_key == "/r/README.md" for c in fc.chunks)
    assert fc.summaries[0].text.startswith("File README.md (65 lines)")
    one_line = '{"k": "' + "v" * 5000 + '"}'
    fc = chunk_text(one_line, "/r/min.json", 100)
    assert len(fc.chunks) > 1 and "".join(c.text for c in fc.chunks) == one_line
    assert all(c.metadata["flags"] == ["line_split", "partial_line"] for c in fc.chunks)
