"""LLM backends behind one interface, chosen by ``settings.llm_backend``:

- ``embedded``: a packaged GGUF (``llm_model``) run by llama.cpp in this process; when llama-cpp-python is
  not installed (its build failed), SmolLM2-135M through transformers (fp32, ~4x slower), and it says so;
- ``hf``: any local Hugging Face causal LM directory (``llm_model_path``, ``llm_dtype``, ``llm_device``);
- ``openai``: an OpenAI-compatible chat endpoint (``openai_url``, ``openai_model``, ``openai_api_key``).
"""

from __future__ import annotations

import logging
import os

# Every model is local (packaged or a configured directory): never reach for the Hub. Set before any
# backend module imports transformers, which reads it at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import proto
from batos.config import Settings
from services.forge.backends.base import Backend, BackendError, GenerationParams, GenerationResult

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
log = logging.getLogger(__name__)

__all__ = ["Backend", "BackendError", "GenerationParams", "GenerationResult", "make_backend"]


def make_backend(settings: Settings) -> Backend:
    """Build (and load) the configured backend. Slow for local models: call it from a thread."""
    kind = settings.llm_backend
    if kind == "embedded":
        return _embedded(settings)
    if kind == "hf":
        from services.forge.backends.local import LocalBackend

        if not settings.llm_model_path:
            raise BackendError(proto.ErrorCode.UNAVAILABLE, "llm_backend=hf needs llm_model_path (a local model dir)")
        return LocalBackend(
            settings.llm_model_path,
            dtype=settings.llm_dtype,
            device=settings.llm_device,
            context_tokens=settings.llm_context_tokens,
            threads=settings.llm_threads,
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


def _embedded(settings: Settings) -> Backend:
    from batos import models
    from services.forge.backends import llamacpp

    runtime = settings.llm_runtime
    try:
        spec = models.llm_spec(settings.llm_model)
        if runtime == "auto":
            runtime = "llamacpp" if llamacpp.available() else "transformers"
            if runtime == "transformers":
                log.warning("llama-cpp-python is not installed (see `make setup`): serving %s through "
                            "transformers, several times slower%s", EMBEDDED_MODEL_NAME,
                            "" if spec.hf_checkpoint else f", instead of {spec.display}")  # fmt: skip
        if runtime == "llamacpp":
            if not llamacpp.available():
                raise BackendError(proto.ErrorCode.UNAVAILABLE, "llm_runtime=llamacpp: llama-cpp-python missing")
            return llamacpp.LlamaCppBackend(
                models.llm_gguf_path(settings),
                model_name=spec.display,
                context_tokens=settings.llm_context_tokens,
                threads=settings.llm_threads,
                # adapters are trained on this model's HF form (the forge); they fit only the same model
                base_checkpoint=models.training_checkpoint_dir(settings),
            )
        from services.forge.backends.local import LocalBackend

        path = models.embedded_llm_checkpoint(settings)
    except models.ModelNotAvailable as e:
        raise BackendError(proto.ErrorCode.UNAVAILABLE, str(e)) from e
    # fp32 on CPU: faster than bf16 there, and the 135M model fits easily
    return LocalBackend(path, dtype="float32", device="cpu", context_tokens=settings.llm_context_tokens,
                        model_name=EMBEDDED_MODEL_NAME, threads=settings.llm_threads)  # fmt: skip
