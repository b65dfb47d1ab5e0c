"""The interactive Architect's Console: a prompt that never waits on the network.

Follows prompt_toolkit's asyncio-prompt example: ``with patch_stdout()``, ``await
session.prompt_async()``. Each command runs as its own task, so output (events, replies, the
broker's coming and going) is printed above the prompt while the Architect types, and a long
``ask`` can be cancelled with ``cancel`` or Ctrl-C. Ctrl-D or ``quit`` leaves; requests still in
flight are cancelled at the service on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from prompt_toolkit import PromptSession
from prompt_toolkit.formatted_text import FormattedText
from prompt_toolkit.history import FileHistory, History, InMemoryHistory
from prompt_toolkit.patch_stdout import patch_stdout

from batos import personas
from batos.client import Client
from batos.config import Settings
from proto.roles import requester_tag
from services.console.commands import (
    COMMAND_NAMES,
    SOURCE_TERMINATOR,
    CommandError,
    Local,
    NeedsSource,
    Request,
    help_text,
    parse_line,
)
from services.console.completion import ConsoleCompleter, Recent
from services.console.connection import BrokerMonitor
from services.console.render import TextView
from services.console.runner import Runner
from services.console.sinks import STYLE, PromptSink

PROMPT = FormattedText([("class:prompt", "batos> ")])
SOURCE_PROMPT = FormattedText([("class:dim", "...... ")])


def open_history(path: Path) -> History:
    """The history file, or an in-memory history where it cannot be written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(exist_ok=True)
        return FileHistory(str(path))
    except OSError:
        return InMemoryHistory()


class ConsoleApp:
    def __init__(self, settings: Settings, *, identity: str, history: Path, timeout: float | None = None,
                 colour: bool = True):
        self.settings = settings
        self.identity = identity
        self.history_path = history
        self.timeout = timeout
        self.colour = colour
        self.tasks: set[asyncio.Task] = set()

    async def run(self) -> int:
        recent = Recent()
        session: PromptSession = PromptSession(
            history=open_history(self.history_path),
            completer=ConsoleCompleter(recent, COMMAND_NAMES, personas.PERSONAS),
            complete_while_typing=False,
            style=STYLE,
        )
        sink = PromptSink(colour=self.colour)
        sink.on_live_change = lambda: self._show_live(session, sink)
        view = TextView(sink, recent=recent, tagged=True, me=requester_tag(self.identity))
        async with Client(self.settings, identity=self.identity) as client:
            monitor = BrokerMonitor(client, view.notice)
            runner = Runner(client, view, timeout=self.timeout, long_timeout=self.settings.cycle_timeout + 60.0,
                            is_connected=lambda: monitor.up)
            with patch_stdout(raw=True):
                logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s", force=True)
                view.notice(f"BAT OS Architect's Console ({self.identity}) on {client.endpoint}; "
                            "type 'help', Ctrl-D to leave")
                self._spawn(monitor.run())
                stop = asyncio.current_task()
                # no SIGTERM handler where the loop cannot install one (Windows: NotImplementedError; a loop
                # outside the main thread, as in embedding tests: RuntimeError); Ctrl-D and `quit` still leave
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.cancel)  # type: ignore[union-attr]
                try:
                    await self._loop(session, runner, view)
                except asyncio.CancelledError:
                    pass  # SIGTERM: leave as after quit
                finally:
                    await self._shutdown(runner)
                    sink.flush()
        return 0

    async def _loop(self, session: PromptSession, runner: Runner, view: TextView) -> None:
        sources: PromptSession = PromptSession(history=InMemoryHistory(), style=STYLE)
        while True:
            try:
                line = await session.prompt_async(PROMPT)
            except KeyboardInterrupt:
                if runner.inflight:
                    tags = await runner.cancel("all")
                    view.notice(f"cancelling {', '.join(f'[{t}]' for t in tags)}")
                continue
            except EOFError:
                return
            parsed = await self._parse(line, sources, view)
            if isinstance(parsed, Local):
                if parsed.name == "quit":
                    return
                await self._local(parsed, runner, view)
            elif parsed is not None:
                self._spawn(runner.run(parsed))

    async def _parse(self, line: str, sources: PromptSession, view: TextView) -> Request | Local | None:
        try:
            parsed = parse_line(line)
            if isinstance(parsed, NeedsSource):
                view.notice(f"source of {parsed.selector}; end with a line holding only '{SOURCE_TERMINATOR}'")
                lines = await self._read_source(sources)
                if lines is None:
                    view.notice("define abandoned")
                    return None
                parsed = parsed.finish(lines)
            return parsed
        except CommandError as e:
            view.notice(f"error: {e}", "error")
            return None

    async def _read_source(self, sources: PromptSession) -> list[str] | None:
        lines: list[str] = []
        while True:
            try:
                line = await sources.prompt_async(SOURCE_PROMPT)
            except (KeyboardInterrupt, EOFError):
                return None
            if line.strip() == SOURCE_TERMINATOR:
                return lines
            lines.append(line)

    async def _local(self, cmd: Local, runner: Runner, view: TextView) -> None:
        if cmd.name == "help":
            try:
                view.lines(help_text(cmd.arg))
            except CommandError as e:
                view.notice(f"error: {e}", "error")
        elif cmd.name == "cancel":
            tags = await runner.cancel(cmd.arg)
            if tags:
                view.notice(f"cancelling {', '.join(f'[{t}]' for t in tags)}")
            else:
                view.notice("nothing to cancel" if not cmd.arg or cmd.arg == "all"
                            else f"no request [{cmd.arg}] in flight")

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _shutdown(self, runner: Runner) -> None:
        for task in list(self.tasks):
            task.cancel()  # a request task sends `cancel` to its service as it goes
        await asyncio.gather(*self.tasks, return_exceptions=True)

    @staticmethod
    def _show_live(session: PromptSession, sink: PromptSink) -> None:
        session.bottom_toolbar = sink.toolbar if sink.has_live else None
        with contextlib.suppress(Exception):
            session.app.invalidate()
