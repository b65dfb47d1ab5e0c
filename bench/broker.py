"""Broker round-trip latency and throughput, beside a bare pyzmq relay measured in the same run.

BAT OS path: client DEALER -> broker (validates, tracks, heartbeats) -> worker runtime (asyncio,
dispatch, reply) -> broker -> client, with ~200-byte ormsgpack bodies (the handler is
tests/integration/echo_worker.py's ``echo``). Baseline: the same client driver through
bench/bare_relay.py (identity swap only) to a bare echo worker. Both systems run side by side
and every measurement alternates between them (``--repeats`` rounds, medians reported), so load
from other processes falls on both alike.

Measured per system:
- p50/p99 round trip, closed loop (each client keeps one request outstanding), 1 and 10 clients;
- pipelined throughput (each client keeps ``--window`` requests outstanding), 1 and 10 clients,
  with the CPU time each process spent per request (from /proc/<pid>/stat; the client column is
  this driver's process time). On a shared machine CPU per request is steadier than requests/s;
- p50/p99 with 10 clients paced to 1,000 requests/s in total.

The BAT OS worker admits ``--capacity`` concurrent requests (default: every request the pipelined
clients keep outstanding, 10 x window, as the bare worker does); with less, the broker queues the
rest and hands them out one per reply, which is correct flow control but not what is measured here.

Targets (issue 2): throughput >= 0.8x the bare relay; p99 < 2 ms at 1,000 requests/s from 10 clients.

    .venv/bin/python bench/broker.py [--seconds 3] [--repeats 3] [--window 64] [--transport tcp|ipc] [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import zmq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import proto  # noqa: E402

BODY = {"text": "x" * 150, "n": 1}
SYSTEMS = ("bare", "batos")
_ids = itertools.count()  # request ids unique across measurements (the broker refuses duplicates)
_rounds = itertools.count()  # fresh client identities per measurement


def free_endpoint(transport: str = "tcp", tmp: str = "") -> str:
    if transport == "ipc":  # a socket in the target's own private temp dir, as BAT OS's default var/broker.sock
        return f"ipc://{tmp}/relay.sock"
    s = zmq.Context.instance().socket(zmq.ROUTER)
    port = s.bind_to_random_port("tcp://127.0.0.1")
    s.close(0)
    return f"tcp://127.0.0.1:{port}"


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


class Target:
    """One system under test: its processes, its endpoint, and what a good answer looks like."""

    def __init__(self, kind: str, capacity: int = 64, transport: str = "tcp"):
        self.kind = kind
        self.capacity = capacity
        self.transport = transport
        self.procs: list[subprocess.Popen] = []
        self.tmp = tempfile.mkdtemp(prefix="batos-bench-")
        # the bare worker echoes the request itself; BAT OS answers with a reply envelope
        self.expect = proto.Kind.REQUEST if kind == "bare" else proto.Kind.REPLY

    def start(self) -> Target:
        py = sys.executable
        if self.kind == "bare":
            self.endpoint = free_endpoint(self.transport, self.tmp)
            self.procs.append(subprocess.Popen([py, str(REPO / "bench/bare_relay.py"), "relay", self.endpoint]))
            time.sleep(0.3)
            self.procs.append(subprocess.Popen([py, str(REPO / "bench/bare_relay.py"), "worker", self.endpoint]))
            time.sleep(0.5)
            return self
        env = {**os.environ, "PYTHONPATH": str(REPO), "BATOS_VAR_DIR": self.tmp, "BATOS_EXTRA_SERVICES": "echo",
               "BATOS_LOG_LEVEL": "WARNING"}
        endpoint_file = Path(self.tmp) / "broker.endpoint"
        self.procs.append(subprocess.Popen([py, "-m", "broker"], cwd=REPO,
                                           env={**env, "BATOS_BROKER_ENDPOINT": "" if self.transport == "ipc"
                                                else "tcp://127.0.0.1:*"}))
        deadline = time.monotonic() + 20
        while not endpoint_file.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("the broker did not start")
            time.sleep(0.05)
        self.endpoint = endpoint_file.read_text().strip()
        self.procs.append(subprocess.Popen(
            [py, str(REPO / "tests/integration/echo_worker.py")], cwd=REPO,
            env={**env, "BATOS_BROKER_ENDPOINT": self.endpoint, "BATOS_TEST_CAPACITY": str(self.capacity)}))
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until one echo round trip succeeds (the worker has registered)."""
        sock = sockets(self, 1, settle=0)[0]
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                sock.send(self.frame())
                if sock.poll(500):
                    env = proto.decode(sock.recv())
                    if env.kind == self.expect:
                        return
                    time.sleep(0.2)  # e.g. ``unavailable`` while the worker starts
            raise RuntimeError(f"{self.kind}: no echo within {timeout} s")
        finally:
            sock.close(0)

    def stop(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()

    def frame(self) -> bytes:
        return proto.encode(proto.request("echo", "echo", BODY, id=f"{next(_ids):032x}"))

    def check(self, frame: bytes) -> None:
        """Both systems' answers are decoded and checked: the client does the same work for each."""
        env = proto.decode(frame)
        if env.kind != self.expect:
            raise RuntimeError(f"{self.kind}: unexpected {env.kind}: {env.body}")


def sockets(target: Target, n: int, settle: float = 0.3) -> list[zmq.Socket]:
    ctx = zmq.Context.instance()
    r = next(_rounds)  # a closed socket's identity may linger in the ROUTER for a moment
    out = []
    for i in range(n):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.IDENTITY, f"bench-{target.kind}-{r}-{i}-{os.getpid()}".encode())
        s.connect(target.endpoint)
        out.append(s)
    time.sleep(settle)
    return out


