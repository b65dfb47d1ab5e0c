"""A transformers causal LM in this process: the embedded SmolLM2 or any local HF checkpoint.

One model, one generation at a time (a lock; the llm service also queues fairly in front of it).
Tokens stream from inside ``generate`` through a streamer that runs in the generation thread itself, so
there is no extra thread and no queue between the model and the requester. Cancellation, deadlines and
stop strings end generation through a stopping criterion checked after every token.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import StoppingCriteria
from transformers.generation.streamers import BaseStreamer

import proto
from services.forge.adapters import AdapterSet
from services.forge.backends.base import (
    CANCELLED,
    LENGTH,
    STOP,
    TIMEOUT,
    Backend,
    BackendError,
    GenerationParams,
    GenerationResult,
    Messages,
    TokenCallback,
    tokens_per_second,
)
from services.forge.grammar import JsonGrammars
from services.forge.spare_cores import SpareCores
from services.forge.streaming import IncrementalDecoder, StopText

log = logging.getLogger(__name__)

_DTYPES = {
    "float32": "float32", "fp32": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}  # fmt: skip


def resolve_device(device: str) -> str:
    import torch

    if device in ("", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendError(proto.ErrorCode.UNAVAILABLE, f"llm_device={device!r} but CUDA is not available")
    return device


def resolve_dtype(dtype: str, device: str) -> Any:
    """``auto``: bf16 on a GPU that supports it (Llama-3.1-8B in 16 GB), fp32 on CPU (fastest there)."""
    import torch

    if dtype in ("", "auto"):
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in _DTYPES:
        raise BackendError(proto.ErrorCode.BAD_ARGS, f"unknown llm_dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return getattr(torch, _DTYPES[dtype])


class _Streamer(BaseStreamer):
    """Called by generate() in the generation thread: put() per new token, end() once."""

    def __init__(self, tokenizer: Any, stop: StopText, on_token: TokenCallback | None):
        self._decoder = IncrementalDecoder(tokenizer)
        self._stop = stop
        self._on_token = on_token
        self._prompt_seen = False
        self.started = time.monotonic()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None

    def _send(self, text: str) -> None:
        if text and self._on_token is not None:
            self._on_token(text)

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # generate() first pushes the prompt
            self._prompt_seen = True
            return
        now = time.monotonic()
        if self.first_token_at is None:
            self.first_token_at = now
        self.last_token_at = now
        self._send(self._stop.feed(self._decoder.push(value.reshape(-1).tolist())))

    def end(self) -> None:
        self._send(self._stop.feed(self._decoder.flush()) + self._stop.finish())


class _Interrupt(StoppingCriteria):
    """Stopping criterion: the requester cancelled, the deadline passed, or a stop string appeared.

    Called after every token, in the generation thread: ``between_tokens`` runs there too (thread count)."""

    def __init__(
        self, cancel: threading.Event, deadline: float | None, stop: StopText, between_tokens: Callable[[], None]
    ):
        self._cancel = cancel
        self._deadline = deadline
        self._stop = stop
        self._between_tokens = between_tokens
        self.reason: str | None = None

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        self._between_tokens()
        if self._cancel.is_set():
            self.reason = CANCELLED
        elif self._deadline is not None and time.monotonic() >= self._deadline:
            self.reason = TIMEOUT
        elif self._stop.stopped:
            self.reason = STOP
        return torch.full((input_ids.shape[0],), self.reason is not None, dtype=torch.bool, device=input_ids.device)


class LocalBackend(Backend):
    name = "local"
    supports_json_schema = True

    def __init__(
        self,
        model_path: str | Path,
        *,
        dtype: str = "auto",
        device: str = "auto",
        context_tokens: int = 0,
        model_name: str = "",
        threads: int = 0,
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(model_path)
        if not (path / "config.json").is_file():
            raise BackendError(proto.ErrorCode.UNAVAILABLE, f"no model at {str(model_path)!r} (config.json missing)")
        self.device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, self.device)
        # on CPU, threads 0 follows the machine as the llama.cpp backend does (spare_cores.py); n fixes it
        self._spare = SpareCores() if self.device == "cpu" and threads <= 0 else None
        if self.device == "cpu" and threads > 0:
            torch.set_num_threads(threads)
        started = time.monotonic()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        # device_map puts the weights straight onto the GPU instead of staging 16 GB in host memory
        device_map = self.device if self.device != "cpu" else None
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype, device_map=device_map)
        model.eval()
        self.load_s = time.monotonic() - started
        self.model_name = model_name or path.name
        self.dtype = str(torch_dtype).removeprefix("torch.")
        limit = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        self._context = min(limit, context_tokens) if context_tokens and limit else (context_tokens or limit)
        eos = model.generation_config.eos_token_id
        self._eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self._pad_id = self.tokenizer.pad_token_id
        if self._pad_id is None and self._eos_ids:
            self._pad_id = min(self._eos_ids)
        self._adapters = AdapterSet(model)
        self._grammars = JsonGrammars(self.tokenizer, model.config.vocab_size)
        self._lock = threading.Lock()
        log.info("loaded %s (%s, %s) in %.1f s", self.model_name, self.device, self.dtype, self.load_s)

    # -- the Backend interface ------------------------------------------------------------------

    @property
    def context_tokens(self) -> int:
        return self._context

    @property
    def model(self) -> Any:
        """The model as it stands (a PeftModel once an adapter is loaded)."""
        return self._adapters.model

    def info(self) -> dict[str, Any]:
        return {**super().info(), "device": self.device, "dtype": self.dtype, "load_s": round(self.load_s, 3),
                "threads_auto": self._spare is not None}  # fmt: skip

    def _fit_threads(self) -> None:
        """torch's intra-op threads for the next forward pass: the cores the machine leaves (auto on CPU)."""
        if self._spare is not None:
            import torch

            if (n := self._spare.threads()) != torch.get_num_threads():
                torch.set_num_threads(n)

    def encode_chat(self, messages: Messages) -> Any:
        """input_ids (1 x n) of the chat with the assistant turn opened."""
        enc = self.tokenizer.apply_chat_template(
            [dict(m) for m in messages], add_generation_prompt=True, return_dict=True, return_tensors="pt"
        )
        return enc["input_ids"]

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def fit_max_tokens(self, prompt_tokens: int, max_tokens: int) -> int:
        """Clamp max_tokens to the room the context leaves; refuse a prompt that fills it."""
        if self._context and prompt_tokens >= self._context:
            raise BackendError(
                proto.ErrorCode.BAD_ARGS,
                f"prompt is {prompt_tokens} tokens; the model's context is {self._context} tokens",
            )
        return min(max_tokens, self._context - prompt_tokens) if self._context else max_tokens

    def generate(
        self,
        persona: str,
        messages: Messages,
        params: GenerationParams,
        on_token: TokenCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> GenerationResult:
        from transformers import LogitsProcessorList, StoppingCriteriaList

        cancel = cancel or threading.Event()
        input_ids = self.encode_chat(messages)
        prompt_tokens = int(input_ids.shape[1])
        max_new = self.fit_max_tokens(prompt_tokens, params.max_tokens)
        stop = StopText(params.stop)
        interrupt = _Interrupt(cancel, params.deadline, stop, self._fit_threads)
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new,
            "min_new_tokens": 0,
            "pad_token_id": self._pad_id,
            "stopping_criteria": StoppingCriteriaList([interrupt]),
        }
        if params.temperature > 0:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if params.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = params.repetition_penalty
        if params.json_schema is not None:
            kwargs["logits_processor"] = LogitsProcessorList([self._grammars.logits_processor(params.json_schema)])

        with self._lock, self._adapters.use(persona) as (model, adapter):
            if cancel.is_set():
                raise BackendError(proto.ErrorCode.CANCELLED, "cancelled before generation started")
            streamer = _Streamer(self.tokenizer, stop, on_token)
            input_ids = input_ids.to(model.device)
            self._fit_threads()
            output = model.generate(
                input_ids=input_ids, attention_mask=input_ids.new_ones(input_ids.shape), streamer=streamer, **kwargs
            )
        completion = int(output.shape[1]) - prompt_tokens
        end = streamer.last_token_at or time.monotonic()
        ttft = (streamer.first_token_at or end) - streamer.started
        total = end - streamer.started
        if interrupt.reason is not None:
            reason = interrupt.reason
        else:
            ended_on_eos = completion > 0 and int(output[0, -1]) in self._eos_ids
            reason = STOP if ended_on_eos or completion < max_new else LENGTH
        return GenerationResult(
            text=stop.text,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion,
            ttft_s=ttft,
            total_s=total,
            tokens_per_s=tokens_per_second(completion, ttft, total),
            adapter=adapter,
            model=self.model_name,
            finish_reason=reason,
            max_tokens=max_new,
        )

    def next_token_logits(self, persona: str, messages: Messages) -> Any:
        """Logits (float32, on CPU) for the token after the chat prompt, as ``persona`` would see them."""
        import torch

        input_ids = self.encode_chat(messages)
        with self._lock, self._adapters.use(persona) as (model, _), torch.inference_mode():
            self._fit_threads()
            out = model(input_ids=input_ids.to(model.device))
        return out.logits[0, -1].float().cpu()

    # -- adapters ---------------------------------------------------------------------------------

    def adapters(self) -> dict[str, dict[str, Any] | None]:
        return dict(self._adapters.info())

    def activate_adapter(self, persona: str, path: str, meta: dict[str, Any] | None = None) -> dict[str, Any]:
        with self._lock:
            return self._adapters.activate(persona, path, meta).info()

    def deactivate_adapter(self, persona: str) -> bool:
        with self._lock:
            return self._adapters.deactivate(persona)

    def close(self) -> None:
        with self._lock:
            self._adapters = AdapterSet(None)
