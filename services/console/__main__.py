"""``batos-console``: the Architect's Console.

    batos-console                      interactive (a terminal on stdin and stdout)
    batos-console -c "search ZODB"     one command (several lines: several commands), then exit
    batos-console --json -c "stats"    one JSON object per line: each event, then the reply or error
    batos-console < script.txt         commands read from a pipe or file, one at a time
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import uuid
from pathlib import Path

from batos.config import load
from services.console.app import ConsoleApp
from services.console.scripted import lines_of, run_script, stdin_lines
from services.console.sinks import colour_wanted

EPILOG = """exit status (non-interactive): 0 success, 1 an error reply or no broker, 2 a command that does not
parse, 130 interrupted, 141 output closed. Environment: BATOS_BROKER_ENDPOINT, BATOS_CONSOLE_HISTORY, NO_COLOR."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="batos-console", description="The BAT OS Architect's Console.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--command", help="run COMMAND (lines after the first: more commands or define source) "
                   "and exit")
    p.add_argument("--json", action="store_true", help="print one JSON object per line (scripts)")
    p.add_argument("--endpoint", help="the broker endpoint (default: settings.broker_endpoint)")
    p.add_argument("--timeout", type=float, help="seconds to wait for each reply (default: 120, or the kernel's "
                   "cycle timeout + 60 for ask, ingest, send, forge)")
    p.add_argument("--connect-timeout", type=float, default=10.0,
                   help="seconds a non-interactive run waits for the broker (default 10)")
    p.add_argument("--history", type=Path, help="history file (default ~/.batos_history)")
    p.add_argument("--no-color", action="store_true", help="no colour even on a terminal")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    overrides = {"broker_endpoint": args.endpoint} if args.endpoint else {}
    settings = load(**overrides)
    # The identity the broker routes by (blueprint §1.2): unique per console, readable in `workers`.
    identity = f"architect-console-{uuid.uuid4().hex}"
    if args.no_color:
        os.environ["NO_COLOR"] = "1"
    interactive = args.command is None and not args.json and sys.stdin.isatty() and sys.stdout.isatty()
    try:
        if interactive:
            history = args.history or Path(settings.console_history).expanduser()
            app = ConsoleApp(settings, identity=identity, history=history, timeout=args.timeout,
                             colour=colour_wanted(sys.stdout))
            rc = asyncio.run(app.run())
        else:
            lines = lines_of(args.command) if args.command is not None else stdin_lines()
            rc = asyncio.run(run_script(lines, settings, identity=identity, json_mode=args.json,
                                        timeout=args.timeout, connect_timeout=args.connect_timeout))
    except KeyboardInterrupt:
        rc = 130
    except BrokenPipeError:
        # the reader went away (`batos-console -c help | head`): no traceback, and none at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        rc = 141
    sys.exit(rc)


if __name__ == "__main__":
    main()
