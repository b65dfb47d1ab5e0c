"""The baseline for bench/broker.py: a ROUTER that only swaps identity frames, and a bare echo worker.

Relay protocol: the worker sends b"W" once to register; a client frame [client, payload] goes to the
worker as [worker, client, payload]; the worker answers [client, payload]; the relay sends
[client, payload]. No validation, no heartbeats.
"""

from __future__ import annotations

import sys

import zmq


def relay(endpoint: str) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    sock.bind(endpoint)
    worker = None
    while True:
        frames = sock.recv_multipart()
        if len(frames) == 2 and frames[1] == b"W":
            worker = frames[0]
        elif len(frames) == 3:  # from the worker: [worker, client, payload]
            sock.send_multipart(frames[1:])
        elif worker is not None:
            sock.send_multipart([worker, *frames])


def worker(endpoint: str) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    sock.send(b"W")
    while True:
        client, payload = sock.recv_multipart()
        sock.send_multipart([client, payload])


if __name__ == "__main__":
    {"relay": relay, "worker": worker}[sys.argv[1]](sys.argv[2])
