"""Every command a production service registers has a request and a reply type in proto/ (issue 15, item 1),
and its handler takes and returns exactly those types: the walk below imports each service's whitelist, as
its ``__main__`` does, and checks each handler's signature against :mod:`proto.contract`. There is no untyped
path: the worker runtime refuses, at start-up, a table with a command proto has no type for."""

from __future__ import annotations

import asyncio
import inspect
import typing
from collections.abc import Mapping
from typing import Any

import msgspec
import pytest

import proto
from batos import worker
from proto import contract
from proto.contract import Call, Reply


def _tables() -> dict[str, Mapping[str, Any]]:
    from services.forge import handlers_forge, handlers_llm
    from services.forge.steward_main import HANDLERS as STEWARD
    from services.ingestor.handlers import HANDLERS as INGEST
    from services.kernel.handlers import HANDLERS as KERNEL
    from services.memory_weaver.handlers import HANDLERS as MEMORY

    return {"kernel": KERNEL, "memory": MEMORY, "llm": handlers_llm.HANDLERS, "forge": handlers_forge.HANDLERS,
            "steward": STEWARD, "ingest": INGEST}


def _registered() -> list[tuple[str, str, Any]]:
    runtime = worker._builtin_handlers([], None)
    out = []
    for service, table in _tables().items():
        for name, handler in {**runtime, **table}.items():
            out.append((service, name, handler))
    return out


def _signature_types(handler: Any) -> tuple[Any, Any]:
    hints = typing.get_type_hints(handler)
    params = list(inspect.signature(handler).parameters)
    assert len(params) == 2, f"{handler.__qualname__} must take (req, body): it takes {params}"
    return hints.get(params[1]), hints.get("return")


@pytest.mark.parametrize(("service", "name", "handler"), _registered(),
                         ids=[f"{s}.{n}" for s, n, _ in _registered()])
def test_handler_takes_and_returns_its_contract_types(service: str, name: str, handler: Any) -> None:
    s = contract.spec(service, name)
    assert s is not None, f"{service}.{name} has no request/reply type in proto/"
    request_type, reply_type = _signature_types(handler)
    # the runtime's `status` takes the base request and answers with the service's own subclass of its reply
    assert request_type is s.request or (isinstance(request_type, type) and issubclass(s.request, request_type)), (
        f"{service}.{name} takes {request_type}, its contract says {s.request}")
    assert reply_type is s.reply or (isinstance(reply_type, type) and issubclass(s.reply, reply_type)), (
        f"{service}.{name} returns {reply_type}, its contract says {s.reply}")


def test_the_runtime_accepts_every_production_table() -> None:
    """The check the worker runs at start-up (batos.worker.typed_commands) passes for each real table."""
    runtime = worker._builtin_handlers([], None)
    for service, table in _tables().items():
        specs = worker.typed_commands(service, {**runtime, **table})
        assert set(specs) == set(runtime) | set(table), service


async def _untyped(req: worker.Request, body: Any) -> Reply:
    return Reply()


def test_the_runtime_refuses_a_table_with_an_untyped_command_naming_it() -> None:
    """No untyped path: a command proto has no type for is refused when the worker starts, not at its first
    request, and the error names it."""
    from services.memory_weaver.handlers import HANDLERS as MEMORY

    with pytest.raises(TypeError, match=r"for memory\.frobnicate;") as e:
        worker.typed_commands("memory", {**MEMORY, "frobnicate": _untyped})
    assert "memory.search" not in str(e.value)  # only the command without a type
    with pytest.raises(TypeError, match=r"no request/reply type in proto/ for extension\.echo;"):
        # serve() refuses before it loads settings, connects or runs a startup hook
        asyncio.run(worker.serve([("extension", {"echo": _untyped}, 1)], startup=_never))


async def _never(ctx: worker.Context) -> None:
    raise AssertionError("startup ran for a table the runtime should have refused")


def test_every_registered_type_is_a_contract_type() -> None:
    for s in contract.specs():
        assert issubclass(s.request, Call) and issubclass(s.reply, Reply), s.name
        # a request type refuses a misspelt field instead of ignoring it
        assert s.request.__struct_config__.forbid_unknown_fields, s.name


def test_a_body_outside_the_contract_is_refused_naming_the_field() -> None:
    s = contract.spec("memory", "ping")
    assert s is not None
    with pytest.raises(Exception, match="unknown field `surprise`"):
        contract.decode_request(s, {"surprise": 1})
    assert msgspec.to_builtins(contract.decode_request(s, {})) == {}


def test_the_broker_answers_each_of_its_commands_in_its_contract_type() -> None:
    """The broker is not a worker: it builds its replies itself. Each decodes into its proto type."""
    from proto.roles import BROKER_COMMANDS_FOR_CONSOLES
    from tests.unit.test_broker_restarts import make_broker, ready, request

    b, sock = make_broker()
    ready(b, b"w1", capacity=2)
    held_id = request(b, b"c1", idempotent=True)
    for name in sorted(BROKER_COMMANDS_FOR_CONSOLES):
        s = contract.spec("broker", name)
        assert s is not None and s.service == "broker", f"broker.{name} has no type in proto/bodies/broker.py"
        body = {"ids": [held_id, "not-held"]} if name == "held" else {}
        env = proto.request("broker", name, body)
        b.handle(b"c1", proto.encode(env))
        (answer,) = [e for e in sock.to(b"c1") if e.corr == env.id]
        assert answer.kind == proto.Kind.REPLY, answer.body
        reply = contract.decode_reply(s, answer.body)
        assert isinstance(reply, s.reply)
        if name == "held":
            assert reply.held == [held_id]  # type: ignore[attr-defined]
        if name == "workers":
            assert reply.services["echo"][0].capacity == 2  # type: ignore[attr-defined]