def latency(target: Target, n_clients: int, seconds: float, rate: float | None = None) -> list[float]:
    """Round trips in ms: closed loop (one outstanding request per client), or paced at ``rate``/s in total."""
    socks = sockets(target, n_clients)
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    sent_at: dict[zmq.Socket, float] = {}
    samples: list[float] = []
    interval = n_clients / rate if rate else 0.0
    start = time.perf_counter()
    next_send = {s: start + k * interval / n_clients for k, s in enumerate(socks)}
    end = start + seconds
    while time.perf_counter() < end:
        now = time.perf_counter()
        for s in socks:
            if s not in sent_at and now >= next_send[s]:
                frame = target.frame()
                sent_at[s] = time.perf_counter()
                s.send(frame)
                next_send[s] = max(now, next_send[s]) + interval
        for s, _ in poller.poll(1 if rate else 100):
            frame = s.recv()
            samples.append((time.perf_counter() - sent_at.pop(s)) * 1000)
            target.check(frame)
    for s in socks:
        s.close(0)
    return samples


def throughput(target: Target, n_clients: int, seconds: float, window: int) -> dict[str, float]:
    """Requests/s with ``window`` outstanding per client, and CPU µs per request of each process."""
    socks = sockets(target, n_clients)
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    outstanding = dict.fromkeys(socks, 0)
    pids = [p.pid for p in target.procs]
    cpu0 = [cpu_seconds(p) for p in pids]
    client0 = time.process_time()
    done = 0
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        for s in socks:
            while outstanding[s] < window:
                s.send(target.frame())
                outstanding[s] += 1
        for s, _ in poller.poll(100):
            while True:
                try:
                    frame = s.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                target.check(frame)
                outstanding[s] -= 1
                done += 1
    elapsed = time.perf_counter() - start
    client_cpu = time.process_time() - client0
    cpu1 = [cpu_seconds(p) for p in pids]
    for s in socks:
        s.close(0)
    per_req = 1e6 / max(done, 1)
    return {"rps": done / elapsed, "cpu_us_relay": (cpu1[0] - cpu0[0]) * per_req,
            "cpu_us_worker": (cpu1[1] - cpu0[1]) * per_req, "cpu_us_client": client_cpu * per_req}


def pct(samples: list[float], q: float) -> float:
    return statistics.quantiles(samples, n=1000)[int(q * 1000) - 1] if len(samples) > 10 else float("nan")


