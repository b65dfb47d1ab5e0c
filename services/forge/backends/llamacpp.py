"""A GGUF model run by llama.cpp (llama-cpp-python) in this process: the embedded default on CPU.

The GGUF is loaded straight from its package (or the assembled file in the cache): no conversion. ONE
``Llama`` object lives as long as the backend, so its KV cache survives between requests and a prompt
that starts like the previous one only pays for its new tail (a ReAct loop's second turn: 52 s -> 6 s
measured here). The prompt is prefilled here in short chunks rather than inside ``Llama.generate``, so a
cancel or a deadline is noticed within one chunk even during a long prefill; ``generate`` then finds the
whole prompt cached and starts sampling at once.

Structured output: the JSON schema becomes a GBNF grammar (llama.cpp's own converter), applied by the
sampler. Adapters: a PEFT LoRA is converted once to a GGUF LoRA (backends/gguf_lora.py) and set on
the context per request, for the persona that owns it.
"""

from __future__ import annotations

import codecs
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import proto
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
from services.forge.spare_cores import SpareCores, bound_openmp_spinning
from services.forge.streaming import StopText

bound_openmp_spinning()  # llama_cpp is imported lazily, below: its OpenMP runtime reads this when it loads
log = logging.getLogger(__name__)

DEFAULT_CONTEXT = 8192  # KV cache size when the setting is 0: Qwen's 32k would cost memory for nothing here
PREFILL_CHUNK = 128  # prompt tokens per decode call: bounds cancel latency during a prefill (~1 s here)
MAX_CACHED_GRAMMARS = 32


def available() -> bool:
    """Whether llama-cpp-python is installed (and its shared library loads)."""
    try:
        import llama_cpp  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


class _Adapter:
    """A GGUF LoRA loaded into the model, applied only to its persona's requests."""

    def __init__(self, handle: Any, info: dict[str, Any]):
        self.handle = handle
        self.info = info


