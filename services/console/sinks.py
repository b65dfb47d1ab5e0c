"""Where the console's lines go: a plain stream (scripts, pipes) or above a live prompt.

Colour is used only when the sink's stream is a terminal (and ``NO_COLOR`` is unset); styles
are prompt_toolkit class names, so one set of rules colours both sinks.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import TextIO

from prompt_toolkit import print_formatted_text
from prompt_toolkit.formatted_text import FormattedText
from prompt_toolkit.output import create_output
from prompt_toolkit.styles import Style

from services.console.formats import Fragments, plain, safe_fragments, safe_text
from services.console.render import STYLE_RULES

STYLE = Style.from_dict(STYLE_RULES)


def colour_wanted(stream: TextIO) -> bool:
    # https://no-color.org: any non-empty NO_COLOR turns colour off
    return not os.environ.get("NO_COLOR") and hasattr(stream, "isatty") and stream.isatty()


class StreamSink:
    """Lines written straight to a stream; tokens are printed inline as they arrive."""

    inline = True

    def __init__(self, stream: TextIO, colour: bool | None = None):
        self.stream = stream
        self.colour = colour_wanted(stream) if colour is None else colour
        self._output = create_output(stdout=stream) if self.colour else None

    def line(self, frags: Fragments) -> None:
        frags = safe_fragments(frags)  # results never drive the terminal (ESC, BEL, CR, ...)
        if self._output is not None:
            print_formatted_text(FormattedText(frags), style=STYLE, output=self._output)
        else:
            self.stream.write(plain(frags) + "\n")
            self.stream.flush()

    def text(self, text: str) -> None:
        self.stream.write(safe_text(text))
        self.stream.flush()

    def live(self, key: int, frags: Fragments | None) -> None:
        pass  # a stream has no place for a line that keeps changing; the printed lines suffice


class PromptSink:
    """Lines printed above a running prompt without disturbing what is being typed.

    print_formatted_text, while an application runs, erases the prompt, prints, and redraws it
    with its buffer intact. Lines of one loop tick are printed together (one redraw, not dozens).
    An unfinished line cannot be printed above a prompt (the redraw overwrites it), so streamed
    tokens and progress bars that are still changing are shown in the bottom toolbar instead.
    """

    inline = False

    def __init__(self, colour: bool = True, on_live_change: Callable[[], None] | None = None):
        self.colour = colour
        self.on_live_change = on_live_change
        self._pending: list[Fragments] = []
        self._scheduled = False
        self._live: dict[int, Fragments] = {}

    def line(self, frags: Fragments) -> None:
        frags = safe_fragments(frags)
        self._pending.append(frags if self.colour else [("", plain(frags))])
        if not self._scheduled:
            self._scheduled = True
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no loop (shutting down): print now
                self.flush()

    def text(self, text: str) -> None:
        if text.strip():
            self.line([("", text.rstrip("\n"))])

    def flush(self) -> None:
        self._scheduled = False
        if not self._pending:
            return
        frags: Fragments = []
        for i, line in enumerate(self._pending):
            if i:
                frags.append(("", "\n"))
            frags.extend(line)
        self._pending = []
        print_formatted_text(FormattedText(frags), style=STYLE if self.colour else None)

    def live(self, key: int, frags: Fragments | None) -> None:
        if frags is None:
            if self._live.pop(key, None) is None:
                return
        else:
            frags = safe_fragments(frags)
            self._live[key] = frags if self.colour else [("", plain(frags))]
        if self.on_live_change is not None:
            self.on_live_change()

    @property
    def has_live(self) -> bool:
        return bool(self._live)

    def toolbar(self) -> FormattedText:
        frags: Fragments = []
        for i, key in enumerate(sorted(self._live)):
            if i:
                frags.append(("", "\n"))
            frags.extend(self._live[key])
        return FormattedText(frags)
