"""Turning a stream of token ids into a stream of text, and stop strings.

``IncrementalDecoder`` decodes token by token without re-decoding the whole output each time and without
emitting half a UTF-8 character (byte-level BPE splits multi-byte characters across tokens).
``StopText`` cuts the text at the first stop string and holds back a tail that might be the start of
one, so a streamed client never sees any part of a stop string.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

_INCOMPLETE = "\ufffd"  # what a tokenizer decodes an unfinished UTF-8 sequence to


class IncrementalDecoder:
    """Decode ids as they arrive. Keeps a short window of earlier tokens (the "prefix") so tokenizers that
    change a token's rendering with its left context (leading spaces in SentencePiece) decode right."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip) if ids else ""

    def push(self, ids: Iterable[int]) -> str:
        self._ids.extend(ids)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) > len(before) and not after.endswith(_INCOMPLETE):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is left, incomplete characters included (the stream has ended)."""
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return after[len(before) :]


class StopText:
    """Accumulates generated text; ``feed`` returns what may be released now."""

    def __init__(self, stops: Iterable[str] = ()):
        self.stops = [s for s in stops if s]
        self.text = ""
        self.stopped = False
        self._released = 0

    def _held_tail(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of some stop string."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def feed(self, piece: str) -> str:
        if self.stopped or not piece:
            return ""
        # a stop string can only newly appear in the region that overlaps the new piece
        start = max(0, len(self.text) - max((len(s) for s in self.stops), default=0))
        self.text += piece
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
            return self._release(len(self.text))
        return self._release(len(self.text) - self._held_tail())

    def finish(self) -> str:
        """The stream has ended: a held tail was not a stop string after all."""
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        upto = max(upto, self._released)
        out = self.text[self._released : upto]
        self._released = upto
        return out
