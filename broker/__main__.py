"""The broker process: ``python -m broker`` (settings from BATOS_* environment variables)."""

from __future__ import annotations

import gc
import logging
import signal
import sys

import zmq

from batos import curve, transport
from batos.config import Settings, load
from broker.broker import Broker
from broker.roles import Access, key_grants


def bind(sock: zmq.Socket, settings: Settings) -> str:
    """Bind the broker's endpoint; an ``ipc://`` socket only inside a directory nobody else can enter."""
    settings.var_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    socket_file = transport.ipc_path(settings.broker_endpoint)
    if socket_file is not None:
        transport.prepare_socket_dir(socket_file, settings.var_dir)
    sock.bind(settings.broker_endpoint)
    if socket_file is not None:
        transport.restrict_socket(socket_file)
    warning = transport.exposure_warning(settings.broker_endpoint, settings.curve_enabled)
    if warning:
        logging.warning("%s", warning)
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


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
    try:
        bound = bind(sock, settings)
    except (transport.TransportError, zmq.ZMQError) as e:
        logging.error("broker cannot listen on %s: %s", settings.broker_endpoint, e)
        sock.close(linger=0)
        if auth is not None:
            auth.stop()
        ctx.term()
        sys.exit(2)
    tmp = settings.broker_endpoint_file.with_suffix(".tmp")
    tmp.write_text(bound)
    tmp.replace(settings.broker_endpoint_file)
    logging.info("broker listening on %s (curve %s)", bound, "on" if auth else "off")
    # Startup objects live as long as the process: keep full collections from walking them (pauses).
    gc.collect()
    gc.freeze()
    monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        access = Access(key_grants(settings.keys_dir / "authorized") if auth is not None else None)
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