class LlamaCppBackend(Backend):
    name = "llamacpp"
    supports_json_schema = True

    def __init__(
        self,
        gguf_path: str | Path,
        *,
        model_name: str = "",
        context_tokens: int = 0,
        threads: int = 1,
        base_checkpoint: str | Path | None = None,
    ):
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        path = Path(gguf_path)
        if not path.is_file():
            raise BackendError(proto.ErrorCode.UNAVAILABLE, f"no GGUF model at {str(path)!r}")
        started = time.monotonic()
        # threads 0: follow the machine, between 1 and our cores, re-decided while a request runs
        self._spare = SpareCores() if threads <= 0 else None
        self.threads = self._spare.max_threads if self._spare else threads
        self.threads_used: set[int] = set()  # by the last request (logged)
        try:
            llm = Llama(
                model_path=str(path),
                n_ctx=context_tokens or DEFAULT_CONTEXT,
                n_batch=PREFILL_CHUNK,
                n_threads=self.threads,
                n_threads_batch=self.threads,
                # ~13% more prompt tokens per CPU-second on this CPU (Qwen 0.5B, 1,000 tokens: 77 vs 67), and a
                # prompt is most of an `ask`'s time; llama-cpp-python's default (False) turns it off explicitly
                flash_attn=True,
                verbose=False,
            )
        except (ValueError, RuntimeError) as e:
            raise BackendError(proto.ErrorCode.UNAVAILABLE, f"llama.cpp cannot load {path}: {e}") from e
        self._llm = llm
        self.load_s = time.monotonic() - started
        self.path = path
        self.model_name = model_name or path.stem
        self.base_checkpoint = str(base_checkpoint) if base_checkpoint else None  # what adapters were trained on
        self._context = llm.n_ctx()
        template = llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise BackendError(proto.ErrorCode.UNAVAILABLE, f"{path.name} has no chat template (a base model?)")
        eos = llm.token_eos()
        bos = llm.token_bos()
        self._formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=llm._model.token_get_text(eos) if eos != -1 else "",
            bos_token=llm._model.token_get_text(bos) if bos != -1 else "",
        )
        self._grammars: OrderedDict[str, Any] = OrderedDict()
        self._adapters: dict[str, _Adapter] = {}
        self._applied: str | None = None  # the persona whose adapter the KV cache was computed with
        self._lock = threading.Lock()
        self.last_reused = 0
        log.info("loaded %s with llama.cpp (%s threads, n_ctx %d) in %.2f s", self.model_name,
                 f"1-{self.threads} (auto)" if self._spare else self.threads, self._context, self.load_s)  # fmt: skip

    # -- the Backend interface ------------------------------------------------------------------

    @property
    def context_tokens(self) -> int:
        return self._context

    def info(self) -> dict[str, Any]:
        return {**super().info(), "runtime": "llama.cpp", "gguf": str(self.path), "threads": self.threads,
                "threads_auto": self._spare is not None, "load_s": round(self.load_s, 3)}  # fmt: skip

    def encode_chat(self, messages: Messages) -> list[int]:
        """Prompt token ids of the chat with the assistant turn opened (the GGUF's own chat template)."""
        # role/content dicts are llama_cpp's ChatCompletionRequestMessage TypedDicts in all but name
        chat: list[Any] = [dict(m) for m in messages]
        rendered = self._formatter(messages=chat)
        return self._llm.tokenize(rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True)

    def count_tokens(self, text: str) -> int:
        return len(self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def fit_max_tokens(self, prompt_tokens: int, max_tokens: int) -> int:
        if prompt_tokens >= self._context:
            raise BackendError(
                proto.ErrorCode.BAD_ARGS,
                f"prompt is {prompt_tokens} tokens; the model's context is {self._context} tokens",
            )
        return min(max_tokens, self._context - prompt_tokens)

    def grammar(self, schema: dict[str, Any]) -> Any:
        from llama_cpp import LlamaGrammar

        key = json.dumps(schema)  # not sort_keys: property order is the order the model writes in
        if key not in self._grammars:
            try:
                self._grammars[key] = LlamaGrammar.from_json_schema(key, verbose=False)
            except Exception as e:  # the converter raises plain Exceptions on schemas it cannot handle
                raise BackendError(proto.ErrorCode.BAD_ARGS, f"unusable json_schema: {e}") from e
            if len(self._grammars) > MAX_CACHED_GRAMMARS:
                self._grammars.popitem(last=False)
        self._grammars.move_to_end(key)
        return self._grammars[key]

    def generate(
        self,
        persona: str,
        messages: Messages,
        params: GenerationParams,
        on_token: TokenCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> GenerationResult:
        cancel = cancel or threading.Event()
        prompt = self.encode_chat(messages)
        max_new = self.fit_max_tokens(len(prompt), params.max_tokens)
        grammar = self.grammar(params.json_schema) if params.json_schema is not None else None
        stop = StopText(params.stop)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # tokens split UTF-8 characters

        def interrupted() -> str | None:
            if cancel.is_set():
                return CANCELLED
            if params.deadline is not None and time.monotonic() >= params.deadline:
                return TIMEOUT
            return None

        def send(text: str) -> None:
            if text and on_token is not None:
                on_token(text)

        with self._lock:
            if cancel.is_set():
                raise BackendError(proto.ErrorCode.CANCELLED, "cancelled before generation started")
            adapter = self._use_adapter(persona)
            started = time.monotonic()
            self.threads_used = set()
            reason = self._prefill(prompt, interrupted)
            first_at = last_at = None
            completion = 0
            if reason is None:
                llm = self._llm
                tokens = llm.generate(
                    prompt, temp=params.temperature, top_p=params.top_p if params.temperature > 0 else 1.0,
                    top_k=40 if params.temperature > 0 else 0, min_p=0.0, repeat_penalty=params.repetition_penalty,
                    grammar=grammar,
                )  # fmt: skip
                reason = LENGTH
                for token in tokens:
                    last_at = time.monotonic()
                    first_at = first_at or last_at
                    if _is_eog(llm, token):
                        reason = STOP
                        break
                    completion += 1
                    send(stop.feed(decoder.decode(llm.detokenize([token]))))
                    if stop.stopped:
                        reason = STOP
                        break
                    reason = interrupted() or LENGTH
                    if reason != LENGTH or completion >= max_new:
                        break
                    self._fit_threads()  # for the next token's decode, which the generator runs on resuming
                tokens.close()  # the generator's state is consistent: the KV cache holds what was decoded
            send(stop.feed(decoder.decode(b"", final=True)) + stop.finish())
        end = last_at or time.monotonic()
        ttft = (first_at or end) - started
        log.info("generate %s: prompt %d tokens (%d reused from the KV cache), %d generated, TTFT %.2f s, "
                 "total %.2f s, %s, threads %s", persona, len(prompt), self.last_reused, completion, ttft,
                 end - started, reason, sorted(self.threads_used))  # fmt: skip
        return GenerationResult(
            text=stop.text,
            prompt_tokens=len(prompt),
            completion_tokens=completion,
            ttft_s=ttft,
            total_s=end - started,
            tokens_per_s=tokens_per_second(completion, ttft, end - started),
            adapter=adapter,
            model=self.model_name,
            finish_reason=reason,
            max_tokens=max_new,
        )

    def _prefill(self, prompt: Sequence[int], interrupted: Any) -> str | None:
        """Decode the part of the prompt the KV cache lacks, chunk by chunk; the interrupt reason, if any.

        Keeps the longest common prefix with what the cache holds (llama.cpp removes the rest), but always
        re-decodes at least the last prompt token so fresh logits exist to sample from.
        """
        llm = self._llm
        held = llm._input_ids.tolist()
        common = 0
        for a, b in zip(held, prompt, strict=False):
            if a != b:
                break
            common += 1
        common = min(common, len(prompt) - 1)
        if common < llm.n_tokens:
            if not llm._ctx.kv_cache_seq_rm(-1, common, -1):
                common = 0
                llm.reset()
            llm.n_tokens = common
        self.last_reused = common  # what the KV cache already held of this prompt (reported, logged)
        for i in range(common, len(prompt), PREFILL_CHUNK):
            reason = interrupted()
            if reason is not None:
                return reason
            self._fit_threads()
            llm.eval(prompt[i : i + PREFILL_CHUNK])
        self._fit_threads()  # for the first sampled token
        return None

    def _fit_threads(self) -> None:
        """Set the next decode's thread count to the cores the machine leaves us (fixed threads: as set)."""
        if self._spare is not None and (n := self._spare.threads()) != self.threads:
            self._llm._ctx.set_n_threads(n, n)
            self.threads = n
        self.threads_used.add(self.threads)

    # -- adapters ---------------------------------------------------------------------------------

    def _use_adapter(self, persona: str) -> str | None:
        """Set the persona's LoRA (or none) on the context; the KV cache is only valid for one choice."""
        from llama_cpp import llama_cpp as C

        wanted = persona if persona in self._adapters else None
        if wanted != self._applied:
            import ctypes

            if wanted is None:
                C.llama_set_adapters_lora(self._llm._ctx.ctx, None, 0, None)
            else:
                handles = (C.llama_adapter_lora_p_ctypes * 1)(self._adapters[wanted].handle)
                scales = (ctypes.c_float * 1)(1.0)
                if C.llama_set_adapters_lora(self._llm._ctx.ctx, handles, 1, scales):
                    raise BackendError(proto.ErrorCode.INTERNAL, f"llama.cpp refused the adapter of {wanted}")
            self._llm.reset()  # cached keys/values were computed with the other weights
            self._applied = wanted
        return self._adapters[wanted].info["name"] if wanted else None

    def adapters(self) -> dict[str, dict[str, Any] | None]:
        return {p: dict(a.info) for p, a in self._adapters.items()}

    def activate_adapter(self, persona: str, path: str, meta: dict[str, Any] | None = None) -> dict[str, Any]:
        from llama_cpp import llama_cpp as C

        from services.forge.backends.gguf_lora import gguf_lora_for

        lora = gguf_lora_for(Path(path), self.base_checkpoint)
        handle = C.llama_adapter_lora_init(self._llm._model.model, str(lora).encode())
        if not handle:
            raise BackendError(proto.ErrorCode.BAD_ARGS, f"llama.cpp cannot load the LoRA {lora} for this model")
        info = {"path": path, "name": Path(path).name, "gguf": str(lora), "meta": dict(meta or {})}
        with self._lock:
            self._drop(persona)
            self._adapters[persona] = _Adapter(handle, info)
        return dict(info)

    def deactivate_adapter(self, persona: str) -> bool:
        with self._lock:
            return self._drop(persona)

    def _drop(self, persona: str) -> bool:
        from llama_cpp import llama_cpp as C

        adapter = self._adapters.pop(persona, None)
        if adapter is None:
            return False
        if self._applied == persona:
            C.llama_set_adapters_lora(self._llm._ctx.ctx, None, 0, None)
            self._llm.reset()
            self._applied = None
        C.llama_adapter_lora_free(adapter.handle)
        return True

    def close(self) -> None:
        with self._lock:
            for persona in list(self._adapters):
                self._drop(persona)
            self._llm.close()


def _is_eog(llm: Any, token: int) -> bool:
    from llama_cpp import llama_cpp as C

    return bool(C.llama_vocab_is_eog(llm._model.vocab, token))
