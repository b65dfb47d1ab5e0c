"""What comes back from the sandbox is untrusted input: decode it like a network message.

The method runs in the same process as the code that writes its result, so it can write any bytes to the
result descriptor and exit (a forged "ok"), or return values built to hurt the reader (deep nesting, huge
strings, slot names that are not slots). ``decode_result`` is the only way the host reads a result:

- a size limit before decoding (``RESULT_MAX_BYTES``), then msgspec into a typed schema (unknown fields and
  wrong types are errors, not coerced);
- values are JSON data, nested at most ``MAX_DEPTH`` levels, with at most ``MAX_NODES`` items in all;
- ``slot_updates`` may name only slots the object can hold (identifiers, not ``_private``, not reserved by
  UvmObject), at most ``MAX_SLOT_UPDATES`` of them; ``deleted_slots`` only slots that were passed in (the
  target's own view of its slots): a result cannot reach another object or the persistence machinery;
- error texts and tracebacks are cut to a fixed length; ``error_kind`` is one of the known values.

Anything else raises :class:`MalformedResult` with the reason; sandbox.py turns that into a failed run
(``error_kind="output"``): nothing a malformed result says is used.
"""

from __future__ import annotations

import keyword
from typing import Any

import msgspec

RESULT_MAX_BYTES = 1 << 20  # JSON of the result (value + slot updates)
MAX_DEPTH = 48  # the runner's to_jsonable stops at 40
MAX_NODES = 200_000
MAX_SLOT_UPDATES = 256
MAX_TEXT = 8_000  # error and traceback texts
ERROR_KINDS = frozenset({"exception", "memory", "output", "sandbox"})


class MalformedResult(ValueError):
    """The sandbox's result does not match the schema; nothing in it may be used."""


class WireResult(msgspec.Struct, forbid_unknown_fields=True):
    ok: bool
    value: Any = None
    slot_updates: dict[str, Any] = {}
    deleted_slots: list[str] = []
    error: str | None = None
    error_kind: str | None = None
    exc_type: str | None = None
    traceback: str | None = None


_DECODER = msgspec.json.Decoder(WireResult)


def decode_result(data: bytes, slot_names: frozenset[str] | set[str],
                  reserved: frozenset[str] = frozenset()) -> WireResult:
    """Decode and check one result; raise MalformedResult saying what is wrong."""
    if len(data) > RESULT_MAX_BYTES:
        raise MalformedResult(f"result is {len(data)} bytes (limit {RESULT_MAX_BYTES})")
    try:
        result = _DECODER.decode(data)
    except msgspec.ValidationError as e:
        raise MalformedResult(f"result does not match the schema: {e}") from None
    except msgspec.DecodeError as e:
        raise MalformedResult(f"result is not JSON: {e}") from None
    except RecursionError:
        raise MalformedResult("result is nested too deeply") from None
    _check_data(result.value, "value")
    if len(result.slot_updates) > MAX_SLOT_UPDATES:
        raise MalformedResult(f"{len(result.slot_updates)} slot updates (limit {MAX_SLOT_UPDATES})")
    for name, value in result.slot_updates.items():
        _check_slot_name(name, reserved)
        _check_data(value, f"slot {name!r}")
    for name in result.deleted_slots:
        _check_slot_name(name, reserved)
        if name not in slot_names:
            raise MalformedResult(f"deleted slot {name!r} is not one of the receiver's slots")
    if result.ok and (result.error is not None or result.error_kind is not None):
        raise MalformedResult("a successful result carries an error")
    if not result.ok:
        if result.error_kind not in ERROR_KINDS:
            raise MalformedResult(f"unknown error_kind {result.error_kind!r}")
        if result.slot_updates or result.deleted_slots or result.value is not None:
            raise MalformedResult("a failed result carries a value or slot changes")
        if result.exc_type is not None and not (result.exc_type.isidentifier() and len(result.exc_type) <= 100):
            raise MalformedResult("exc_type is not a class name")
        result.error = (result.error or "")[:MAX_TEXT]
        result.traceback = None if result.traceback is None else result.traceback[-MAX_TEXT:]
    return result


def _check_slot_name(name: str, reserved: frozenset[str]) -> None:
    if not name.isidentifier() or keyword.iskeyword(name) or name.startswith("_") or name in reserved:
        raise MalformedResult(f"{name[:60]!r} is not a slot name the object can hold")


def data_shape_problem(value: Any, max_depth: int = MAX_DEPTH, max_nodes: int = MAX_NODES) -> str:
    """Why ``value`` is not plain data within the limits ("" when it is). Iterative: no recursion to exhaust,
    so it is safe on input nested far deeper than Python's own recursion limit."""
    try:
        _check_data(value, "value", max_depth, max_nodes)
    except MalformedResult as e:
        return str(e)
    return ""


def _check_data(value: Any, where: str, max_depth: int = MAX_DEPTH, max_nodes: int = MAX_NODES) -> None:
    """Iterative (no recursion to exhaust): depth and node count of decoded JSON."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    nodes = 0
    while stack:
        item, depth = stack.pop()
        nodes += 1
        if nodes > max_nodes:
            raise MalformedResult(f"{where}: more than {max_nodes} items")
        if depth > max_depth:
            raise MalformedResult(f"{where}: nested deeper than {max_depth}")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
        elif not (item is None or isinstance(item, bool | int | float | str)):
            raise MalformedResult(f"{where}: {type(item).__name__} is not JSON data")
