"""How many threads the next llama.cpp decode should use: the cores the rest of the machine leaves idle.

Measured on this 2-core machine (bench/llm_threads.py, SmolLM2, a 1,200-token prompt): on a quiet machine
2 threads generate 1.5-1.8x faster than 1 and prefill 1.7-1.9x faster; beside one busy program 2 threads
run at 0.66-0.91x of 1, because every graph node ends in a barrier (``#pragma omp barrier`` in ggml) and
the partner thread keeps losing its core. So the thread count follows the machine: from /proc/stat's
busy time, minus this process's own CPU time, we know how many cores other programs used over the last
window, and take what is left, rounded half up, between 1 and the cores this process may run on.

The decision is re-taken at most every ``min_window_s``, between prefill chunks and between tokens, so a
request adapts within a fraction of a second when an ingest starts or ends beside it.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
# ggml ends every graph node with an OpenMP barrier (``#pragma omp barrier``). libgomp's default spins ~3 ms
# there before it sleeps, which starves everything else on a shared 2-core machine, while
# OMP_WAIT_POLICY=PASSIVE sleeps at once and makes each of a token's ~900 barriers a futex round trip
# (bare decode loop, 2 quiet threads: 17.5-18.5 ms a token against 14.8-15.6 with this spin). ~10 us of
# spinning (libgomp counts ~100,000 spins a millisecond) bounds the waste on a busy machine.
OPENMP_SPIN_COUNT = "1000"


def bound_openmp_spinning() -> None:
    """Set the bounded barrier spin unless the user chose an OpenMP wait policy; call before llama_cpp loads."""
    if "OMP_WAIT_POLICY" not in os.environ:  # GOMP_SPINCOUNT would override the user's policy
        os.environ.setdefault("GOMP_SPINCOUNT", OPENMP_SPIN_COUNT)
# /proc/stat "cpu" columns that are not time the CPU was free for us: idle (3) and iowait (4) are free
_BUSY_COLUMNS = (0, 1, 2, 5, 6, 7)  # user nice system irq softirq steal (guest is already inside user)


def machine_busy_s(stat: Path = Path("/proc/stat")) -> float | None:
    """CPU-seconds all CPUs have been busy since boot (steal included: a stolen core is not ours), or None."""
    try:
        with stat.open() as f:
            first = f.readline().split()
    except OSError:
        return None
    if not first or first[0] != "cpu":
        return None
    try:
        ticks = [int(x) for x in first[1:]]
    except ValueError:
        return None
    return sum(ticks[i] for i in _BUSY_COLUMNS if i < len(ticks)) / CLOCK_TICKS


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class SpareCores:
    """Thread counts for llama.cpp that leave other programs' cores alone (see the module docstring)."""

    def __init__(
        self,
        max_threads: int | None = None,
        *,
        cpus: int | None = None,
        min_window_s: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
        busy: Callable[[], float | None] = machine_busy_s,
        own_cpu: Callable[[], float] = time.process_time,
    ):
        self.max_threads = max(1, max_threads or usable_cores())
        self.cpus = cpus or os.cpu_count() or self.max_threads
        self.min_window_s = min_window_s
        self._clock, self._busy, self._own_cpu = clock, busy, own_cpu
        self._last = self._sample()
        self.others = 0.0  # cores other programs used over the last window
        self._threads = self.max_threads  # before any window: llama.cpp's own choice, all our cores

    def _sample(self) -> tuple[float, float | None, float]:
        return self._clock(), self._busy(), self._own_cpu()

    def threads(self) -> int:
        """The thread count for the next decode call; cheap when the window is not over yet."""
        now = self._clock()
        if now - self._last[0] < self.min_window_s:
            return self._threads
        sample = self._sample()
        (t0, busy0, own0), (t1, busy1, own1) = self._last, sample
        self._last = sample
        if busy0 is None or busy1 is None:  # no /proc/stat (not Linux): keep the static choice
            return self._threads
        self.others = max(0.0, (busy1 - busy0) - (own1 - own0)) / (t1 - t0)
        spare = self.cpus - self.others
        self._threads = min(self.max_threads, max(1, math.floor(spare + 0.5)))
        return self._threads
