"""proto's one table of what a command may do across a restart (retry-safe) and which commands never wait
for a slot (control): every entry names a command some service really answers, and requests carry it."""

from __future__ import annotations

import proto
from proto.roles import CONSOLE_COMMANDS
from services.forge.handlers_llm import HANDLERS as LLM
from services.ingestor.handlers import HANDLERS as INGEST
from services.kernel.handlers import HANDLERS as KERNEL
from services.memory_weaver.handlers import HANDLERS as MEMORY

ANSWERED = {"kernel": set(KERNEL) | CONSOLE_COMMANDS, "memory": set(MEMORY), "ingest": set(INGEST),
            "llm": set(LLM), "*": {"ping", "status"}}


def test_every_listed_command_exists() -> None:
    for service, command in proto.RETRY_SAFE | proto.CONTROL:
        assert command in ANSWERED[service], (service, command)


def test_requests_carry_retry_safety_from_the_table() -> None:
    assert proto.request("memory", "search").idempotent
    assert proto.request("llm", "generate").idempotent
    assert proto.request("kernel", "status").idempotent  # every service's status
    assert not proto.request("kernel", "ask").idempotent  # a cycle: its records are not safe to write twice
    assert not proto.request("kernel", "send").idempotent  # runs a method, which may change the image
    assert not proto.request("forge", "run").idempotent
    assert proto.request("echo", "slow", idempotent=True).idempotent  # an extension's caller may vouch
    assert not proto.request("memory", "replace_files", idempotent=False).idempotent  # or opt out


def test_control_commands_are_cheap_ones() -> None:
    for command in ("status", "ping", "inspect", "trace", "help", "cancel"):
        assert proto.is_control("kernel", command)
    for command in ("ask", "search", "ingest", "send", "forge", "verify"):
        assert not proto.is_control("kernel", command)
    assert proto.is_control("memory", "status") and not proto.is_control("memory", "search")
