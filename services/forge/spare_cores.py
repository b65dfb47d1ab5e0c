"""How many threads the next decode on CPU should use (llama.cpp's, or torch's for the transformers
runtime): the cores the rest of the machine leaves idle.

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


def usable_cores(
    sysfs_cpu: Path = Path("/sys/devices/system/cpu"),
    cgroup_root: Path = Path("/sys/fs/cgroup"),
    proc_cgroup: Path = Path("/proc/self/cgroup"),
) -> int:
    """The most threads worth running: the CPUs this process may run on (its affinity), counted as physical
    cores (a hyper-thread sibling shares the core's arithmetic units, and llama.cpp gains nothing from it),
    and no more than its cgroup's CPU quota (a container limited to 2 cores on a 64-core host). At least 1."""
    try:
        cpus = set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = set(range(os.cpu_count() or 1))
    count = physical_cores(cpus, sysfs_cpu) or len(cpus)
    quota = cgroup_cpu_quota(cgroup_root, proc_cgroup)
    if quota is not None:
        count = min(count, int(quota))  # 2 threads on a 1.5-core quota would be throttled mid-barrier
    return max(1, count)


def physical_cores(cpus: set[int], sysfs_cpu: Path = Path("/sys/devices/system/cpu")) -> int | None:
    """How many distinct physical cores these logical CPUs are on, from sysfs topology; None if unknown."""
    cores = set()
    for cpu in cpus:
        topology = sysfs_cpu / f"cpu{cpu}" / "topology"
        try:
            package = (topology / "physical_package_id").read_text().strip()
            cores.add((package, (topology / "core_id").read_text().strip()))
        except OSError:
            return None
    return len(cores) or None


def cgroup_cpu_quota(
    cgroup_root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")
) -> float | None:
    """The tightest cgroup v2 ``cpu.max`` quota of this process's cgroup and its parents, in cores; None: none."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    relative = next((line.split(":", 2)[2] for line in lines if line.startswith("0::")), None)
    if relative is None:  # cgroup v1 only: not read
        return None
    quota: float | None = None
    directory = cgroup_root / relative.strip().lstrip("/")
    while True:
        try:
            limit, period = (directory / "cpu.max").read_text().split()[:2]
            if limit != "max":
                cores = int(limit) / int(period)
                quota = cores if quota is None else min(quota, cores)
        except (OSError, ValueError):
            pass
        if directory == cgroup_root or cgroup_root not in directory.parents:
            return quota
        directory = directory.parent


class SpareCores:
    """Thread counts that leave other programs' cores alone (see the module docstring)."""

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
