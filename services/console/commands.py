"""Parsing a console line into what to do: a kernel request, a console-local action, or a request
that still needs method source lines.

A request is the kernel's own request type (proto.bodies.kernel): this module only splits words, quotes and
literals; whether the arguments are right is the type's business, checked here by msgspec exactly as the
kernel's worker checks it, and a refusal names the field (``search: Expected `int` >= 1 - at `$.k```). A raw
``{...}`` Table 1 line is checked as a Table 1 object and then as the convenience it stands for.

Everything here is pure (no I/O except reading a ``define ... @file``), so every rule about
quoting, OIDs and argument literals is unit-tested without a broker.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

import proto
from batos import uvm
from proto import contract
from proto.bodies import kernel as K
from proto.contract import Call, Reply
from proto.schema import MAX_BODY_DEPTH

KERNEL = proto.Service.KERNEL.value
# A line holding only this ends the source of a multi-line `define`.
SOURCE_TERMINATOR = "."
# Source files larger than this are refused before they are sent: a method is a few lines.
MAX_SOURCE_BYTES = 256 * 1024
HELP_WIDTH = 110

_KWARG = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", re.DOTALL)


class CommandError(ValueError):
    """A line the console cannot turn into a request; the message says why and how to fix it."""


@dataclass(frozen=True)
class Spec:
    name: str
    usage: str
    summary: str
    long_running: bool = False  # may stream for minutes (gets the long default timeout)


SPECS: dict[str, Spec] = {s.name: s for s in (
    Spec("help", "help [COMMAND]", "list commands, or explain one"),
    Spec("status", "status", "the kernel's status (its runtime, services and cycles)"),
    Spec("stats", "stats", "memory: objects per prototype, vectors, storage size"),
    Spec("verify", "verify [repair]", "memory checks its invariants and lists what is wrong; `repair` fixes it "
         "(files that fail are rewritten by their next ingest)", long_running=True),
    Spec("ingest", "ingest PATH", "ingest a file or directory of Python source", long_running=True),
    Spec("ask", "ask [persona=NAME] QUESTION", "run a cognitive cycle: reasoning steps, streamed answer, citations",
         long_running=True),
    Spec("search", "search [k=N] [level=summaries|chunks|fractals|both|all] TEXT",
         "ranked chunks and summaries with file and lines"),
    Spec("inspect", "inspect OID", "an object's prototype, slots, parents and methods (0 is the root)"),
    Spec("send", "send OID SELECTOR [ARG ...] [KEY=VALUE ...]",
         "send a message; a missing method is generated (_doesNotUnderstand_). Arguments are Python/JSON "
         "literals where they parse, else strings; a quoted argument is always a string", long_running=True),
    Spec("define", "define OID SELECTOR [@FILE]",
         "define a method from FILE, or from the lines that follow, ended by a line holding only '.'"),
    Spec("display_yourself", "display_yourself", "the system describes itself", long_running=True),
    Spec("trace", "trace CYCLE_ID", "the audit events of one cognitive cycle"),
    Spec("audit", "audit", "the audit log's state and recent events"),
    Spec("watch", "watch [ID]", "follow what the system is doing, whoever started it: cycles (states, thoughts, "
         "answers), ingests, forge runs, worker restarts; with the ID of a cycle or activity (its first 8 "
         "characters will do) replay it so far, then follow it to its end. Stop with cancel or Ctrl-C",
         long_running=True),
    Spec("forge", "forge PERSONA", "curate data and train a LoRA adapter for ALFRED, BABS, BRICK or ROBIN",
         long_running=True),
    Spec("cancel", "cancel [N|all]", "cancel request N (as tagged in the output), or every request in flight"),
    Spec("quit", "quit", "leave the console (also: exit, Ctrl-D)"),
    Spec("{", "{TABLE 1 JSON}", "send a raw Table 1 command object, validated here first", long_running=True),
)}
ALIASES = {"exit": "quit", "?": "help"}
COMMAND_NAMES = tuple(n for n in SPECS if n != "{") + tuple(ALIASES)


@dataclass(frozen=True)
class Request:
    """A kernel request to send: its typed body (the command is the type's, proto.bodies.kernel)."""

    call: Call[Any]
    label: str = ""  # the console command it came from (for display and timeouts)
    resumable: bool = False  # lost with the broker, it is sent again once the broker is back (watch)
    service: str = KERNEL

    @property
    def command(self) -> str:
        return contract.spec_of(self.call).command

    @property
    def body(self) -> dict[str, Any]:
        return contract.encode(self.call)

    @property
    def reply_type(self) -> type[Reply]:
        """What the reply decodes into: a raw Table 1 object answers as the convenience it stands for."""
        if isinstance(self.call, K.Table1Command):
            return K.reply_type(self.call)
        return contract.spec_of(self.call).reply

    def page(self, after: str) -> dict[str, Any]:
        """The body asking for the page after ``after`` (a paged reply's ``next``: search, trace)."""
        if isinstance(self.call, K.Table1Command):
            brief = self.call.mission_brief
            return contract.encode(msgspec.structs.replace(self.call, mission_brief=msgspec.structs.replace(
                brief, kwargs={**brief.kwargs, "after": after})))
        return {**self.body, "after": after}

    @property
    def long_running(self) -> bool:
        spec = SPECS.get("{" if self.command == "command" else self.label or self.command)
        return bool(spec and spec.long_running)


def build(kind: type[Call[Any]], name: str, /, **fields: Any) -> Call[Any]:
    """The request ``kind`` with these fields, checked by its type (words from a line are converted where they
    spell the field's type: ``k=3`` is the number 3); a refusal names the field."""
    try:
        return msgspec.convert(fields, kind, strict=False)
    except msgspec.ValidationError as e:
        raise CommandError(f"{name}: {e} (usage: {SPECS[name].usage})") from None


@dataclass(frozen=True)
class Local:
    """Handled by the console itself: help, cancel, quit."""

    name: str
    arg: str = ""


@dataclass(frozen=True)
class NeedsSource:
    """``define OID SELECTOR`` without ``@file``: the following lines are the source."""

    oid: str
    selector: str

    def finish(self, lines: list[str]) -> Request:
        source = "\n".join(lines).strip("\n")
        if not source.strip():
            raise CommandError(f"define {self.oid} {self.selector}: no source given")
        return Request(build(K.Define, "define", oid=self.oid, selector=self.selector, source=source + "\n"),
                       label="define")


Parsed = Request | Local | NeedsSource


def parse_line(line: str, *, cwd: Path | None = None) -> Parsed | None:
    """Turn one input line into what to do; ``None`` for a blank line or a comment."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    if text.startswith("{"):
        return _shallow(parse_table1_line(text))
    name, _, rest = text.partition(" ")
    name = ALIASES.get(name.lower(), name.lower())
    rest = rest.strip()
    parser = _PARSERS.get(name)
    if parser is None:
        raise CommandError(f"unknown command {text.split()[0]!r}; type 'help' for the list")
    return _shallow(parser(rest, cwd or Path.cwd()))


# what a request body may nest, leaving room for the envelope around it (the wire refuses deeper frames)
MAX_ARG_DEPTH = MAX_BODY_DEPTH - 8


def _shallow(parsed: Parsed) -> Parsed:
    """Refuse, here and in plain words, arguments nested deeper than the wire carries."""
    if isinstance(parsed, Request):
        stack: list[tuple[Any, int]] = [(msgspec.to_builtins(parsed.call), 1)]
        while stack:  # iterative: the check itself cannot overflow the stack
            obj, depth = stack.pop()
            if depth > MAX_ARG_DEPTH:
                raise CommandError(f"arguments nest deeper than {MAX_ARG_DEPTH} levels; flatten them")
            children = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else ()
            stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return parsed


# -- one parser per command --------------------------------------------------------------------


def _no_args(name: str) -> Callable[[str, Path], Request]:
    kind = contract.spec(KERNEL, name)
    if kind is None:  # a programming error, found at import
        raise LookupError(f"kernel.{name} has no request type")

    def parse(rest: str, cwd: Path) -> Request:
        if rest:
            raise CommandError(f"{name} takes no arguments (usage: {SPECS[name].usage})")
        return Request(build(kind.request, name), label=name)
    return parse


def _help(rest: str, cwd: Path) -> Local:
    return Local("help", rest.lower())


def _quit(rest: str, cwd: Path) -> Local:
    return Local("quit")


def _cancel(rest: str, cwd: Path) -> Local:
    arg = rest.strip().lstrip("#[").rstrip("]").lower()
    if arg and arg != "all" and not arg.isdigit():
        raise CommandError(f"cancel takes a request number or 'all', not {rest!r}")
    return Local("cancel", arg)


def _ingest(rest: str, cwd: Path) -> Request:
    words = _split(rest, "ingest")
    if len(words) != 1:
        raise CommandError(f"usage: {SPECS['ingest'].usage} (quote a path that holds spaces)")
    # Resolved here: the kernel runs elsewhere, with another working directory.
    path = Path(words[0]).expanduser()
    path = (path if path.is_absolute() else cwd / path).resolve()
    return Request(build(K.Ingest, "ingest", path=str(path)), label="ingest")


def _ask(rest: str, cwd: Path) -> Request:
    opts, rest = _leading_options(rest, "ask", ("persona",))
    question = _unquote_whole(rest)
    if not question:
        raise CommandError(f"usage: {SPECS['ask'].usage}")
    return Request(build(K.Ask, "ask", question=question, **opts), label="ask")


def _search(rest: str, cwd: Path) -> Request:
    opts, rest = _leading_options(rest, "search", ("k", "level"))
    text = _unquote_whole(rest)
    if not text:
        raise CommandError(f"usage: {SPECS['search'].usage}")
    return Request(build(K.Search, "search", text=text, **opts), label="search")


def _leading_options(rest: str, name: str, allowed: tuple[str, ...]) -> tuple[dict[str, str], str]:
    """``KEY=VALUE`` words before free text (``search k=3 level=chunks ZODB``); the rest is the text. The values
    stay words: the request's type says what each must be."""
    opts: dict[str, str] = {}
    while m := re.match(r"^([a-z_]+)=(\S+)(?:\s+(.*))?$", rest, re.DOTALL):
        if m.group(1) not in allowed:
            break  # free text that happens to hold '=': not an option
        if m.group(1) in opts:
            raise CommandError(f"{name}: {m.group(1)} given twice")
        opts[m.group(1)] = m.group(2)
        rest = m.group(3) or ""
    return opts, rest


def _inspect(rest: str, cwd: Path) -> Request:
    words = _split(rest, "inspect")
    if len(words) != 1:
        raise CommandError(f"usage: {SPECS['inspect'].usage}")
    return Request(build(K.Inspect, "inspect", oid=normalize_oid(words[0])), label="inspect")


def _send(rest: str, cwd: Path) -> Request:
    words = split_args(rest)
    if len(words) < 2:
        raise CommandError(f"usage: {SPECS['send'].usage}")
    oid, selector = normalize_oid(words[0].text), words[1].text
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for word in words[2:]:
        m = _KWARG.match(word.text) if not word.quoted_name else None
        if m:
            if m.group(1) in kwargs:
                raise CommandError(f"send: keyword {m.group(1)!r} given twice")
            kwargs[m.group(1)] = literal(m.group(2), quoted=word.quoted)
        else:
            if kwargs:
                raise CommandError(f"send: positional argument {word.text!r} after keyword arguments")
            args.append(literal(word.text, quoted=word.quoted))
    # strict: an argument is sent as the literal it is, never converted
    try:
        call = msgspec.convert({"oid": oid, "selector": selector, "args": args, "kwargs": kwargs}, K.Send)
    except msgspec.ValidationError as e:
        raise CommandError(f"send: {e} (usage: {SPECS['send'].usage})") from None
    return Request(call, label="send")


def _define(rest: str, cwd: Path) -> Request | NeedsSource:
    words = _split(rest, "define")
    if len(words) not in (2, 3):
        raise CommandError(f"usage: {SPECS['define'].usage}")
    oid, selector = normalize_oid(words[0]), words[1]
    try:  # before any source is typed: the selector's rule is Define's own
        msgspec.convert(selector, K.Identifier)
    except msgspec.ValidationError as e:
        raise CommandError(f"define: selector {selector!r}: {e}") from None
    if len(words) == 2:
        return NeedsSource(oid, selector)
    if not words[2].startswith("@") or len(words[2]) == 1:
        raise CommandError(f"define: the third argument must be @FILE, not {words[2]!r}")
    path = Path(words[2][1:]).expanduser()
    path = path if path.is_absolute() else cwd / path
    try:
        if path.stat().st_size > MAX_SOURCE_BYTES:
            raise CommandError(f"define: {path} is larger than {MAX_SOURCE_BYTES} bytes")
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CommandError(f"define: cannot read {path}: {e}") from e
    return NeedsSource(oid, selector).finish(source.splitlines())


def _trace(rest: str, cwd: Path) -> Request:
    words = _split(rest, "trace")
    if len(words) != 1:
        raise CommandError(f"usage: {SPECS['trace'].usage} (a cycle id is hex, as shown after 'ask')")
    return Request(build(K.Trace, "trace", cycle_id=words[0].lower()), label="trace")


def _watch(rest: str, cwd: Path) -> Request:
    words = _split(rest, "watch")
    if len(words) > 1:
        raise CommandError(f"usage: {SPECS['watch'].usage} (an id is hex, as shown by watch, ask or status)")
    # watching has no effect: proto lists it retry-safe (a kernel restart hands it to the new kernel) and a
    # control request (it holds none of the kernel's work slots); resumable: the console sends it again when
    # the broker was gone for longer than the client waits
    return Request(build(K.Watch, "watch", **({"id": words[0].lower()} if words else {})), label="watch",
                   resumable=True)


def _verify(rest: str, cwd: Path) -> Request:
    words = _split(rest, "verify")
    if words not in ([], ["repair"]):
        raise CommandError(f"usage: {SPECS['verify'].usage}")
    return Request(build(K.Verify, "verify", repair=words == ["repair"]), label="verify")


def _forge(rest: str, cwd: Path) -> Request:
    words = _split(rest, "forge")
    if len(words) != 1:
        raise CommandError(f"usage: {SPECS['forge'].usage}")
    return Request(build(K.Forge, "forge", persona=words[0]), label="forge")


_PARSERS: dict[str, Callable[[str, Path], Parsed]] = {
    "help": _help, "quit": _quit, "cancel": _cancel,
    "status": _no_args("status"), "stats": _no_args("stats"), "display_yourself": _no_args("display_yourself"),
    "audit": _no_args("audit"),
    "ingest": _ingest, "ask": _ask, "search": _search, "inspect": _inspect, "send": _send,
    "define": _define, "trace": _trace, "forge": _forge, "verify": _verify, "watch": _watch,
}


def parse_table1_line(text: str) -> Request:
    """A raw Table 1 object, validated locally (as Table 1, then as the convenience it stands for, with the
    kernel's own types) so a typo never reaches the kernel."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise CommandError(f"not valid JSON: {e.msg} at column {e.colno}") from e
    except RecursionError:  # a 5,000-deep line: an error for the line, never a traceback
        raise CommandError("JSON nested too deep to read; flatten the arguments") from None
    try:
        cmd = K.parse_table1(obj)
    except proto.ProtocolError as e:
        raise CommandError(e.message) from e
    cmd = msgspec.structs.replace(cmd, target_oid=normalize_oid(cmd.target_oid))
    try:
        K.request_of(cmd)
    except (msgspec.ValidationError, ValueError) as e:
        raise CommandError(f"{cmd.command}: {e}") from None
    return Request(cmd, label="command")


# -- the pieces -------------------------------------------------------------------------------


def normalize_oid(text: str) -> str:
    """:func:`batos.uvm.normalize_oid`, its complaint as a :class:`CommandError`."""
    try:
        return uvm.normalize_oid(text)
    except ValueError as e:
        raise CommandError(str(e)) from None


def _split(rest: str, name: str) -> list[str]:
    try:
        return shlex.split(rest)
    except ValueError as e:
        raise CommandError(f"{name}: bad quoting ({e})") from e


def _unquote_whole(text: str) -> str:
    """Free text is taken as typed (apostrophes and all); only quotes around the whole of it go."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1].strip()
    return text


@dataclass(frozen=True)
class Word:
    text: str  # with top-level quotes removed
    quoted: bool  # some part was quoted at top level: the value is a string, never a literal
    quoted_name: bool = False  # the quote began before any '=' (so it is not KEY=VALUE)


_OPEN = {"(": ")", "[": "]", "{": "}"}


def split_args(text: str) -> list[Word]:
    """Split like a shell, except that brackets group: ``[1, 2]`` and ``{"a": 1}`` stay one word.

    Quotes at the top level group and are removed (``"a b"`` is one string); quotes inside
    brackets are kept, since they belong to the literal.
    """
    words: list[Word] = []
    buf: list[str] = []
    quoted = quoted_name = started = False
    stack: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if not stack and c.isspace():
            if started:
                words.append(Word("".join(buf), quoted, quoted_name))
                buf, quoted, quoted_name, started = [], False, False, False
            i += 1
            continue
        started = True
        if c in "'\"":
            end = _end_of_quote(text, i)
            if stack:  # part of a literal: keep it verbatim
                buf.append(text[i:end + 1])
            else:
                if "=" not in buf:
                    quoted_name = True
                quoted = True
                buf.append(_unescape(text[i + 1:end], c))
            i = end + 1
            continue
        if c == "\\" and not stack and i + 1 < len(text):
            buf.append(text[i + 1])
            i += 2
            continue
        if c in _OPEN:
            stack.append(_OPEN[c])
        elif c in ")]}":
            if not stack or stack[-1] != c:
                raise CommandError(f"unbalanced {c!r} at column {i + 1}")
            stack.pop()
        buf.append(c)
        i += 1
    if stack:
        raise CommandError(f"unclosed bracket: expected {stack[-1]!r} before the end of the line")
    if started:
        words.append(Word("".join(buf), quoted, quoted_name))
    return words


def _end_of_quote(text: str, start: int) -> int:
    q = text[start]
    i = start + 1
    while i < len(text):
        if text[i] == "\\" and q == '"':
            i += 2
            continue
        if text[i] == q:
            return i
        i += 1
    raise CommandError(f"bad quoting: no closing {q} for the quote at column {start + 1}")


def _unescape(body: str, quote: str) -> str:
    # Inside double quotes a backslash escapes the next character (as in a shell); single quotes
    # are literal.
    return re.sub(r"\\(.)", r"\1", body) if quote == '"' else body


_LITERAL_TYPES = (int, float, str, bool, bytes, list, dict, type(None))


def literal(text: str, *, quoted: bool = False) -> Any:
    """A Python or JSON literal where ``text`` is one, else the string itself."""
    if quoted:
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            return text
    return _wire_value(value, text)


def _wire_value(value: Any, text: str) -> Any:
    """Tuples become lists; types the wire cannot carry (sets, complex) are refused clearly."""
    if isinstance(value, tuple):
        return [_wire_value(v, text) for v in value]
    if isinstance(value, list):
        return [_wire_value(v, text) for v in value]
    if isinstance(value, dict):
        return {_wire_key(k, text): _wire_value(v, text) for k, v in value.items()}
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
        raise CommandError(f"{text!r}: integers on the wire fit in 64 bits (quote it to send it as a string)")
    if not isinstance(value, _LITERAL_TYPES):
        raise CommandError(f"{text!r} is a {type(value).__name__}, which cannot be sent; use a list, dict, "
                           "number, string, bool or None (quote it to send it as a string)")
    return value


def _wire_key(key: Any, text: str) -> Any:
    if isinstance(key, str | int):
        return key
    raise CommandError(f"{text!r}: dict keys must be strings or integers, not {type(key).__name__}")


def help_text(name: str = "") -> list[str]:
    """Lines of help: the whole list, or one command's usage and summary."""
    if name:
        spec = SPECS.get(ALIASES.get(name, name))
        if spec is None:
            raise CommandError(f"no command {name!r}; type 'help' for the list")
        return [f"{spec.usage}", f"    {spec.summary}"]
    width = max(len(s.usage) for s in SPECS.values())
    lines = []
    for spec in SPECS.values():
        wrapped = textwrap.wrap(spec.summary, max(40, HELP_WIDTH - width - 2)) or [""]
        lines.append(f"{spec.usage:<{width}}  {wrapped[0]}")
        lines += [" " * (width + 2) + more for more in wrapped[1:]]
    lines.append("Any line starting with '{' is sent as a Table 1 object, e.g.")
    lines.append('  {"command": "initiate_cognitive_cycle", "target_oid": "0", "mission_brief": '
                 '{"type": "unhandled_message", "selector": "greet", "args": [], "kwargs": {}}}')
    return lines
