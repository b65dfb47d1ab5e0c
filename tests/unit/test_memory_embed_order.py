"""The embedder's batching without the model: length-sorted batches, results in input order, and a
search query's priority over a bulk embedding in progress (a fake encoder records what it was given)."""

from __future__ import annotations

import threading

import numpy as np

from services.memory_weaver.embedder import Embedder


class FakeModel:
    max_seq_length = 256

    def __init__(self, gate: threading.Event | None = None):
        self.batches: list[list[str]] = []
        self.gate = gate
        self.entered = threading.Event()

    def encode(self, texts, **kw):
        self.batches.append(list(texts))
        self.entered.set()
        if self.gate is not None and len(self.batches) == 1:
            assert self.gate.wait(10)
        out = np.zeros((len(texts), 384), dtype=np.float32)
        for i, t in enumerate(texts):
            out[i, len(t) % 384] = 1.0  # a vector that says which text it came from
        return out


def fake_embedder(model: FakeModel, batch_size: int = 2) -> Embedder:
    e = Embedder(path="/nonexistent", batch_size=batch_size)
    e._model = model
    e._windows = lambda text: [text]  # one window per text: the tokenizer is not under test here
    return e


def test_batches_are_length_sorted_and_results_come_back_in_order() -> None:
    model = FakeModel()
    texts = ["x" * n for n in (50, 3, 20, 7, 1)]
    vecs, windows = fake_embedder(model).embed(texts)
    assert model.batches == [["x", "xxx"], ["x" * 7, "x" * 20], ["x" * 50]]
    assert windows == [1] * 5
    assert [int(np.argmax(v)) for v in vecs] == [50, 3, 20, 7, 1]


def test_a_query_goes_before_the_next_bulk_batch() -> None:
    gate = threading.Event()
    model = FakeModel(gate)
    emb = fake_embedder(model)
    bulk = threading.Thread(target=emb.embed, args=(["a" * n for n in range(2, 8)],))
    bulk.start()
    assert model.entered.wait(10)  # the bulk call holds the model for its first batch
    got: list[np.ndarray] = []
    query = threading.Thread(target=lambda: got.append(emb.embed_query("the question")))
    query.start()
    waited = threading.Event()
    for _ in range(1000):  # poll (bounded) until the query is registered as waiting for the model
        if emb._urgent:
            break
        waited.wait(0.01)
    assert emb._urgent == 1
    gate.set()
    bulk.join(10)
    query.join(10)
    assert model.batches[1] == ["the question"]  # straight after the batch in progress
    assert len(model.batches) == 4 and got and int(np.argmax(got[0])) == len("the question")
