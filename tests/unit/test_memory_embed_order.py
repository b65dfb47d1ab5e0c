"""The embedder's batching without the model: length-sorted batches, results in input order, and a
search query that never waits for a bulk embedding in progress (fake encoders record what they were given)."""

from __future__ import annotations

import os
import sys
import threading

import numpy as np
import pytest

from services.memory_weaver.embedder import BULK_NICENESS, Embedder


class FakeModel:
    max_seq_length = 256

    def __init__(self, gate: threading.Event | None = None):
        self.batches: list[list[str]] = []
        self.gate = gate
        self.entered = threading.Event()

    @staticmethod
    def tokenizer(text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": list(range(len(text.split())))}

    def encode(self, texts, **kw):
        self.batches.append(list(texts))
        self.entered.set()
        if self.gate is not None and len(self.batches) == 1:
            assert self.gate.wait(10)
        out = np.zeros((len(texts), 384), dtype=np.float32)
        for i, t in enumerate(texts):
            out[i, len(t) % 384] = 1.0  # a vector that says which text it came from
        return out


def fake_embedder(model: FakeModel, batch_size: int = 2, bulk_niceness: int = BULK_NICENESS) -> Embedder:
    e = Embedder(path="/nonexistent", batch_size=batch_size, bulk_niceness=bulk_niceness)
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


def test_a_query_runs_while_a_bulk_batch_holds_the_bulk_model() -> None:
    gate = threading.Event()
    bulk_model = FakeModel(gate)
    query_model = FakeModel()
    emb = fake_embedder(bulk_model)
    emb._open = lambda: query_model  # the query encoder is a second instance of the model
    bulk = threading.Thread(target=emb.embed, args=(["a" * n for n in range(2, 8)],))
    bulk.start()
    try:
        assert bulk_model.entered.wait(10)  # the bulk call is inside its first batch, blocked on the gate
        vec = emb.embed_query("the question")  # returns while the bulk batch is still running
        assert not gate.is_set() and len(bulk_model.batches) == 1
    finally:
        gate.set()
        bulk.join(10)
    assert query_model.batches == [["the question"]]
    assert int(np.argmax(vec)) == len("the question") and abs(float(np.linalg.norm(vec)) - 1.0) < 1e-6
    assert len(bulk_model.batches) == 3 and ["the question"] not in bulk_model.batches


class PriorityRecorder(FakeModel):
    """Records the niceness of the thread each encode runs on."""

    def __init__(self) -> None:
        super().__init__()
        self.niceness: list[int] = []

    def encode(self, texts, **kw):
        self.niceness.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return super().encode(texts, **kw)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")
def test_bulk_batches_run_below_the_callers_priority_and_queries_at_it() -> None:
    bulk_model, query_model = PriorityRecorder(), PriorityRecorder()
    emb = fake_embedder(bulk_model)
    emb._open = lambda: query_model
    own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    emb.embed(["a" * n for n in range(2, 8)])
    emb.embed_query("the question")
    assert bulk_model.niceness == [min(own + BULK_NICENESS, 19)] * 3  # every batch, on the one bulk thread
    assert query_model.niceness == [own]  # the caller's own thread was left alone


def test_niceness_zero_leaves_the_bulk_thread_at_the_callers_priority() -> None:
    model = PriorityRecorder()
    fake_embedder(model, bulk_niceness=0).embed(["a", "bb"])
    assert model.niceness == [os.getpriority(os.PRIO_PROCESS, threading.get_native_id())]
