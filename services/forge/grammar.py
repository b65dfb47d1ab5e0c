"""Constrained decoding for local models: JSON schema -> xgrammar logits processor.

Compiling a schema takes tens of milliseconds and building the tokenizer info once takes longer, so both
are cached; the logits processor itself is stateful and made fresh for every ``generate`` call (xgrammar's
own rule).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

import proto
from services.forge.backends.base import BackendError

MAX_CACHED_GRAMMARS = 32


class JsonGrammars:
    def __init__(self, tokenizer: Any, vocab_size: int):
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._compiler: Any = None
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def _get_compiler(self) -> Any:
        if self._compiler is None:
            import xgrammar

            info = xgrammar.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self._vocab_size)
            self._compiler = xgrammar.GrammarCompiler(info)
        return self._compiler

    def compiled(self, schema: dict[str, Any]) -> Any:
        key = json.dumps(schema)  # not sort_keys: property order is the order the model writes in
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            try:
                # Compact output: free whitespace lets a small model loop on spaces and newlines.
                grammar = self._get_compiler().compile_json_schema(key, any_whitespace=False)
            except Exception as e:  # xgrammar raises RuntimeError/ValueError on schemas it cannot handle
                raise BackendError(proto.ErrorCode.BAD_ARGS, f"unusable json_schema: {e}") from e
            self._cache[key] = grammar
            if len(self._cache) > MAX_CACHED_GRAMMARS:
                self._cache.popitem(last=False)
            return grammar

    def logits_processor(self, schema: dict[str, Any]) -> Any:
        from xgrammar.contrib.hf import LogitsProcessor

        return LogitsProcessor(self.compiled(schema))
