"""Which programs `make up` runs on this host, and the supervisord configuration for them.

One host runs every program by default. A user who outgrows one machine runs some programs on another host
(``BATOS_PROGRAMS=memory_weaver,forge,steward`` there: docs in the README, "Workers on another host"); that
host's supervisord gets the repository's own ``supervisord.conf`` cut down to those programs, written to
``var/supervisord.conf`` with ``%(here)s`` (the conf file's directory, which stood for the checkout) spelt out.
The steward must run beside the ``forge`` program it restarts: it drives this host's supervisord.
"""

from __future__ import annotations

import re
from pathlib import Path

from batos.programs import PROGRAMS

# the sections every supervisord needs (its socket, itself, its XML-RPC interface, supervisorctl)
SUPERVISOR_SECTIONS = frozenset({"unix_http_server", "supervisord", "rpcinterface:supervisor", "supervisorctl"})
_HEADER = re.compile(r"^\[(?P<name>[^\]]+)\]\s*$")


class HostConfError(ValueError):
    """``programs`` names something that is not a BAT OS program, or nothing."""


def selected(programs: str) -> tuple[str, ...]:
    """The programs this host runs, in supervisord's start order: ``programs`` (comma separated) or all."""
    names = {p.strip() for p in programs.split(",") if p.strip()}
    if not names:
        return PROGRAMS
    unknown = sorted(names - set(PROGRAMS))
    if unknown:
        raise HostConfError(f"BATOS_PROGRAMS names {', '.join(unknown)}: not a BAT OS program "
                            f"(programs: {', '.join(PROGRAMS)})")
    if "steward" in names and "forge" not in names:
        raise HostConfError("the steward restarts the forge program through this host's supervisord: "
                            "run it where forge runs")
    return tuple(p for p in PROGRAMS if p in names)


def render(conf_text: str, programs: tuple[str, ...], checkout: Path) -> str:
    """``conf_text`` (supervisord.conf) with only ``programs``' sections, ``%(here)s`` replaced by ``checkout``."""
    keep = SUPERVISOR_SECTIONS | {f"program:{p}" for p in programs}
    out: list[str] = []
    keeping = True  # the comment lines before the first section
    for line in conf_text.splitlines():
        header = _HEADER.match(line)
        if header:
            keeping = header.group("name") in keep
        if keeping:
            out.append(line)
    return "\n".join(out).replace("%(here)s", str(checkout)) + "\n"


def write(conf: Path, programs: tuple[str, ...], out: Path) -> Path:
    """The configuration for ``programs``: ``conf`` itself when that is every program, else ``out``."""
    if set(programs) == set(PROGRAMS):
        return conf
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(render(conf.read_text(), programs, conf.resolve().parent))
    tmp.replace(out)  # atomic: a supervisord started beside never reads half a file
    return out
