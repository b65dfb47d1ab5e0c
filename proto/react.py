"""The ReAct action vocabulary: the one definition the kernel's loop and the llm service's ``action`` share.

The kernel (services/kernel/react.py) asks BABS for one thought per step with llm ``action``; the llm service
(services/forge/structured.py) constrains the model's output to :func:`action_schema`, parses and normalises
it to a :class:`ReactAction`; the forge's evaluation scores an adapter's outputs against the same schema.
Every bound lives here once: the names and what each does, how long a thought and a query may be, how many
summary ids a step may name, and how many hits each search asks memory for. A change here changes both sides.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, Final, Literal

import msgspec

ActionName = Literal["search_summaries", "zoom", "search_chunks", "answer"]

# name -> what the model is told it does (the prompt lists them in this order)
ACTIONS: Final[dict[str, str]] = {
    "search_summaries": "search file and class summaries for an overview (set query)",
    "zoom": "read the code chunks inside the summaries named in summary_ids, e.g. [\"S1\"] (set query)",
    "search_chunks": "search all code chunks directly (set query)",
    "answer": "the code chunks found are enough to answer the question; stop searching",
}
ANSWER: Final = "answer"  # the one action that may come without a query

THOUGHT_MAX: Final = 200  # characters: one sentence of reasoning
QUERY_MAX: Final = 120  # characters: a search text a small model writes without looping
SUMMARY_IDS_MAX: Final = 3  # summaries one step may zoom into
SUMMARY_ID_MAX: Final = 32  # a label ("S1") or an oid (short hex)
SUMMARY_K: Final = 4  # summaries per search: enough to orient, few enough for a small model to read
CHUNK_K: Final = 6  # chunks per search; the Token Governor trims to the answer budget later

SummaryId = Annotated[str, msgspec.Meta(max_length=SUMMARY_ID_MAX)]


class ReactAction(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One parsed step: why, which action, the search text, the summaries to read (labels or oids)."""

    thought: Annotated[str, msgspec.Meta(max_length=THOUGHT_MAX)] = ""
    action: ActionName
    query: Annotated[str, msgspec.Meta(max_length=QUERY_MAX)] = ""
    summary_ids: Annotated[list[SummaryId], msgspec.Meta(max_length=SUMMARY_IDS_MAX)] = []


def action_schema(names: Iterable[str] = ACTIONS) -> dict[str, Any]:
    """The JSON schema the model's output is constrained to (xgrammar / GBNF / ``response_format``).

    Written by hand rather than derived from :class:`ReactAction`: the property order is the order the model
    writes in ("thought" first, so it reasons before it commits) and constrained decoders want it flat; the
    bounds are the same constants (tests/unit/test_react_vocabulary.py proves it)."""
    return {
        "type": "object",
        "properties": {
            "thought": {"type": "string", "maxLength": THOUGHT_MAX},
            "action": {"type": "string", "enum": list(names)},
            "query": {"type": "string", "maxLength": QUERY_MAX},
            "summary_ids": {
                "type": "array",
                "items": {"type": "string", "maxLength": SUMMARY_ID_MAX},
                "maxItems": SUMMARY_IDS_MAX,
            },
        },
        "required": ["thought", "action", "query", "summary_ids"],
        "additionalProperties": False,
    }

