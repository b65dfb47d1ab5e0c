"""Typed message bodies: every command's request and reply is a msgspec Struct, declared once here.

A request body is a :class:`Call` subclass parametrised by its reply type and registered for one
``(service, command)`` with :func:`command`::

    class SearchReply(Reply):
        hits: list[Hit]
        next: str | None = None

    @command("memory", "search")
    class Search(Call[SearchReply]):
        query: str
        k: int = 5

The worker runtime decodes a request's body into its type once, at the boundary, and encodes the
handler's typed reply once (:mod:`batos.worker`); clients send the same Structs and get the reply decoded
into its type (``Client.request``). Both halves of a change therefore live in one class, and a body the
type does not describe is refused with a message naming the field, before any handler runs.

Requests forbid unknown fields (a misspelt argument is an error, not silently ignored); replies accept
them, so that a newer service can add a field without breaking an older caller. Event payloads stay
plain dicts: they are progress for people, not a contract between programs.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

import msgspec

from proto.schema import ErrorCode, ProtocolError

R = TypeVar("R", bound="Reply")
C = TypeVar("C", bound="Call[Any]")

ANY_SERVICE = "*"  # commands every worker answers (the runtime's ping and status)

_BUILTIN_TYPES = (bytes, bytearray, memoryview)


class Reply(msgspec.Struct, kw_only=True):
    """Base of every reply body."""


class Call(msgspec.Struct, Generic[R], kw_only=True, forbid_unknown_fields=True):
    """Base of every request body; ``R`` is the reply's type."""


@dataclasses.dataclass(frozen=True)
class CommandSpec:
    service: str
    command: str
    request: type[Call[Any]]
    reply: type[Reply]

    @property
    def name(self) -> str:
        return f"{self.service}.{self.command}"


_SPECS: dict[tuple[str, str], CommandSpec] = {}


def _reply_type(cls: type) -> type[Reply]:
    for base in getattr(cls, "__orig_bases__", ()):
        if typing.get_origin(base) is Call:
            (reply,) = typing.get_args(base)
            if isinstance(reply, type) and issubclass(reply, Reply):
                return reply
    for parent in cls.__mro__[1:]:  # a subclass of a registered request inherits its reply type
        spec = next((s for s in _SPECS.values() if s.request is parent), None)
        if spec is not None:
            return spec.reply
    raise TypeError(f"{cls.__name__} must subclass Call[SomeReply]")


def command(service: str, name: str) -> Callable[[type[C]], type[C]]:
    """Register a request type as the body of ``service.name``."""

    def register(cls: type[C]) -> type[C]:
        key = (service, name)
        if key in _SPECS and _SPECS[key].request is not cls:
            raise ValueError(f"{service}.{name} already has a request type ({_SPECS[key].request.__name__})")
        _SPECS[key] = CommandSpec(service, name, cls, _reply_type(cls))
        return cls

    return register


def spec(service: str, name: str) -> CommandSpec | None:
    _load()
    return _SPECS.get((service, name)) or _SPECS.get((ANY_SERVICE, name))


def spec_of(call: Call[Any]) -> CommandSpec:
    _load()
    for s in _SPECS.values():
        if s.request is type(call):
            return s
    raise LookupError(f"{type(call).__name__} is not a registered request type")


def specs() -> Iterator[CommandSpec]:
    _load()
    return iter(list(_SPECS.values()))


def decode_request(s: CommandSpec, body: Any) -> Call[Any]:
    """The typed request, or ProtocolError(BAD_ARGS) naming the field that is wrong."""
    try:
        value: Call[Any] = msgspec.convert(body if body is not None else {}, s.request)
        return value
    except msgspec.ValidationError as e:
        raise ProtocolError(ErrorCode.BAD_ARGS, f"{s.name}: {e}") from e


def decode_reply(s: CommandSpec, body: Any) -> Reply:
    """A reply body as its type; ProtocolError(INTERNAL) if the service answered outside its contract."""
    try:
        return msgspec.convert(body if body is not None else {}, s.reply)
    except msgspec.ValidationError as e:
        raise ProtocolError(ErrorCode.INTERNAL, f"{s.name} answered outside its contract: {e}") from e


def encode(value: msgspec.Struct) -> dict[str, Any]:
    """A request or reply Struct as the plain body that travels in an :class:`~proto.schema.Envelope`."""
    out = msgspec.to_builtins(value, builtin_types=_BUILTIN_TYPES)
    assert isinstance(out, dict)
    return out


def encode_reply(s: CommandSpec, value: object) -> dict[str, Any]:
    if not isinstance(value, s.reply):
        raise TypeError(f"{s.name} returned {type(value).__name__}, not {s.reply.__name__}")
    return encode(value)


_loaded = False


def _load() -> None:
    """Import the modules that declare the bodies (they register themselves) on first use."""
    global _loaded
    if not _loaded:
        _loaded = True
        import proto.bodies  # noqa: F401
