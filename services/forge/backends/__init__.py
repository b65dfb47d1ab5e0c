"""LLM backends behind one interface, chosen by ``settings.llm_backend``:

- ``embedded``: the packaged SmolLM2-135M-Instruct, converted once into a cached checkpoint (CPU, fp32);
- ``hf``: any local Hugging Face causal LM directory (``llm_model_path``, ``llm_dtype``, ``llm_device``);
- ``openai``: an OpenAI-compatible chat endpoint (``openai_url``, ``openai_model``, ``openai_api_key``).
"""

from __future__ import annotations

import os

# Every model is local (packaged or a configured directory): never reach for the Hub. Set before any
# backend module imports transformers, which reads it at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import proto
from batos.config import Settings
from services.forge.backends.base import Backend, BackendError, GenerationParams, GenerationResult

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"

__all__ = ["Backend", "BackendError", "GenerationParams", "GenerationResult", "make_backend"]


def make_backend(settings: Settings) -> Backend:
    """Build (and load) the configured backend. Slow for local models: call it from a thread."""
    kind = settings.llm_backend
    if kind == "embedded":
        from batos.models import ModelNotAvailable, embedded_llm_checkpoint
        from services.forge.backends.local import LocalBackend

        try:
            path = embedded_llm_checkpoint(settings)
        except ModelNotAvailable as e:
            raise BackendError(proto.ErrorCode.UNAVAILABLE, str(e)) from e
        # fp32 on CPU: faster than bf16 there, and the 135M model fits easily
        return LocalBackend(
            path,
            dtype="float32",
            device="cpu",
            context_tokens=settings.llm_context_tokens,
            model_name=EMBEDDED_MODEL_NAME,
        )
    if kind == "hf":
        from services.forge.backends.local import LocalBackend

        if not settings.llm_model_path:
            raise BackendError(proto.ErrorCode.UNAVAILABLE, "llm_backend=hf needs llm_model_path (a local model dir)")
        return LocalBackend(
            settings.llm_model_path,
            dtype=settings.llm_dtype,
            device=settings.llm_device,
            context_tokens=settings.llm_context_tokens,
        )
    if kind == "openai":
        from services.forge.backends.openai_compat import OpenAICompatBackend

        return OpenAICompatBackend(
            settings.openai_url,
            settings.openai_model,
            settings.openai_api_key,
            context_tokens=settings.llm_context_tokens,
        )
    raise BackendError(proto.ErrorCode.UNAVAILABLE, f"unknown llm_backend {kind!r}")
