"""The real all-MiniLM-L6-v2 embedder: no silent truncation (windows + mean pooling)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from services.memory_weaver.embedder import Embedder, model_path

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def embedder():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return Embedder().load()


def test_model_is_the_packaged_one():
    assert (model_path() / "model.safetensors").is_file()


def test_short_texts_one_window_and_semantics(embedder):
    texts = ["def open_database(path): connect to the ZODB storage",
             "function that opens a database connection",
             "a recipe for banana bread"]
    vecs, windows = embedder.embed(texts)
    assert vecs.shape == (3, 384) and vecs.dtype == np.float32
    assert windows == [1, 1, 1]
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2]


def test_long_text_is_windowed_not_truncated(embedder):
    head = "def load_shards(store): read every vector shard from the image. " * 12
    tail = " ".join(f"banana{i} smoothie recipe with mango and yogurt" for i in range(60))
    text = head + tail
    assert embedder.count_pieces(text) > embedder.max_pieces
    wins = embedder.windows(text)
    assert len(wins) >= 2
    assert all(embedder.count_pieces(w) <= embedder.max_pieces for w in wins)
    assert wins[0].startswith("def load_shards") and wins[-1].rstrip().endswith("yogurt")
    vec, windows = embedder.embed([text])
    assert windows == [len(wins)]
    # the tail (which truncation would drop) moves the vector: compare with the head alone
    head_vec, _ = embedder.embed([wins[0]])
    tail_probe, _ = embedder.embed(["banana smoothie recipe with mango and yogurt"])
    assert vec[0] @ tail_probe[0] > head_vec[0] @ tail_probe[0]


def test_empty_batch(embedder):
    vecs, windows = embedder.embed([])
    assert vecs.shape == (0, 384) and windows == []


def test_query_encoder_gives_the_bulk_encoders_vectors(embedder):
    """Queries run on a second instance of the model: same vectors as the bulk path, long queries pooled alike."""
    short = "how does the broker detect a dead worker"
    long = " ".join(f"word{i} payload parsing" for i in range(400))  # several windows
    bulk, _ = embedder.embed([short, long])
    for text, expected in ((short, bulk[0]), (long, bulk[1])):
        got = embedder.embed_query(text)
        assert got.shape == expected.shape and got.dtype == np.float32
        assert float(np.dot(got, expected)) > 0.99999
    assert embedder._query_model is not None and embedder._query_model is not embedder._model