def measure(targets: dict[str, Target], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Each measurement alternates bare/BAT OS for ``repeats`` rounds; the median of each metric is kept."""
    runs: dict[str, dict[str, list[float]]] = {k: {} for k in targets}

    def record(kind: str, values: dict[str, float]) -> None:
        for key, value in values.items():
            runs[kind].setdefault(key, []).append(value)

    def lat(n: int, rate: float | None, tag: str) -> Callable[[Target], dict[str, float]]:
        def run(t: Target) -> dict[str, float]:
            samples = latency(t, n, args.seconds, rate)
            return {f"p50_ms_{tag}": statistics.median(samples), f"p99_ms_{tag}": pct(samples, 0.99)}
        return run

    def tput(n: int) -> Callable[[Target], dict[str, float]]:
        def run(t: Target) -> dict[str, float]:
            return {f"{k}_c{n}": v for k, v in throughput(t, n, args.seconds, args.window).items()}
        return run

    plan = [lat(1, None, "c1"), lat(10, None, "c10"), tput(1), tput(10), lat(10, 1000, "1000rps")]
    for step in plan:
        for r in range(args.repeats):
            order = SYSTEMS if r % 2 == 0 else SYSTEMS[::-1]
            for kind in order:
                record(kind, step(targets[kind]))
    return {k: {key: statistics.median(v) for key, v in m.items()} for k, m in runs.items()}


def report(results: dict[str, dict[str, float]], load: tuple[float, float]) -> bool:
    bare, batos = results["bare"], results["batos"]
    print(f"{'metric':20} {'bare relay':>11} {'BAT OS':>10} {'ratio':>7}")
    for key in bare:
        b, o = bare[key], batos[key]
        if key.startswith("cpu_us"):
            ratio = o / b if b else float("nan")  # how many times the bare CPU per request
        elif key.startswith("rps"):
            ratio = o / b
        else:
            ratio = b / o
        print(f"{key:20} {b:11.3f} {o:10.3f} {ratio:7.2f}x")
    print("\nratio: BAT OS / bare for throughput (higher is better) and CPU per request (lower is better),"
          "\n       bare / BAT OS for latency (1.0 = as fast as bare).")
    print("cpu_us_*: CPU µs per request in the relay (broker), the worker, and this client driver.")
    tput_ok = all(batos[f"rps_c{n}"] >= 0.8 * bare[f"rps_c{n}"] for n in (1, 10))
    p99 = batos["p99_ms_1000rps"]
    print(f"\nload average during the run: {load[0]:.2f} at start, {load[1]:.2f} at end (2 cores)")
    print(f"target throughput >= 0.8x bare: {'met' if tput_ok else 'NOT met'} "
          f"({batos['rps_c1'] / bare['rps_c1']:.2f}x with 1 client, {batos['rps_c10'] / bare['rps_c10']:.2f}x with 10)")
    print(f"target p99 < 2 ms at 1000 req/s from 10 clients: {'met' if p99 < 2 else 'NOT met'} ({p99:.2f} ms)")
    return tput_ok and p99 < 2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    ap.add_argument("--repeats", type=int, default=3, help="alternating rounds per measurement (median kept)")
    ap.add_argument("--window", type=int, default=64, help="outstanding requests per client when pipelining")
    ap.add_argument("--capacity", type=int, help="concurrent requests the BAT OS worker admits (default 10 x window)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--transport", choices=("tcp", "ipc"), default="tcp",
                    help="both systems on loopback TCP, or on unix sockets (ipc://, BAT OS's default since issue 13)")
    args = ap.parse_args()
    args.capacity = args.capacity or 10 * args.window
    targets: dict[str, Target] = {}
    try:
        for kind in SYSTEMS:
            targets[kind] = Target(kind, args.capacity, args.transport).start()
        load0 = os.getloadavg()[0]
        results = measure(targets, args)
        load1 = os.getloadavg()[0]
    finally:
        for t in targets.values():
            t.stop()
    print(f"{args.seconds:g} s per measurement, median of {args.repeats} alternating rounds; window {args.window}, "
          f"BAT OS worker capacity {args.capacity}\n")
    report(results, (load0, load1))
    if args.json:
        args.json.write_text(json.dumps({"results": results, "load": [load0, load1], "args": vars(args)},
                                        default=str, indent=1))


if __name__ == "__main__":
    main()
