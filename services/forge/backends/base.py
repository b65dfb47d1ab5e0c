"""The one interface every LLM backend implements, and the types that cross it.

A backend is synchronous and blocking: the llm service runs ``generate`` in a worker thread, one at a
time, and passes a ``cancel`` event and a deadline that the backend must honour between tokens. Tokens
go out through ``on_token`` from that same thread (the service forwards them with
``req.emit_threadsafe``). Errors are :class:`BackendError` with a protocol error code, so this layer does
not depend on the worker runtime.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import proto

TokenCallback = Callable[[str], None]

# finish reasons
STOP = "stop"  # end of sequence or a stop string
LENGTH = "length"  # max_tokens reached
CANCELLED = "cancelled"  # the requester went away
TIMEOUT = "timeout"  # the request's deadline passed


class BackendError(Exception):
    def __init__(self, code: proto.ErrorCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class GenerationParams:
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    json_schema: dict[str, Any] | None = None  # constrain the output to this JSON schema
    repetition_penalty: float = 1.0
    deadline: float | None = None  # time.monotonic() by which generation must stop


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float  # generation start -> first generated token
    total_s: float  # generation start -> last token
    tokens_per_s: float  # decode rate after the first token (see tokens_per_second)
    adapter: str | None
    model: str
    finish_reason: str = STOP
    max_tokens: int = 0  # effective limit (clamped to the context window)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def tokens_per_second(completion_tokens: int, ttft_s: float, total_s: float) -> float:
    """Decode throughput: tokens after the first over the time after the first.

    The first token's latency is reported separately as TTFT (it includes the prompt's prefill), so
    mixing it in would make short replies look slow.
    """
    if completion_tokens > 1 and total_s > ttft_s:
        return (completion_tokens - 1) / (total_s - ttft_s)
    return completion_tokens / total_s if total_s > 0 else 0.0


Messages = Sequence[Mapping[str, str]]


class Backend(ABC):
    """A chat model. ``persona`` selects the persona's adapter (if any); messages already carry the
    persona's system prompt."""

    name: str = "backend"
    model_name: str = ""
    supports_json_schema: bool = False

    @property
    @abstractmethod
    def context_tokens(self) -> int:
        """The context window in tokens (0 when unknown)."""

    @abstractmethod
    def generate(
        self,
        persona: str,
        messages: Messages,
        params: GenerationParams,
        on_token: TokenCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> GenerationResult: ...

    @abstractmethod
    def count_tokens(self, text: str) -> int: ...

    @abstractmethod
    def adapters(self) -> dict[str, dict[str, Any] | None]:
        """persona -> adapter info (path, meta, name) or None."""

    @abstractmethod
    def activate_adapter(self, persona: str, path: str, meta: dict[str, Any] | None = None) -> dict[str, Any]: ...

    @abstractmethod
    def deactivate_adapter(self, persona: str) -> bool:
        """Drop the persona's adapter; False if it had none."""

    def info(self) -> dict[str, Any]:
        return {"backend": self.name, "model": self.model_name, "context_tokens": self.context_tokens}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (models, connections)."""
