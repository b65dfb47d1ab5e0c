"""Is a model's text usable? Empty output and repetition loops ("server-server-server...") are not.

A 135M model loops often. :func:`check` names the problem in words the Architect can read, and finds where a
loop starts so a useful opening can be kept (:attr:`Verdict.prefix`). Checks, each with its reason:
  * empty: nothing but whitespace or punctuation;
  * run: a unit of 1-8 words repeated back to back at least REPEAT_MIN times, covering RUN_SHARE of the words
    or running to the end of the text (the model looped until max_tokens);
  * low variety: fewer than VARIETY_MIN distinct words among the words (texts of at least 12 words);
  * compressible: long text that zlib shrinks below COMPRESS_MIN of its size (loops without word breaks).
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

REPEAT_MIN = 4  # back-to-back repeats of one unit that make a loop
RUN_SHARE = 0.4  # share of all words inside the longest loop that makes the whole text degenerate
VARIETY_MIN = 0.25  # distinct/total words below which text is degenerate (checked from 12 words)
COMPRESS_MIN = 0.12  # zlib ratio below which long text is a loop
COMPRESS_FROM_CHARS = 300
MAX_UNIT = 8
PREFIX_MIN_WORDS = 12  # an opening before a loop worth keeping

_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class Verdict:
    degenerate: bool
    reason: str = ""
    prefix: str = ""  # the text before a detected loop, when long enough to be worth keeping


def _longest_run(words: list[str]) -> tuple[int, int, int]:
    """(start word index, repeats, unit length) of the longest back-to-back repetition."""
    best = (0, 1, 1)
    n = len(words)
    for unit in range(1, min(MAX_UNIT, n // 2) + 1):
        i = 0
        while i + unit <= n:
            reps = 1
            while i + (reps + 1) * unit <= n and words[i + reps * unit: i + (reps + 1) * unit] == words[i: i + unit]:
                reps += 1
            if reps * unit > best[1] * best[2] and reps >= 2:
                best = (i, reps, unit)
            i += max(1, (reps - 1) * unit) if reps > 1 else 1
    return best


def check(text: str | None) -> Verdict:
    body = (text or "").strip()
    matches = list(_WORD.finditer(body.lower()))
    words = [m.group() for m in matches]
    if not words:
        return Verdict(True, "the model's answer was empty")
    start, reps, unit = _longest_run(words)
    trailing = start + reps * unit >= len(words) - unit  # a loop running into max_tokens
    if reps >= REPEAT_MIN and (trailing or reps * unit >= RUN_SHARE * len(words)):
        loop = " ".join(words[start: start + unit])
        prefix = body[: matches[start].start()].strip() if start >= PREFIX_MIN_WORDS else ""
        if prefix and check(prefix).degenerate:
            prefix = ""
        return Verdict(True, f"the model's answer is a repetition loop ({loop!r} x{reps})", prefix)
    if len(words) >= 12 and len(set(words)) < VARIETY_MIN * len(words):
        return Verdict(True, f"the model's answer repeats itself ({len(set(words))} distinct words of {len(words)})")
    raw = body.encode("utf-8")
    if len(raw) >= COMPRESS_FROM_CHARS and len(zlib.compress(raw)) < COMPRESS_MIN * len(raw):
        return Verdict(True, "the model's answer is highly repetitive")
    return Verdict(False)
