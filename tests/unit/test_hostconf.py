"""batos.hostconf and `batos.ctl up` on a host that runs some of the programs (a worker host)."""

from __future__ import annotations

import configparser
import shutil
from pathlib import Path

import pytest

from batos import ctl, curve, hostconf
from batos.config import REPO_ROOT, load
from batos.programs import PROGRAMS

WORKER = ("memory_weaver", "forge", "steward")


def test_every_program_by_default_and_a_subset_in_start_order() -> None:
    assert hostconf.selected("") == PROGRAMS
    assert hostconf.selected(" steward, memory_weaver ,forge") == WORKER


@pytest.mark.parametrize(("programs", "says"), [
    ("memory_weaver,mongo", "mongo: not a BAT OS program"),
    ("memory_weaver,steward", "run it where forge runs"),
])
def test_a_wrong_list_is_refused_saying_why(programs: str, says: str) -> None:
    with pytest.raises(hostconf.HostConfError, match=says):
        hostconf.selected(programs)


def test_the_conf_for_a_subset_is_the_repositorys_own_sections(tmp_path: Path) -> None:
    conf = REPO_ROOT / "supervisord.conf"
    assert hostconf.write(conf, PROGRAMS, tmp_path / "s.conf") == conf  # all programs: the file itself
    out = hostconf.write(conf, WORKER, tmp_path / "s.conf")
    mine, theirs = configparser.RawConfigParser(), configparser.RawConfigParser()
    mine.read(out)
    theirs.read(conf)
    assert [s for s in mine.sections() if s.startswith("program:")] == [f"program:{p}" for p in WORKER]
    assert set(mine.sections()) - {f"program:{p}" for p in WORKER} == hostconf.SUPERVISOR_SECTIONS
    for section in mine.sections():  # the same settings, with the checkout spelt out for %(here)s
        assert dict(mine[section]) == {k: v.replace("%(here)s", str(REPO_ROOT)) for k, v in theirs[section].items()}
    assert "%(here)s" not in out.read_text()


def test_a_worker_host_needs_its_copied_keys_and_never_makes_a_broker_key(tmp_path: Path) -> None:
    broker_host = load(var_dir=tmp_path / "main", curve_enabled=True)
    curve.add_key(broker_host, "memory-host", ["memory"])
    worker = load(var_dir=tmp_path / "worker", curve_enabled=True, curve_service_key="memory-host",
                  programs="memory_weaver")
    programs = hostconf.selected(worker.programs)
    with pytest.raises(hostconf.HostConfError, match=r"batos\.curve add"):
        ctl.prepare_var(worker, programs)

    worker.keys_dir.mkdir(parents=True)
    for name in ("memory-host.key_secret", "broker.key"):
        shutil.copy(broker_host.keys_dir / name, worker.keys_dir / name)
    ctl.prepare_var(worker, programs)
    assert sorted(p.name for p in worker.keys_dir.iterdir()) == ["broker.key", "memory-host.key_secret"]
    assert (worker.keys_dir / "broker.key").read_bytes() == (broker_host.keys_dir / "broker.key").read_bytes()
    assert not (worker.var_dir / "zeo.conf").exists()  # ZEO runs on the other host
    assert ctl.client_key(worker) == "memory-host"  # no console key here: batosctl presents the service key
    assert ctl.client_key(broker_host) == "console"
