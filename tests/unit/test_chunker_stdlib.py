"""Property test: the chunker's invariants hold on real files (the installed standard library).

Each example draws a stdlib file and a budget; ``quality.check`` verifies: every non-blank line in
exactly one chunk, chunk text == the lines it claims, token_count exact, every unflagged chunk
within budget and parseable (``parsecheck``'s definition).
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.ingestor import files, quality
from services.ingestor.chunker import chunk_python
from services.ingestor.source import decode_python

STDLIB = Path(sysconfig.get_paths()["stdlib"])
MAX_FILE_BYTES = 120_000  # keeps one example under ~1 s; big files are covered by bench/ingest.py


def _corpus() -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(STDLIB):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames)
                   if f.endswith(".py") and os.path.getsize(os.path.join(dirpath, f)) <= MAX_FILE_BYTES)
    return out


CORPUS = _corpus()
pytestmark = pytest.mark.skipif(len(CORPUS) < 100, reason="no standard library sources installed")


@given(path=st.sampled_from(CORPUS or ["-"]), budget=st.sampled_from([24, 64, 128, 256, 512]))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_invariants_hold_on_stdlib_files(path: str, budget: int) -> None:
    raw = Path(path).read_bytes()
    try:
        text = decode_python(raw)
        fc = chunk_python(text, path, budget)
    except (SyntaxError, UnicodeDecodeError, ValueError):  # a py2 test fixture: the fallback must still cover it
        outcome = files.chunk_file(path, budget, 10 * len(raw) + 1)
        assert outcome.status in ("chunked", "skipped")
        return
    report = quality.check(text, fc.chunks, budget)
    assert not report.problems, report.problems[:5]
    assert report.covered == report.lines
    assert all(c.metadata["file_path"] == path for c in fc.chunks)
    assert fc.summaries[0].key == path and fc.summaries[0].metadata["token_count"] <= budget
