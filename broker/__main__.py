"""The broker process: ``python -m broker`` (settings from BATOS_* environment variables)."""

from __future__ import annotations

import gc
import logging
import signal
import sys

import zmq

from batos import curve
from batos.config import load
from broker.broker import Broker
from broker.roles import Access, key_roles


def main() -> None:
    settings = load()
    logging.basicConfig(level=settings.log_level, stream=sys.stderr,
                        format="%(asctime)s broker[%(process)d] %(levelname)s %(message)s")
    stopping = False

    def handle_sigterm(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, handle_sigterm)
    signal.signal(signal.SIGINT, handle_sigterm)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting peer keeps its identity
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    # libzmq drops a peer whose message is far past the frame limit before it is held in memory; up to
    # this size the broker reads its header and fails the request it answers (Broker.on_oversized)
    sock.setsockopt(zmq.MAXMSGSIZE, settings.max_frame_bytes * 2 + (1 << 20))
    auth = curve.configure_server(sock, settings) if settings.curve_enabled else None
    sock.bind(settings.broker_endpoint)
    bound = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    tmp = settings.broker_endpoint_file.with_suffix(".tmp")
    tmp.write_text(bound)
    tmp.replace(settings.broker_endpoint_file)
    logging.info("broker listening on %s (curve %s)", bound, "on" if auth else "off")
    # Startup objects live as long as the process: keep full collections from walking them (pauses).
    gc.collect()
    gc.freeze()
    monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        access = Access(key_roles(settings.keys_dir / "authorized") if auth is not None else None)
        Broker(settings, sock, monitor, access).run(lambda: stopping)
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)
        if auth is not None:
            auth.stop()
        ctx.term()
        logging.info("broker stopped")


if __name__ == "__main__":
    main()
