"""SpareCores: llama.cpp's thread count follows the cores other programs leave idle."""

from pathlib import Path

import pytest

from services.forge.spare_cores import (
    CLOCK_TICKS,
    SpareCores,
    cgroup_cpu_quota,
    machine_busy_s,
    physical_cores,
    usable_cores,
)


class Machine:
    """A fake 2-core machine: a clock, the busy CPU-seconds of all programs, and ours."""

    def __init__(self) -> None:
        self.now = 100.0
        self.busy = 5000.0
        self.ours = 10.0

    def run(self, seconds: float, *, others: float, ours: float = 0.0) -> None:
        """`seconds` pass with other programs using `others` cores and this process `ours`."""
        self.now += seconds
        self.busy += seconds * (others + ours)
        self.ours += seconds * ours

    def spare(self, max_threads: int = 2) -> SpareCores:
        return SpareCores(max_threads, cpus=2, clock=lambda: self.now, busy=lambda: self.busy,
                          own_cpu=lambda: self.ours)  # fmt: skip


def test_a_quiet_machine_gets_every_core():
    m = Machine()
    spare = m.spare()
    m.run(1.0, others=0.05)
    assert spare.threads() == 2


def test_one_busy_program_leaves_one_thread():
    m = Machine()
    spare = m.spare()
    m.run(1.0, others=1.0)
    assert spare.threads() == 1
    assert spare.others == pytest.approx(1.0)


def test_our_own_cpu_time_is_not_counted_as_load():
    m = Machine()
    spare = m.spare()
    m.run(1.0, others=0.0, ours=2.0)  # our two decode threads busy the whole window
    assert spare.threads() == 2


def test_a_program_squeezed_to_two_thirds_of_a_core_still_takes_a_thread_back():
    """Three runnable threads on two cores: the other program gets ~0.67 of a core, and we drop to 1."""
    m = Machine()
    spare = m.spare()
    m.run(1.0, others=0.67, ours=1.33)
    assert spare.threads() == 1


def test_the_count_comes_back_when_the_load_goes():
    m = Machine()
    spare = m.spare()
    m.run(1.0, others=1.0, ours=1.0)
    assert spare.threads() == 1
    m.run(0.5, others=0.0, ours=1.0)
    assert spare.threads() == 2


def test_inside_the_window_the_last_decision_holds_without_reading_the_machine():
    m = Machine()
    reads = []
    spare = SpareCores(2, cpus=2, clock=lambda: m.now, busy=lambda: reads.append(1) or m.busy,
                       own_cpu=lambda: m.ours)  # fmt: skip
    m.run(1.0, others=1.0)
    assert spare.threads() == 1
    before = len(reads)
    m.run(0.1, others=0.0)  # shorter than min_window_s
    assert spare.threads() == 1
    assert len(reads) == before


def test_never_more_threads_than_allowed_nor_fewer_than_one():
    m = Machine()
    spare = SpareCores(1, cpus=2, clock=lambda: m.now, busy=lambda: m.busy, own_cpu=lambda: m.ours)
    m.run(1.0, others=0.0)
    assert spare.threads() == 1
    spare = m.spare(max_threads=2)
    m.run(1.0, others=5.0)  # more load than cores (steal, a burst)
    assert spare.threads() == 1


def test_without_proc_stat_the_static_choice_stays():
    m = Machine()
    spare = SpareCores(2, cpus=2, clock=lambda: m.now, busy=lambda: None, own_cpu=lambda: m.ours)
    m.run(1.0, others=1.0)
    assert spare.threads() == 2


def test_machine_busy_reads_proc_stat_busy_columns(tmp_path: Path):
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text("cpu  100 20 30 9999 500 1 2 7 0 0\ncpu0 50 10 15 5000 250 1 1 3 0 0\n")
    assert machine_busy_s(stat) == pytest.approx((100 + 20 + 30 + 1 + 2 + 7) / CLOCK_TICKS)
    stat.write_text("garbage\n")
    assert machine_busy_s(stat) is None
    assert machine_busy_s(tmp_path / "missing") is None


def test_the_real_machine_counter_moves_forward():
    first = machine_busy_s()
    assert first is not None and first > 0
    sum(i * i for i in range(300_000))  # some CPU
    second = machine_busy_s()
    assert second is not None and second >= first


def topology(root: Path, cpus: dict[int, tuple[int, int]]) -> Path:
    """A fake /sys/devices/system/cpu: logical cpu -> (package, core)."""
    for cpu, (package, core) in cpus.items():
        d = root / f"cpu{cpu}" / "topology"
        d.mkdir(parents=True)
        (d / "physical_package_id").write_text(f"{package}\n")
        (d / "core_id").write_text(f"{core}\n")
    return root


def test_hyper_thread_siblings_count_as_one_core(tmp_path: Path):
    sysfs = topology(tmp_path, {0: (0, 0), 1: (0, 1), 2: (0, 0), 3: (0, 1), 4: (1, 0)})
    assert physical_cores({0, 1, 2, 3, 4}, sysfs) == 3
    assert physical_cores({0, 2}, sysfs) == 1
    assert physical_cores({0, 9}, sysfs) is None  # no topology for cpu9: unknown


def cgroups(root: Path, member: str, limits: dict[str, str]) -> Path:
    """A fake cgroup v2 tree with cpu.max files; returns the /proc/self/cgroup file naming `member`."""
    for relative, limit in limits.items():
        d = root / relative.lstrip("/")
        d.mkdir(parents=True, exist_ok=True)
        (d / "cpu.max").write_text(limit + "\n")
    proc = root.parent / "proc-self-cgroup"
    proc.write_text(f"0::{member}\n")
    return proc


def test_the_tightest_cgroup_quota_of_the_process_and_its_parents(tmp_path: Path):
    root = tmp_path / "cgroup"
    proc = cgroups(root, "/batos/llm", {"/batos/llm": "max 100000", "/batos": "250000 100000", "/": "max 100000"})
    assert cgroup_cpu_quota(root, proc) == pytest.approx(2.5)
    proc = cgroups(root, "/batos/llm", {"/batos/llm": "50000 100000"})
    assert cgroup_cpu_quota(root, proc) == pytest.approx(0.5)


def test_no_quota_no_cgroup_v2_or_no_file_means_no_limit(tmp_path: Path):
    root = tmp_path / "cgroup"
    assert cgroup_cpu_quota(root, cgroups(root, "/", {"/": "max 100000"})) is None
    v1 = tmp_path / "v1"
    v1.write_text("4:memory:/x\n1:cpu:/\n")
    assert cgroup_cpu_quota(root, v1) is None
    assert cgroup_cpu_quota(root, tmp_path / "missing") is None


def test_usable_cores_is_capped_by_physical_cores_and_the_quota(tmp_path: Path, monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    sysfs = topology(tmp_path / "sys", {0: (0, 0), 1: (0, 1), 2: (0, 0), 3: (0, 1)})
    root = tmp_path / "cgroup"
    assert usable_cores(sysfs, root, cgroups(root, "/", {"/": "max 100000"})) == 2  # 4 logical, 2 physical
    assert usable_cores(sysfs, root, cgroups(root, "/c", {"/c": "150000 100000"})) == 1  # 1.5 cores: 1 thread
    assert usable_cores(sysfs, root, cgroups(root, "/d", {"/d": "10000 100000"})) == 1  # never 0
    assert usable_cores(tmp_path / "no-sysfs", root, tmp_path / "none") == 4  # topology unknown: logical CPUs
