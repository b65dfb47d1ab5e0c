"""The programs of one BAT OS installation and the broker services each one registers: the one list.

``supervisord.conf`` stays the configuration (commands, priorities, restarts, logs); code that names the
programs (``batos.ctl``, the system test fixtures, the fault tests) reads these constants, and
tests/unit/test_programs.py proves they name exactly the conf's ``[program:*]`` sections.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Final

# In supervisord's start order (its priorities): storage and the broker first, the workers, then the kernel.
PROGRAMS: Final = ("zeo", "broker", "memory_weaver", "ingestor", "forge", "kernel", "steward")

# The broker services each worker program registers (zeo and the broker register none).
REGISTERS: Final = MappingProxyType({
    "memory_weaver": ("memory",),
    "ingestor": ("ingest",),
    "forge": ("llm", "forge"),
    "kernel": ("kernel",),
    "steward": ("steward",),
})

# service -> the program that serves it
SERVICE_PROGRAM: Final = MappingProxyType({s: p for p, services in REGISTERS.items() for s in services})
