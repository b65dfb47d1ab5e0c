"""``python -m services.forge.steward_main``: the steward program supervisord runs.

Why polling and not the ``watchdog`` library the blueprint names: it is not installed, and a scan of one
small directory every 0.5 s costs nothing measurable, works the same on every OS and file system
(inotify misses events on network mounts), and needs no catch-up logic after a restart: each scan sees
the directory as it is, so an instruction written while the steward was down is handled on the first scan.
"""

from __future__ import annotations

import argparse
import logging
import signal
from pathlib import Path

from batos.config import Settings, load
from batos.worker import configure_logging
from services.forge.steward import Steward, Supervisor

POLL_INTERVAL = 0.5  # seconds between scans of the upgrade channel

log = logging.getLogger("batos.steward")


def supervisor_url(settings: Settings) -> str:
    return settings.supervisor_url or f"unix://{Path(settings.var_dir) / 'supervisor.sock'}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.forge.steward_main", description=__doc__.split("\n")[0])
    parser.add_argument("--channel", type=Path, help="upgrade channel directory (default: var/upgrade_channel)")
    parser.add_argument("--supervisor-url", help="unix:///path/supervisor.sock or http://host:port")
    parser.add_argument("--own-program", default="steward", help="this program's supervisord name")
    args = parser.parse_args(argv)
    settings = load()
    configure_logging("steward", settings)
    channel = args.channel or settings.upgrade_channel
    url = args.supervisor_url or supervisor_url(settings)
    steward = Steward(channel, Supervisor(url), own_program=args.own_program)

    def handle_signal(signum: int, _frame: object) -> None:
        log.info("steward: %s, stopping", signal.Signals(signum).name)
        steward.request_stop()

    signal.signal(signal.SIGTERM, handle_signal)
    signal.signal(signal.SIGINT, handle_signal)
    log.info("steward: watching %s, supervisord at %s", channel, url)
    try:
        recovered = steward.recover()
        if recovered:
            log.warning("steward: closed out interrupted runs %s (reported failed, not retried)", recovered)
        steward.run_forever(POLL_INTERVAL)
    finally:
        log.info("steward: stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
