"""The console without a prompt: ``-c COMMAND``, or lines read from a pipe, one command at a time.

Each command's events are printed as they arrive, then its reply or error. The run stops at the
first error. Exit status: 0 success, 1 an error reply (or no broker), 2 a line that does not parse.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import AsyncIterator
from typing import TextIO

from batos.client import Client
from batos.config import Settings
from proto import ErrorCode
from proto.roles import requester_tag
from services.console.commands import SOURCE_TERMINATOR, CommandError, Local, NeedsSource, help_text, parse_line
from services.console.connection import BrokerMonitor
from services.console.render import Handle, JsonView, TextView
from services.console.runner import Runner, View
from services.console.sinks import StreamSink

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


async def lines_of(text: str) -> AsyncIterator[str]:
    for line in text.splitlines():
        yield line


async def stdin_lines(stream: TextIO | None = None) -> AsyncIterator[str]:
    """Lines of stdin, read by a daemon thread (a blocked read must not hold up the exit)."""
    stream = stream or sys.stdin
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str | None] = asyncio.Queue()

    def reader() -> None:
        try:
            for line in stream:
                loop.call_soon_threadsafe(queue.put_nowait, line.rstrip("\n"))
        except (OSError, ValueError):
            pass
        finally:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, None)
            except RuntimeError:  # the loop is already closed
                pass

    threading.Thread(target=reader, name="console-stdin", daemon=True).start()
    while (line := await queue.get()) is not None:
        yield line


def make_view(json_mode: bool, out: TextIO, err: TextIO, me: str = "") -> View:
    # stdout carries what the commands produced; the console's own remarks go to stderr
    return JsonView(out, err) if json_mode else TextView(StreamSink(out), notices=StreamSink(err), me=me)


async def run_script(lines: AsyncIterator[str], settings: Settings, *, identity: str, json_mode: bool = False,
                     timeout: float | None = None, connect_timeout: float = 10.0,
                     out: TextIO | None = None, err: TextIO | None = None, client: Client | None = None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    view = make_view(json_mode, out, err, requester_tag(identity))
    client = client or Client(settings, identity=identity)
    async with client:
        monitor = BrokerMonitor(client, view.notice)
        runner = Runner(client, view, timeout=timeout, long_timeout=settings.cycle_timeout + 60.0)
        return await _run_lines(lines, view, runner, monitor, connect_timeout)


async def _run_lines(lines: AsyncIterator[str], view: View, runner: Runner, monitor: BrokerMonitor,
                     connect_timeout: float) -> int:
    connected = False
    async for line in lines:
        try:
            parsed = parse_line(line)
            if isinstance(parsed, NeedsSource):
                parsed = parsed.finish(await _source_lines(lines, parsed))
        except CommandError as e:
            local_error(view, ErrorCode.BAD_ARGS, str(e))
            return EXIT_USAGE
        if parsed is None:
            continue
        if isinstance(parsed, Local):
            if parsed.name == "quit":
                break
            if parsed.name == "help":
                try:
                    view.lines(help_text(parsed.arg))
                except CommandError as e:
                    local_error(view, ErrorCode.BAD_ARGS, str(e))
                    return EXIT_USAGE
            else:
                view.notice("cancel: nothing is in flight (a script runs one command at a time)", "notice")
            continue
        if not connected:
            connected = await monitor.wait(connect_timeout)
            if not connected:
                local_error(view, ErrorCode.UNAVAILABLE,
                            f"no broker answered at {monitor.endpoint} within {connect_timeout:g} s; is it running?")
                return EXIT_ERROR
        outcome = await runner.run(parsed)
        # a reply that reports its own failure (`verify` finding problems, a forge run that failed) fails
        # the script too, so `make verify` and CI see it in the exit status
        if not outcome.ok or getattr(outcome.body, "ok", None) is False:
            return EXIT_ERROR
    return EXIT_OK


async def _source_lines(lines: AsyncIterator[str], pending: NeedsSource) -> list[str]:
    body: list[str] = []
    async for line in lines:
        if line.strip() == SOURCE_TERMINATOR:
            return body
        body.append(line)
    raise CommandError(f"define {pending.oid} {pending.selector}: the source must end with a line holding only "
                       f"'{SOURCE_TERMINATOR}' (or use @FILE)")


def local_error(view: View, code: str, message: str) -> None:
    view.error(Handle(0, "console"), str(code), message)
