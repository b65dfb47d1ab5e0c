"""What the console shows, and when: the views over a request's events and its reply.

The lines themselves come from :mod:`formats` (pure functions); the views decide *when* to show
them: :class:`TextView` throttles progress, streams tokens, tags lines of
concurrent requests and flushes half-finished lines; :class:`JsonView` prints one JSON object per
line for scripts. Where the lines go (above a prompt, a plain stream) is a :mod:`sinks` matter.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

import msgspec

from proto.contract import Reply
from services.console.completion import Recent
from services.console.formats import (
    Fragments,
    format_error,
    format_event,
    format_progress,
    format_reply,
    json_default,
    json_safe,
)
from services.console.watching import WatchLines, format_watch_reply

# Throttle for progress lines: a single updating line is not possible above a prompt, so
# compact lines are printed at most this often per request and stage (about 2 per second).
PROGRESS_INTERVAL = 0.5
# A partial token line longer than this is printed as it stands, so no text waits forever.
WRAP_CHARS = 160

STYLE_RULES = {
    "tag": "#888888",
    "dim": "#888888",
    "notice": "#5f87af",
    "error": "#ff5f5f bold",
    "warning": "#d7af00",
    "state": "#af87ff bold",
    "thought": "#87afd7 italic",
    "action": "#d7af5f",
    "observation": "#888888",
    "answer": "",
    "cite": "#5fafaf",
    "progress": "#5faf5f",
    "header": "bold",
    "key": "#87afaf",
    "ok": "#5faf5f bold",
    "bottom-toolbar": "noreverse bg:#262626 #d0d0d0",
}


class Sink(Protocol):
    """Where lines go. ``inline`` sinks can print text without ending the line (tokens)."""

    inline: bool

    def line(self, frags: Fragments) -> None: ...
    def text(self, text: str) -> None: ...
    def live(self, key: int, frags: Fragments | None) -> None: ...


@dataclass
class Handle:
    """One request as the view sees it."""

    tag: int
    label: str
    id: str = ""
    streamed: bool = False  # tokens arrived: the reply's answer is not printed again
    partial: str = ""  # tokens not yet ended by a newline (for sinks that cannot print inline)
    progress_at: dict[str, float] = field(default_factory=dict)
    watch: WatchLines | None = None  # a `watch`: many activities' events, tagged by activity


# -- views ----------------------------------------------------------------------------------------


class TextView:
    """Human output: events as they come, then the reply or the error."""

    def __init__(self, sink: Sink, *, recent: Recent | None = None, tagged: bool = False,
                 clock: Callable[[], float] = time.monotonic, progress_interval: float = PROGRESS_INTERVAL,
                 cwd: Path | None = None, notices: Sink | None = None, me: str = ""):
        self.sink = sink
        self.me = me  # this console's requester tag (proto.roles.requester_tag): `watch` shows its work as "by you"
        self.notices = notices  # where the console's own remarks go, when not with the output
        self.recent = recent if recent is not None else Recent()
        self.tagged = tagged
        self.clock = clock
        self.progress_interval = progress_interval
        self.cwd = cwd
        self._mid_line: Handle | None = None  # an inline sink holding this request's unfinished line

    # the view protocol

    def begin(self, handle: Handle) -> None:
        if handle.label == "watch":
            handle.watch = WatchLines(self.me, clock=self.clock, progress_interval=self.progress_interval)
        if self.tagged:
            self._line(handle, [("class:dim", f"{handle.label} …")])

    def event(self, handle: Handle, body: dict[str, Any]) -> None:
        self.recent.observe(body)
        if handle.watch is not None:
            for frags in handle.watch.lines(body):
                self._line(handle, frags)
            return
        name = body.get("event")
        if name == "token":
            self._token(handle, str(body.get("text", "")))
            return
        if handle.partial:  # what was streamed so far comes before what happens next
            partial, handle.partial = handle.partial, ""
            self._line(handle, [("class:answer", partial)])
            self.sink.live(handle.tag, None)
        if name == "progress":
            stage = str(body.get("stage", ""))
            now = self.clock()
            last = handle.progress_at.get(stage)
            done, total = body.get("done", body.get("files_done")), body.get("total", body.get("files_total"))
            final = done is not None and done == total
            if last is not None and now - last < self.progress_interval and not final:
                self.sink.live(handle.tag, self._tagged(handle, format_progress(body)))
                return
            handle.progress_at[stage] = now
            self.sink.live(handle.tag, self._tagged(handle, format_progress(body)))
        for frags in format_event(body):
            self._line(handle, frags)

    def reply(self, handle: Handle, reply: Reply) -> None:
        body = shown(reply)
        self.recent.observe(body)
        self._end_stream(handle)
        if handle.watch is not None:
            for frags in handle.watch.flush() + format_watch_reply(body):
                self._line(handle, frags)
            return
        for frags in format_reply(handle.label, body, streamed=handle.streamed, cwd=self.cwd):
            self._line(handle, frags)

    def error(self, handle: Handle, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        self._end_stream(handle)
        if handle.watch is not None:
            for frags in handle.watch.flush():
                self._line(handle, frags)
            if code == "cancelled":  # how a watch is meant to end: not an error
                self._line(handle, [("class:notice", "watch stopped")])
                return
            if code == "unavailable":  # the runner sends it again once the broker is back
                self._line(handle, [("class:warning", f"watch interrupted: {message}; it resumes when the broker "
                                                      "answers again")])
                return
        for frags in format_error(code, message, details):
            self._line(handle, frags)

    def notice(self, text: str, style: str = "notice") -> None:
        if self.notices is not None:
            self.notices.line([(f"class:{style}", text)])
            return
        self._break_line()
        self.sink.line([(f"class:{style}", text)])

    def lines(self, lines: list[str]) -> None:
        self._break_line()
        for ln in lines:
            self.sink.line([("", ln)])

    # internals

    def _tagged(self, handle: Handle, frags: Fragments) -> Fragments:
        return [("class:tag", f"[{handle.tag}] "), *frags] if self.tagged else frags

    def _line(self, handle: Handle, frags: Fragments) -> None:
        self._break_line()
        self.sink.line(self._tagged(handle, frags))

    def _break_line(self) -> None:
        if self._mid_line is not None:
            self.sink.text("\n")
            self._mid_line = None

    def _token(self, handle: Handle, text: str) -> None:
        if not text:
            return
        handle.streamed = True
        if self.sink.inline:
            if self._mid_line is not handle:
                self._break_line()
                if self.tagged:
                    self.sink.text(f"[{handle.tag}] ")
            self.sink.text(text)
            self._mid_line = None if text.endswith("\n") else handle
            return
        # Above a prompt an unfinished line would be overwritten: finished lines are printed, the
        # unfinished rest is shown live (the toolbar) until its newline comes.
        handle.partial += text
        *done, handle.partial = handle.partial.split("\n")
        while len(handle.partial) > WRAP_CHARS:
            cut = handle.partial.rfind(" ", 0, WRAP_CHARS)
            cut = cut if cut > WRAP_CHARS // 2 else WRAP_CHARS
            done.append(handle.partial[:cut])
            handle.partial = handle.partial[cut:].lstrip(" ")
        for ln in done:
            self._line(handle, [("class:answer", ln)])
        self.sink.live(handle.tag, self._tagged(handle, [("class:answer", handle.partial)]) if handle.partial
                       else None)

    def _end_stream(self, handle: Handle) -> None:
        if handle.partial:
            partial, handle.partial = handle.partial, ""
            self._line(handle, [("class:answer", partial)])
        if self._mid_line is handle:
            self._break_line()
        self.sink.live(handle.tag, None)


_RAW = (bytes, bytearray, memoryview)  # shown as {"$bytes": base64} (formats.json_default), never as bare text


def shown(reply: Reply) -> dict[str, Any]:
    """A typed reply as the formatters read it: its fields, less those that hold nothing (an empty ``reason``,
    no ``fallback``): a person reads what is there."""
    body = msgspec.to_builtins(reply, builtin_types=_RAW)
    return {k: v for k, v in body.items() if v is not None and v != ""}


class JsonView:
    """One JSON object per line: each event, then the reply or the error (``kind`` says which)."""

    def __init__(self, out: TextIO, err: TextIO):
        self.out = out
        self.err = err

    def begin(self, handle: Handle) -> None:
        pass

    def event(self, handle: Handle, body: dict[str, Any]) -> None:
        self._emit({"kind": "event", "command": handle.label, "id": handle.id, "body": body})

    def reply(self, handle: Handle, reply: Reply) -> None:
        body = msgspec.to_builtins(reply, builtin_types=_RAW)
        self._emit({"kind": "reply", "command": handle.label, "id": handle.id, "body": body})

    def error(self, handle: Handle, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        obj: dict[str, Any] = {"kind": "error", "command": handle.label, "id": handle.id, "code": code,
                               "message": message}
        if details:
            obj["details"] = details
        self._emit(obj)

    def notice(self, text: str, style: str = "notice") -> None:
        # stdout carries only the JSON objects; the console's own remarks go to stderr
        self.err.write(text + os.linesep)
        self.err.flush()

    def lines(self, lines: list[str]) -> None:
        self._emit({"kind": "reply", "command": "help", "id": "", "body": {"lines": lines}})

    def _emit(self, obj: dict[str, Any]) -> None:
        self.out.write(json_safe(json.dumps(obj, ensure_ascii=False, default=json_default)) + "\n")
        self.out.flush()
