"""Broker round-trip latency and throughput, beside a bare pyzmq relay measured in the same run.

BAT OS path: client DEALER -> broker (validates, tracks, heartbeats) -> worker runtime (asyncio,
dispatch, reply) -> broker -> client, with ~200-byte ormsgpack bodies. Baseline: the same clients
through bench/bare_relay.py (identity swap only) to a bare echo worker.

    .venv/bin/python bench/broker.py [--seconds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import proto  # noqa: E402

BODY = {"text": "x" * 150, "n": 1}


def free_endpoint() -> str:
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.ROUTER)
    port = s.bind_to_random_port("tcp://127.0.0.1")
    s.close(0)
    return f"tcp://127.0.0.1:{port}"


class Target:
    def __init__(self, kind: str):
        self.kind = kind
        self.procs: list[subprocess.Popen] = []
        self.tmp = tempfile.mkdtemp(prefix="batos-bench-")

    def start(self) -> Target:
        env = {**os.environ, "PYTHONPATH": str(REPO), "BATOS_VAR_DIR": self.tmp, "BATOS_EXTRA_SERVICES": "echo",
               "BATOS_LOG_LEVEL": "WARNING"}
        py = sys.executable
        if self.kind == "bare":
            self.endpoint = free_endpoint()
            self.procs.append(subprocess.Popen([py, str(REPO / "bench/bare_relay.py"), "relay", self.endpoint]))
            time.sleep(0.3)
            self.procs.append(subprocess.Popen([py, str(REPO / "bench/bare_relay.py"), "worker", self.endpoint]))
            time.sleep(0.5)
        else:
            endpoint_file = Path(self.tmp) / "broker.endpoint"
            self.procs.append(subprocess.Popen([py, "-m", "broker"], cwd=REPO,
                                               env={**env, "BATOS_BROKER_ENDPOINT": "tcp://127.0.0.1:*"}))
            while not endpoint_file.exists():
                time.sleep(0.05)
            self.endpoint = endpoint_file.read_text().strip()
            self.procs.append(subprocess.Popen(
                [py, str(REPO / "tests/integration/echo_worker.py")], cwd=REPO,
                env={**env, "BATOS_BROKER_ENDPOINT": self.endpoint, "BATOS_TEST_CAPACITY": "64"}))
            time.sleep(2.5)  # registration
        return self

    def stop(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()

    def frame(self, i: int) -> bytes:
        if self.kind == "bare":
            return proto.encode(proto.request("echo", "echo", BODY, id=f"{i:032x}"))
        return proto.encode(proto.request("echo", "echo", BODY, id=f"{i:032x}"))

    def check(self, frame: bytes) -> None:
        if self.kind != "bare":
            env = proto.decode(frame)
            if env.kind != proto.Kind.REPLY:
                raise RuntimeError(f"unexpected {env.kind}: {env.body}")


_round = iter(range(1_000_000))


def sockets(target: Target, n: int) -> list[zmq.Socket]:
    ctx = zmq.Context.instance()
    out = []
    r = next(_round)  # fresh identities per measurement: a closed socket's identity may linger
    for i in range(n):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.IDENTITY, f"bench-{target.kind}-{r}-{i}-{os.getpid()}".encode())
        s.connect(target.endpoint)
        out.append(s)
    time.sleep(0.3)
    return out


def latency(target: Target, n_clients: int, seconds: float, rate: float | None = None) -> list[float]:
    """Closed loop (one outstanding request per client), or paced at ``rate`` requests/s in total."""
    socks = sockets(target, n_clients)
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    sent_at: dict[zmq.Socket, float] = {}
    samples: list[float] = []
    i = 0
    interval = n_clients / rate if rate else 0.0
    next_send = {s: time.perf_counter() + k * interval / n_clients for k, s in enumerate(socks)}
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        now = time.perf_counter()
        for s in socks:
            if s not in sent_at and now >= next_send[s]:
                i += 1
                sent_at[s] = time.perf_counter()
                s.send(target.frame(i))
                next_send[s] = max(now, next_send[s]) + interval
        for s, _ in poller.poll(1 if rate else 100):
            frame = s.recv_multipart()[-1]
            samples.append((time.perf_counter() - sent_at.pop(s)) * 1000)
            target.check(frame)
    for s in socks:
        s.close(0)
    return samples


def throughput(target: Target, n_clients: int, seconds: float, window: int = 64) -> float:
    socks = sockets(target, n_clients)
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    outstanding = dict.fromkeys(socks, 0)
    done = 0
    i = 0
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        for s in socks:
            while outstanding[s] < window:
                i += 1
                s.send(target.frame(i))
                outstanding[s] += 1
        for s, _ in poller.poll(100):
            while True:
                try:
                    frame = s.recv_multipart(zmq.NOBLOCK)[-1]
                except zmq.Again:
                    break
                target.check(frame)
                outstanding[s] -= 1
                done += 1
    elapsed = time.perf_counter() - start
    for s in socks:
        s.close(0)
    return done / elapsed


def pct(samples: list[float], q: float) -> float:
    return statistics.quantiles(samples, n=1000)[int(q * 1000) - 1] if len(samples) > 10 else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    results: dict[str, dict[str, float]] = {}
    for kind in ("bare", "batos"):
        t = Target(kind).start()
        try:
            r: dict[str, float] = {}
            for n in (1, 10):
                lat = latency(t, n, args.seconds)
                r[f"p50_ms_c{n}"] = statistics.median(lat)
                r[f"p99_ms_c{n}"] = pct(lat, 0.99)
                r[f"rps_c{n}"] = throughput(t, n, args.seconds)
            paced = latency(t, 10, args.seconds, rate=1000)
            r["p50_ms_1000rps"] = statistics.median(paced)
            r["p99_ms_1000rps"] = pct(paced, 0.99)
            results[kind] = r
        finally:
            t.stop()
    print(f"{'metric':18} {'bare relay':>11} {'BAT OS':>10} {'ratio':>7}")
    for key in results["bare"]:
        b, o = results["bare"][key], results["batos"][key]
        ratio = (o / b) if key.startswith("rps") else (b / o)
        print(f"{key:18} {b:11.3f} {o:10.3f} {ratio:7.2f}x")
    print("\nratio: BAT OS / bare for throughput, bare / BAT OS for latency (1.0 = as fast as bare).")
    print(f"targets: throughput >= 0.8x bare; p99 at 1000 req/s from 10 clients < 2 ms "
          f"(measured {results['batos']['p99_ms_1000rps']:.2f} ms)")


if __name__ == "__main__":
    main()
