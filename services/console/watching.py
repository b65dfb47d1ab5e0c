"""What a `watch` shows: the kernel's activities, whoever started them, as lines tagged by activity.

A watch's events come from many requests at once (services/kernel/watch.py): each line is prefixed with the
activity it belongs to (``ask 1a2b3c4d │``), streamed answer tokens are gathered per activity into whole lines,
progress is throttled per activity and stage, and replayed events (``watch ID`` attached mid-way) are marked.
Pure: events in, fragments out; the view decides where they go.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from services.console.formats import Fragments, format_event, format_progress, human_seconds, one_line, short_id

PROGRESS_INTERVAL = 0.5  # per activity and stage, as for a request's own progress
WRAP_CHARS = 160  # a streamed line longer than this is printed as it stands
# the hub's own keys on every watched event: shown as the line's tag, not as data
_HUB_KEYS = ("activity", "command", "replay")
# reply values worth a glance at an activity's end, in this order
_END_KEYS = ("status", "files", "chunks", "unchanged", "skipped", "errors_count", "citations_count", "reason",
             "problems_count", "instruction_id")


class WatchLines:
    def __init__(self, me: str = "", clock: Callable[[], float] = time.monotonic,
                 progress_interval: float = PROGRESS_INTERVAL):
        self.me = me  # this console's requester tag: its own work is shown as "by you"
        self.clock = clock
        self.progress_interval = progress_interval
        self.partial: dict[str, str] = {}  # activity -> streamed text not yet ended by a newline
        self.progress_at: dict[tuple[str, str], float] = {}
        self.hellos = 0
        self.kernel_pid: Any = None

    def lines(self, body: dict[str, Any]) -> list[Fragments]:
        name = str(body.get("event", ""))
        activity = str(body.get("activity") or "")
        tag = (self._tag(body) if activity else [("class:tag", "system │ ")] if name in ("worker", "broker")
               else [])
        if name == "token":
            return [tag + line for line in self._token(activity, str(body.get("text", "")))]
        out = [tag + line for line in self.flush_one(activity)] if activity else []
        if name == "progress" and not self._progress_due(activity, body):
            return out
        return out + [tag + line for line in self._event(name, body)]

    def flush(self) -> list[Fragments]:
        """Every half-streamed line (at the watch's end)."""
        out: list[Fragments] = []
        for activity in list(self.partial):
            out += [[("class:tag", f"{short_id(activity)} │ "), *line] for line in self.flush_one(activity)]
        return out

    def flush_one(self, activity: str) -> list[Fragments]:
        text = self.partial.pop(activity, "")
        return [[("class:answer", text)]] if text else []

    # -- one event ----------------------------------------------------------------------------------

    def _tag(self, body: dict[str, Any]) -> Fragments:
        label = f"{body.get('command') or '?'} {short_id(body.get('activity'))}"
        frags: Fragments = [("class:tag", f"{label} │ ")]
        if body.get("replay"):
            frags.append(("class:dim", "(so far) "))
        return frags

    def _event(self, name: str, body: dict[str, Any]) -> list[Fragments]:
        data = {k: v for k, v in body.items() if k not in _HUB_KEYS}
        match name:
            case "watching":
                return self._hello(data)
            case "begin":
                by = data.get("by")
                who = "by you" if by and by == self.me else f"by console {by}" if by else ""
                about = f": {one_line(data['about'], 200)}" if data.get("about") else ""
                return [[("class:header", "started"), ("class:dim", f" {who}" if who else ""), ("", about)]]
            case "end":
                return self._end(data)
            case "worker":
                change = str(data.get("change", "?"))
                style = "class:ok" if change in ("joined", "alive again") else "class:warning"
                return [[(style, f"worker {data.get('service', '?')} pid {data.get('pid', '?')} {change}")]]
            case "broker":
                return [[("class:warning", str(data.get("note") or "the broker restarted"))]]
            case "missed":
                count = data.get("count", "?")
                if data.get("earlier"):
                    return [[("class:warning", f"{count} earlier events were not kept; replaying the last ones")]]
                return [[("class:warning", f"missed {count} events: this console fell behind (the work it "
                                           "watches was not slowed)")]]
            case "progress":
                return [format_progress(data)]
        return format_event(data)

    def _hello(self, data: dict[str, Any]) -> list[Fragments]:
        self.hellos += 1
        pid, self.kernel_pid = self.kernel_pid, data.get("pid")
        where = f"{data.get('kernel') or 'the kernel'} (pid {data.get('pid', '?')})"
        if self.hellos > 1:
            head = f"{'the kernel restarted: ' if pid != data.get('pid') else ''}watching {where} again"
        elif isinstance(data.get("target"), dict):
            t = data["target"]
            state = f", now {t['state']}" if t.get("state") else ""
            return [[("class:notice", f"watching {t.get('kind', '')} {t.get('id', '?')} ({t.get('command', '?')}"
                                      f"{state}); {data.get('replayed', 0)} events so far, then live")]]
        else:
            head = f"watching {where}"
        raw = data.get("in_flight")
        items: list[Any] = raw if isinstance(raw, list) else []
        lines: list[Fragments] = [[("class:notice", f"{head}: {len(items) or 'nothing'} in flight")]]
        for item in items:
            if isinstance(item, dict):
                lines.append([("class:tag", f"  {item.get('command', '?')} {short_id(item.get('id'))}"),
                              ("", _describe(item))])
        return lines

    def _end(self, data: dict[str, Any]) -> list[Fragments]:
        took = f" in {human_seconds(data['seconds'])}" if isinstance(data.get("seconds"), int | float) else ""
        if data.get("code") and not data.get("ok"):
            return [[("class:error", f"failed{took} [{data['code']}] "), ("", one_line(data.get("message", ""), 300))]]
        glance = ", ".join(f"{k.removesuffix('_count')} {data[k]}" if k != "status" else str(data[k])
                           for k in _END_KEYS if data.get(k) not in (None, ""))
        style = "class:ok" if data.get("ok", True) else "class:warning"
        lines: list[Fragments] = [[(style, f"done{took}" if data.get("ok", True) else f"ended{took}, not ok"),
                                   ("", f": {glance}" if glance else "")]]
        if data.get("rewritten") and data.get("answer"):  # not what was streamed: show what was replied
            lines += [[("class:answer", ln)] for ln in str(data["answer"]).splitlines()]
        return lines

    def _token(self, activity: str, text: str) -> list[Fragments]:
        buf = self.partial.get(activity, "") + text
        *done, rest = buf.split("\n")
        while len(rest) > WRAP_CHARS:
            cut = rest.rfind(" ", 0, WRAP_CHARS)
            cut = cut if cut > WRAP_CHARS // 2 else WRAP_CHARS
            done.append(rest[:cut])
            rest = rest[cut:].lstrip(" ")
        if rest:
            self.partial[activity] = rest
        else:
            self.partial.pop(activity, None)
        return [[("class:answer", ln)] for ln in done]

    def _progress_due(self, activity: str, body: dict[str, Any]) -> bool:
        key = (activity, str(body.get("stage", "")))
        now = self.clock()
        done, total = body.get("done", body.get("files_done")), body.get("total", body.get("files_total"))
        last = self.progress_at.get(key)
        if last is not None and now - last < self.progress_interval and not (done is not None and done == total):
            return False
        self.progress_at[key] = now
        return True


def _describe(item: dict[str, Any]) -> str:
    parts = []
    raw = item.get("cycles")
    cycles: list[Any] = raw if isinstance(raw, list) else []
    for c in cycles:
        if isinstance(c, dict):
            parts.append(f"cycle {short_id(c.get('id'))} {c.get('state', '')}".rstrip())
    if isinstance(item.get("progress"), dict):
        p = item["progress"]
        parts.append(f"{p.get('stage', '')} {p.get('done', '?')}/{p.get('total', '?')}")
    if isinstance(item.get("age_s"), int | float):
        parts.append(f"for {human_seconds(item['age_s'])}")
    return "  " + ", ".join(parts) if parts else ""


def format_watch_reply(body: dict[str, Any]) -> list[Fragments]:
    """The end of a `watch ID`: what it watched and how that ended."""
    state = body.get("state") or ("ok" if body.get("ok") else body.get("code") or "ended")
    note = body.get("note") or body.get("status") or body.get("message") or ""
    style = "class:error" if state == "FAILED" or body.get("ok") is False else "class:ok"
    lines: list[Fragments] = [[("", f"watch of {body.get('kind', '')} {body.get('watched', '?')} "
                                   f"({body.get('command', '?')}) ended: "), (style, str(state)),
                               ("", f" — {one_line(note, 300)}" if note else "")]]
    if body.get("missed"):
        lines.append([("class:warning", f"{body['missed']} events were not shown (missed or not kept)")])
    return lines
