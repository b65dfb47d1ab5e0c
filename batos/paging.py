"""Paged replies for queries whose answer can outgrow one message (issue 13 item 6).

A paged command answers with one page, each within a byte budget well under the frame limit, and a
``next`` cursor (an opaque string; None on the last page). Sending the same request again with
``after: <that cursor>`` returns the following page. Paged today: memory's ``query_fractals`` (the
audit history: ``fractals``) and ``search`` (``hits``), and the kernel's ``search`` and ``trace``
(``events``) that a console pages through transparently (:func:`follow`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, TypeVar

import ormsgpack

from batos.errors import ServiceError
from proto import ErrorCode

T = TypeVar("T")

PAGE_BYTES = 8 * 1024 * 1024  # a page's items, encoded; a quarter of the 64 MiB frame limit leaves ample room
MIN_PAGE_BYTES = 64 * 1024
LIST_KEYS = ("fractals", "hits", "events")  # the list a paged reply carries, by command
MAX_PAGES = 10_000  # a runaway guard for followers: a server that always answers `next` is a bug


def page_budget(max_frame_bytes: int) -> int:
    """Bytes of items per page: at most PAGE_BYTES and a quarter of the frame limit."""
    return max(MIN_PAGE_BYTES, min(PAGE_BYTES, max_frame_bytes // 4))


def encoded_size(item: Any) -> int:
    return len(ormsgpack.packb(item, option=ormsgpack.OPT_NON_STR_KEYS))


def take_page(items: Iterable[T], budget: int, limit: int) -> tuple[list[T], bool]:
    """The leading items that fit in ``budget`` bytes and ``limit`` items, and whether any item was left.

    A page always holds at least one item, so paging always moves forward (an item larger than the whole
    budget travels alone; a reply over the frame limit is then the worker's ``too_large`` answer)."""
    page: list[T] = []
    used = 0
    it: Iterator[T] = iter(items)
    for item in it:
        size = encoded_size(item)
        if page and (len(page) >= limit or used + size > budget):
            return page, True
        page.append(item)
        used += size
    return page, False


def offset_cursor(cursor: Any, size: int) -> int:
    """An offset cursor (``str(n)``, as offset-paged replies give in ``next``); None = 0; anything else: bad_args."""
    if cursor is None:
        return 0
    if isinstance(cursor, str) and cursor.isdigit() and int(cursor) <= size:
        return int(cursor)
    raise ServiceError(ErrorCode.BAD_ARGS, f"`after` {cursor!r} is not a cursor this query returned")


async def collect(fetch: Callable[[str | None], Awaitable[dict[str, Any]]], key: str,
                  limit: int | None = None) -> list[Any]:
    """Every item of a paged query (up to ``limit``): ``fetch(cursor)`` returns one page."""
    out: list[Any] = []
    cursor: str | None = None
    for _ in range(MAX_PAGES):
        reply = await fetch(cursor)
        out.extend(reply.get(key) or [])
        cursor = reply.get("next")
        if not cursor or (limit is not None and len(out) >= limit):
            break
    return out if limit is None else out[:limit]


async def follow(first: dict[str, Any], fetch_after: Callable[[str], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    """``first`` with the items of every following page appended (a console shows one answer)."""
    body = dict(first)
    pages = 1
    while body.get("next") and pages < MAX_PAGES:
        page = await fetch_after(str(body["next"]))
        for key in LIST_KEYS:
            if isinstance(page.get(key), list):
                body[key] = [*(body.get(key) or []), *page[key]]
        body["next"] = page.get("next")
        pages += 1
    body["pages"] = pages
    return body
