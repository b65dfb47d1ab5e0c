"""The evaluation's two measures on llama.cpp: the served GGUF alone, and with an adapter as a GGUF LoRA.

When llama.cpp serves the model (the embedded default), an adapter is judged as it will run: the PEFT
adapter converted by backends/gguf_lora.py (the same content-addressed cache the llm service reads, so
activation converts nothing) and applied to the quantized GGUF. Judging the fp32 transformers checkpoint
instead would measure a model nobody serves.

* ``eval_loss``: one ``Llama`` per model variant with ``logits_all`` (the LoRA given at load time), the
  prompt+completion decoded in one pass and the cross-entropy of the completion tokens computed from its
  logits (numpy), exactly the positions transformers' shifted labels score;
* greedy outputs: through :class:`LlamaCppBackend` itself, the adapter activated for a persona as the llm
  service does, so the text judged is the text the service would produce.

Token ids come from the transformers tokenizer the adapter was trained with (converted from the same GGUF),
so the examples are cut exactly as in training and in the transformers evaluation.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from services.forge.spare_cores import bound_openmp_spinning

bound_openmp_spinning()  # before llama_cpp loads (spare_cores.py)

CONTEXT_MARGIN = 16


def context_for(encoded: list[tuple[list[int], int]], prompt_tokens: int, max_new_tokens: int) -> int:
    """A context that holds the longest example and the longest prompt with its greedy output, rounded up to
    64 (the logits of the whole context are kept: vocab x n_ctx floats, so no larger than needed)."""
    longest = max([len(ids) for ids, _ in encoded] + [prompt_tokens + max_new_tokens]) + CONTEXT_MARGIN
    return -(-longest // 64) * 64


def completion_nll(scores: np.ndarray, ids: list[int], n_prompt: int) -> tuple[float, int]:
    """Summed negative log-likelihood of ids[n_prompt:] given the logits of the positions before each."""
    if len(ids) - n_prompt < 1 or n_prompt < 1:
        return 0.0, 0
    logits = scores[n_prompt - 1 : len(ids) - 1].astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(logits).sum(axis=1))
    picked = logits[np.arange(len(logits)), ids[n_prompt:]]
    return float((log_z - picked).sum()), len(logits)


class GGUFJudge:
    """Measures the served GGUF with no adapter, or with one of the adapters named at construction."""

    runtime = "llamacpp"

    def __init__(self, gguf: str, base_checkpoint: str, adapters: dict[str, str], *, threads: int = 1,
                 context_tokens: int = 2048):
        from services.forge.backends.llamacpp import LlamaCppBackend

        self.gguf = gguf
        self.threads = max(1, threads)
        self.context_tokens = context_tokens
        self.backend = LlamaCppBackend(gguf, context_tokens=context_tokens, threads=self.threads,
                                       base_checkpoint=base_checkpoint)  # fmt: skip
        self.loras: dict[str, str] = {}
        for name, path in adapters.items():
            info = self.backend.activate_adapter(name, path)  # converts (once, cached) as the service would
            self.loras[name] = info["gguf"]
        # the persona a measure generates as: a name with no adapter is the plain served model
        self.base_persona = "__base__"

    def eval_loss(self, adapter: str | None, encoded: list[tuple[list[int], int]]) -> float | None:
        from llama_cpp import Llama

        llm = Llama(model_path=self.gguf, n_ctx=self.context_tokens, n_batch=min(512, self.context_tokens),
                    logits_all=True, lora_path=self.loras[adapter] if adapter else None, n_threads=self.threads,
                    n_threads_batch=self.threads, verbose=False)  # fmt: skip
        total, tokens = 0.0, 0
        try:
            for ids, n_prompt in encoded:
                llm.reset()
                llm.eval(ids)
                nll, n = completion_nll(llm.scores[: len(ids)], ids, n_prompt)
                total, tokens = total + nll, tokens + n
        finally:
            llm.close()
        return round(total / tokens, 6) if tokens else None

    def greedy_outputs(self, adapter: str | None, prompts: list[list[dict[str, str]]],
                       max_new_tokens: int) -> list[str]:
        from services.forge.backends.base import GenerationParams

        params = GenerationParams(max_tokens=max_new_tokens, temperature=0.0)
        persona = adapter or self.base_persona
        return [self.backend.generate(persona, prompt, params).text for prompt in prompts]

    def measure(self, adapter: str | None, encoded: list[tuple[list[int], int]],
                prompts: list[list[dict[str, str]]], kind: str | None, max_new_tokens: int) -> dict[str, Any]:
        from services.forge.evaluation import score_outputs

        started = time.monotonic()
        result: dict[str, Any] = {"eval_loss": self.eval_loss(adapter, encoded), "format_valid": None}
        if kind is not None and prompts:
            result.update(score_outputs(self.greedy_outputs(adapter, prompts, max_new_tokens), kind))
        if adapter:
            result["gguf_lora"] = self.loras[adapter]
        result["seconds"] = round(time.monotonic() - started, 2)
        return result

    def describe(self) -> dict[str, Any]:
        import llama_cpp

        return {"runtime": self.runtime, "gguf": self.gguf, "device": "cpu", "threads": self.threads,
                "llama_cpp": llama_cpp.__version__}

    def close(self) -> None:
        self.backend.close()
