"""The one list of programs (batos.programs) is the list supervisord.conf starts, in its start order."""

from __future__ import annotations

import configparser

import proto
from batos.config import REPO_ROOT
from batos.programs import PROGRAMS, REGISTERS, SERVICE_PROGRAM


def conf_programs() -> dict[str, int]:
    """[program:NAME] -> its priority (supervisord's default, 999, when it sets none), in file order."""
    conf = configparser.RawConfigParser()
    conf.read(REPO_ROOT / "supervisord.conf")
    return {s.removeprefix("program:"): int(conf[s].get("priority", "999"))
            for s in conf.sections() if s.startswith("program:")}


def test_programs_are_the_conf_programs_in_start_order():
    priorities = conf_programs()
    assert set(PROGRAMS) == set(priorities) and len(PROGRAMS) == len(priorities)
    ordered = [priorities[p] for p in PROGRAMS]
    assert ordered == sorted(ordered), dict(zip(PROGRAMS, ordered, strict=True))


def test_every_service_is_registered_by_exactly_one_program():
    assert set(REGISTERS) <= set(PROGRAMS)
    services = [s for ss in REGISTERS.values() for s in ss]
    assert len(services) == len(set(services)) == len(SERVICE_PROGRAM)
    assert set(services) == {s.value for s in proto.Service} - {proto.Service.BROKER.value}  # each has a program
