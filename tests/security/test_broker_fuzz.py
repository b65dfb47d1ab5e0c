"""Fuzz a real broker with >= 100k frames: it answers ``status`` throughout and never restarts.

Hypothesis draws seeds (msgpack structures shaped like envelopes, arbitrary msgpack values, raw
bytes); each seed is encoded and mutated into a batch of frames (truncations, bit flips, spliced
bytes, deep nesting, multi-frame messages), so 100k frames cost ~1,000 examples. Every few batches
an observer asks the broker for ``status``: the pid and boot id must never change.
"""

from __future__ import annotations

import random
import time

import ormsgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import proto
from tests.security.test_broker_frames import RawPeer, broker_status, nested

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

FRAMES_MIN = 100_000
BATCH = 100  # frames derived from one hypothesis example
TIME_BUDGET = 75.0  # seconds of fuzzing at most (the frame count is normally reached well before)

scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=24) | st.binary(max_size=24))
values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=4)
                      | st.dictionaries(st.text(max_size=8) | st.integers(-5, 5), kids, max_size=4), max_leaves=16)
names = st.sampled_from([*(s.value for s in proto.Service), "echo", "", "x" * 200]) | st.text(max_size=10)
kinds = st.sampled_from([*(k.value for k in proto.Kind), "teleport", ""]) | values
envelopes = st.fixed_dictionaries(
    {"v": st.sampled_from([1, 1, 1, 0, 2, "1", None, 1.0]), "id": st.text(max_size=40) | values, "kind": kinds},
    optional={"service": names | values, "command": st.sampled_from(["ping", "status", "held", "workers", "echo"])
              | values, "corr": st.text(max_size=40) | values, "idempotent": values, "sender": values,
              "body": st.dictionaries(st.text(max_size=8), values, max_size=4) | values})
seeds = envelopes | values | st.binary(max_size=256)


def encode(seed: object) -> bytes:
    if isinstance(seed, bytes):
        return seed
    try:
        return ormsgpack.packb(seed, option=ormsgpack.OPT_NON_STR_KEYS)
    except (TypeError, ValueError):  # e.g. an integer key beside a string key that collide
        return ormsgpack.packb(repr(seed))


# an envelope map of 5 entries whose fifth, "body", the caller appends
DEEP_HEAD = b"\x85" + ormsgpack.packb({"v": 1, "id": "deep", "kind": "request", "service": "echo"})[1:] + b"\xa4body"


def mutants(frame: bytes, rng: random.Random) -> list[list[bytes]]:
    """BATCH messages (lists of frames) derived from one encoded seed."""
    out: list[list[bytes]] = [[frame]]
    while len(out) < BATCH:
        roll = rng.random()
        b = bytearray(frame)
        if roll < 0.25 and b:  # flip a few bits
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            out.append([bytes(b)])
        elif roll < 0.40:  # truncate
            out.append([bytes(b[: rng.randrange(len(b) + 1)])])
        elif roll < 0.55:  # splice random bytes in
            at = rng.randrange(len(b) + 1)
            out.append([bytes(b[:at]) + rng.randbytes(rng.randint(1, 16)) + bytes(b[at:])])
        elif roll < 0.65:  # wrap in deep nesting (as the frame, or as the body of an envelope)
            depth = rng.choice([10, 70, 300, 1500, 5000])
            out.append([b"\x91" * depth + bytes(b)] if rng.random() < 0.5 else [DEEP_HEAD + nested(depth)])
        elif roll < 0.72:  # several frames in one message
            out.append([bytes(b)] * rng.randint(2, 4))
        else:  # the seed again with a fresh tail: prefix-valid msgpack followed by junk
            out.append([bytes(b) + rng.randbytes(rng.randint(0, 8))])
    return out


def test_fuzzed_frames_never_crash_or_restart_the_broker(system):
    broker = system.start_broker(BATOS_EXTRA_SERVICES="echo")
    observer = RawPeer(system.endpoint)
    attackers = [RawPeer(system.endpoint, identity=f"fuzz-{i}".encode()) for i in range(4)]
    first = broker_status(observer)
    sent = {"frames": 0, "messages": 0, "batches": 0}
    started = time.monotonic()

    @settings(max_examples=FRAMES_MIN // BATCH + 50, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(seed=seeds, rng_seed=st.integers(0, 2**32))
    def fuzz(seed: object, rng_seed: int) -> None:
        if sent["frames"] >= FRAMES_MIN or time.monotonic() - started > TIME_BUDGET:
            return
        peer = attackers[sent["batches"] % len(attackers)]
        for message in mutants(encode(seed), random.Random(rng_seed)):
            peer.send(*message)
            sent["frames"] += len(message)
            sent["messages"] += 1
        sent["batches"] += 1
        for p in attackers:
            p.recv_all()  # keep the answers flowing (the broker drops what a peer does not read)
        if sent["batches"] % 25 == 0:
            now = broker_status(observer)
            assert (now["pid"], now["boot_id"]) == (first["pid"], first["boot_id"])

    try:
        fuzz()
        assert sent["frames"] >= FRAMES_MIN, f"only {sent['frames']} frames in {TIME_BUDGET} s"
        final = broker_status(observer)
        assert broker.alive() and broker.pid == final["pid"] == first["pid"]
        assert final["boot_id"] == first["boot_id"]
        assert final["stats"]["received"] >= sent["messages"]
        assert final["stats"]["internal_errors"] == 0, system.procs[0].tail()
        print(f"fuzz: {sent['frames']} frames in {time.monotonic() - started:.1f} s; broker stats {final['stats']}")
    finally:
        for p in (observer, *attackers):
            p.close()
