"""The UvmObject model: persistent prototype objects shared by the kernel and memory.

A UvmObject holds named slots, an ordered list of parents for delegation, and method
slots stored as *source text* with a version (functions do not pickle, and a function
stored in a slot would not be bound to the receiver).

Methods are never compiled or executed in the process that holds the image. This module only
*parses* method source (``ast``: its name, parameters, docstring); ``lookup`` answers a
:class:`BoundMethod` (the receiver, the owner and the source), not a Python function. Running
it -- default-argument expressions, decorators and the body alike -- is the sandbox's job
(services/kernel/sandbox.py, a separate confined process): evaluating a default expression
here would run user code with the kernel's environment, memory and event loop.

Why slots live in the object's own state rather than in a separate PersistentMapping:
one record per object halves the records a chunk commit writes, and the blueprint's
``_p_changed`` discipline then applies directly: after mutating a plain ``list``/``dict``
slot in place, set ``obj._p_changed = True`` (or call :meth:`UvmObject.mark_changed`).
``set_slot`` marks the object changed itself.

Lookup order for a selector: the receiver's own slots, then its own methods, then each
parent depth-first, left to right, each object visited once (cycles are harmless), then
the builtin selectors of the class (``clone``, ``get_slot``...). A miss raises
:class:`DoesNotUnderstand` carrying the selector; names starting with ``_`` never do
(they raise a plain ``AttributeError``, so pickle/copy/hasattr probing stays sane).
"""

from __future__ import annotations

import ast
import re
import time
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import persistent
from persistent.mapping import PersistentMapping
from ZODB.utils import p64, u64

PROTOTYPE_NAMES = (
    "traits",
    "memory_chunk",
    "contextual_summary",
    "context_fractal",
    "query_morph",
    "cognitive_cycle",
    "alfred",
    "babs",
    "brick",
    "robin",
)

# Class methods reachable through lookup()/send() once the parent chain misses.
BUILTIN_SELECTORS = frozenset(
    {"clone", "get_slot", "set_slot", "has_slot", "del_slot", "slot_names", "own_slots", "method_names"}
)

Root = MutableMapping[str, Any]  # conn.root(): the ZODB root mapping (ZODB itself ships no types)


MAX_METHOD_SOURCE_CHARS = 20_000  # a method, not a program; also bounds what the parser is given


class MethodNotRunnable(TypeError):
    """A stored method was called in-process: methods run only in the sandbox (send them through the kernel)."""

    def __init__(self, selector: str):
        super().__init__(f"#{selector} is a stored method: it runs only in the sandbox (send it through the "
                         "kernel); its source is never executed in this process")
        self.selector = selector


class DoesNotUnderstand(AttributeError):
    """No slot or method named ``selector`` anywhere in the receiver's delegation chain."""

    def __init__(self, selector: str, receiver_oid: str = ""):
        super().__init__(f"object {receiver_oid or '<new>'} does not understand #{selector}")
        self.selector = selector
        self.receiver_oid = receiver_oid


LARGE_VALUE_CHARS = 64 * 1024  # a str/bytes slot value at least this long lives in a record of its own


class LargeValue(persistent.Persistent):  # type: ignore[misc]  # persistent ships no types
    """A big immutable slot value (str or bytes) in its own record, so that changing any other slot of its
    object rewrites a small record, not the value (5 one-integer sends next to a 1 MB slot grew the image by
    ~5 MB before). Only immutable values: an in-place mutation of a list here would escape the owner's
    ``_p_changed`` discipline. Transparent: slot readers get the value, never the holder."""

    def __init__(self, value: str | bytes):
        self.value = value


def _is_large(value: Any) -> bool:
    return isinstance(value, str | bytes) and len(value) >= LARGE_VALUE_CHARS


def _unwrap(value: Any) -> Any:
    return value.value if isinstance(value, LargeValue) else value


class MethodSource:
    """A method slot: source text defining ``def <selector>(self, ...)``, a version, metadata.

    Immutable once made; redefining a selector stores a new MethodSource with version + 1.
    Plain (not Persistent): it is pickled inside its owner's record.
    """

    __slots__ = ("meta", "selector", "source", "version")

    def __init__(self, selector: str, source: str, version: int = 1, meta: dict[str, Any] | None = None):
        self.selector = selector
        self.source = source
        self.version = version
        self.meta = dict(meta or {})

    def __getstate__(self) -> dict[str, Any]:
        return {"selector": self.selector, "source": self.source, "version": self.version, "meta": self.meta}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            object.__setattr__(self, key, value)

    def __repr__(self) -> str:
        return f"<MethodSource #{self.selector} v{self.version}>"


def _check_name(name: object, what: str) -> None:
    if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
        raise ValueError(f"invalid {what} name {name!r}: must be an identifier not starting with '_'")
    if name in _CLASS_ATTRS:
        raise ValueError(f"invalid {what} name {name!r}: reserved by UvmObject")


def validate_method_source(selector: str, source: str) -> ast.FunctionDef | ast.AsyncFunctionDef:
    """Parse ``source`` (never run it) and check it defines ``selector`` at top level; raise ValueError."""
    _check_name(selector, "method")
    if not isinstance(source, str):
        raise ValueError(f"method source must be a string, got {type(source).__name__}")
    if len(source) > MAX_METHOD_SOURCE_CHARS:
        raise ValueError(f"method source for #{selector} is {len(source)} characters; the limit is "
                         f"{MAX_METHOD_SOURCE_CHARS}")
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        raise ValueError(f"method source for #{selector} does not parse: {e.msg} (line {e.lineno})") from e
    except (ValueError, RecursionError, MemoryError) as e:  # null bytes; pathological nesting
        raise ValueError(f"method source for #{selector} does not parse: {type(e).__name__}") from None
    defs = [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == selector]
    if not defs:
        raise ValueError(f"method source must define a top-level function named {selector!r}")
    if not defs[-1].args.args and not defs[-1].args.vararg:
        raise ValueError(f"method {selector!r} must take the receiver (self) as its first parameter")
    return defs[-1]


@dataclass(frozen=True)
class MethodInfo:
    """What the image may know about a method without running it: read from the AST alone."""

    selector: str
    params: tuple[str, ...]  # after self; "*args" / "**kw" marked; defaults shown as source text
    doc: str | None

    @property
    def signature(self) -> str:
        return f"{self.selector}({', '.join(('self', *self.params))})"


def method_info(selector: str, source: str) -> MethodInfo:
    """Name, parameters (default expressions as their source text, unevaluated) and docstring."""
    func = validate_method_source(selector, source)
    a = func.args
    positional = [*a.posonlyargs, *a.args]
    defaults: list[ast.expr | None] = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    params = [_param(arg, d) for arg, d in zip(positional, defaults, strict=True)][1:]
    if a.vararg:
        params.append("*" + a.vararg.arg)
    params += [_param(arg, d) for arg, d in zip(a.kwonlyargs, a.kw_defaults, strict=True)]
    if a.kwarg:
        params.append("**" + a.kwarg.arg)
    return MethodInfo(selector, tuple(params), ast.get_docstring(func))


def _param(arg: ast.arg, default: ast.expr | None) -> str:
    return arg.arg if default is None else f"{arg.arg}={ast.unparse(default)}"


class BoundMethod:
    """A method found by :meth:`UvmObject.lookup`: receiver, owner and source -- data, not a function.

    Calling it raises :class:`MethodNotRunnable`: the image's process never executes method source.
    The kernel sends ``source`` to the sandbox with the receiver's slots and the call's arguments.
    """

    __slots__ = ("method", "owner", "receiver")

    def __init__(self, receiver: UvmObject, owner: UvmObject, method: MethodSource):
        self.receiver = receiver
        self.owner = owner
        self.method = method

    @property
    def selector(self) -> str:
        return self.method.selector

    @property
    def source(self) -> str:
        return self.method.source

    @property
    def version(self) -> int:
        return self.method.version

    def info(self) -> MethodInfo:
        return method_info(self.method.selector, self.method.source)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise MethodNotRunnable(self.method.selector)

    def __repr__(self) -> str:
        return f"<BoundMethod #{self.method.selector} v{self.method.version} of {self.receiver!r}>"


class UvmObject(persistent.Persistent):  # type: ignore[misc]  # persistent ships no types
    """A persistent prototype object: slots, parents, method slots."""

    def __init__(self, name: str = "", parents: list[UvmObject] | None = None, **slots: Any):
        self._name = name
        self._parents: list[UvmObject] = list(parents or [])
        self._slots: dict[str, Any] = {}
        self._methods: dict[str, MethodSource] = {}
        for key, value in slots.items():
            self.set_slot(key, value)

    # -- identity ----------------------------------------------------------------------------
    @property
    def uvm_name(self) -> str:
        return self._name

    @property
    def parents(self) -> list[UvmObject]:
        return list(self._parents)

    def set_parents(self, parents: list[UvmObject]) -> None:
        for p in parents:
            if not isinstance(p, UvmObject):
                raise TypeError(f"a parent must be a UvmObject, got {type(p).__name__}")
        self._parents = list(parents)

    def add_parent(self, parent: UvmObject, first: bool = False) -> None:
        if not isinstance(parent, UvmObject):
            raise TypeError(f"a parent must be a UvmObject, got {type(parent).__name__}")
        self._parents = [parent, *self._parents] if first else [*self._parents, parent]

    def oid(self) -> str:
        return oid_hex(self)

    # -- slots -------------------------------------------------------------------------------
    def get_slot(self, name: str, default: Any = None) -> Any:
        """An own slot's value (no delegation); ``default`` when absent."""
        return _unwrap(self._slots.get(name, default))

    def set_slot(self, name: str, value: Any) -> None:
        _check_name(name, "slot")
        old = self._slots.get(name)
        if isinstance(old, LargeValue) and _is_large(value):
            if type(old.value) is not type(value) or old.value != value:
                old.value = value  # rewrites the holder's record only
            return
        self._slots[name] = LargeValue(value) if _is_large(value) else value
        self._p_changed = True

    def del_slot(self, name: str) -> None:
        if name not in self._slots:
            raise KeyError(name)
        del self._slots[name]
        self._p_changed = True

    def has_slot(self, name: str) -> bool:
        """True when this object itself holds a data slot ``name`` (no delegation; see responds_to)."""
        return name in self._slots

    def slot_names(self) -> list[str]:
        return list(self._slots)

    def own_slots(self) -> dict[str, Any]:
        return {name: _unwrap(value) for name, value in self._slots.items()}

    def mark_changed(self) -> None:
        """The ``_p_changed`` discipline: call after mutating a plain list/dict slot in place."""
        self._p_changed = True

    # -- methods -----------------------------------------------------------------------------
    def define_method(self, selector: str, source: str, **meta: Any) -> MethodSource:
        """Store ``source`` (which defines ``def selector(self, ...)``) as a method slot."""
        validate_method_source(selector, source)
        previous = self.method_source(selector)
        version = (previous.version + 1) if previous is not None else 1
        meta.setdefault("defined_at", time.time())
        method = MethodSource(selector, source, version, meta)
        self._methods[selector] = method
        self._p_changed = True
        return method

    def remove_method(self, selector: str) -> None:
        if selector not in self._methods:
            raise KeyError(selector)
        del self._methods[selector]
        self._p_changed = True

    def method_names(self) -> list[str]:
        """Own method selectors."""
        return list(self._methods)

    def method_source(self, selector: str) -> MethodSource | None:
        for obj in self._chain():
            if selector in obj._methods:
                return obj._methods[selector]
        return None

    # -- lookup & messaging ------------------------------------------------------------------
    def _chain(self) -> Iterator[UvmObject]:
        """self, then parents depth-first left to right; each object once (cycle-safe)."""
        seen: set[int] = set()
        stack: list[UvmObject] = [self]
        while stack:
            obj = stack.pop()
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            yield obj
            stack.extend(reversed(obj._parents))

    def lookup(self, selector: str) -> Any:
        """Resolve ``selector``: a slot's value, or a :class:`BoundMethod` (source, never compiled here)."""
        if not isinstance(selector, str) or not selector:
            raise TypeError(f"a selector must be a non-empty string, got {selector!r}")
        if selector.startswith("_"):
            raise AttributeError(selector)
        for obj in self._chain():
            if selector in obj._slots:
                return _unwrap(obj._slots[selector])
            if selector in obj._methods:
                return BoundMethod(self, obj, obj._methods[selector])
        if selector in BUILTIN_SELECTORS:
            return getattr(self, selector)
        raise DoesNotUnderstand(selector, _safe_oid(self))

    def send(self, selector: str, *args: Any, **kwargs: Any) -> Any:
        """Send a message in-process: a data slot's value or a builtin selector's result.

        A stored method raises :class:`MethodNotRunnable`: it runs only in the sandbox (the kernel's ``send``).
        """
        target = self.lookup(selector)
        if isinstance(target, BoundMethod):
            raise MethodNotRunnable(selector)
        if not callable(target):
            if args or kwargs:
                raise TypeError(f"#{selector} is a data slot, not a method; it takes no arguments")
            return target
        return target(*args, **kwargs)

    def responds_to(self, selector: str) -> bool:
        try:
            self.lookup(selector)
        except AttributeError:
            return False
        return True

    def clone(self, name: str = "", **slots: Any) -> UvmObject:
        """A new object whose single parent is this one (prototypal inheritance)."""
        return UvmObject(name=name or self._name, parents=[self], **slots)

    # -- attribute protocol ------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        # Only reached when normal attribute lookup failed.
        if name.startswith("_"):
            raise AttributeError(name)
        return self.lookup(name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_") or name in _CLASS_ATTRS:
            super().__setattr__(name, value)
        else:
            self.set_slot(name, value)

    def __repr__(self) -> str:
        return f"<UvmObject {self._name or '?'} oid={_safe_oid(self)}>"


_CLASS_ATTRS = frozenset(n for n in dir(UvmObject) if not n.startswith("_"))
RESERVED_NAMES = _CLASS_ATTRS  # public names of the class: never slot or method names


def oid_hex(obj: persistent.Persistent) -> str:
    """The object's OID as hex without leading zeros; ``"0"`` for the root."""
    oid = getattr(obj, "_p_oid", None)
    if oid is None:
        raise ValueError(f"{type(obj).__name__} has no OID yet: add it to a connection (conn.add) first")
    return format(u64(oid), "x")


def _safe_oid(obj: persistent.Persistent) -> str:
    oid = obj._p_oid
    return format(u64(oid), "x") if oid is not None else ""


def parse_oid(oid: str | int) -> int:
    """Hex string (optionally ``0x``-prefixed) or int → int; KeyError when malformed."""
    if isinstance(oid, bool):
        raise KeyError(f"unknown oid {oid!r}: not a hex string")
    if isinstance(oid, int):
        value = oid
    elif isinstance(oid, str):
        text = oid.strip().lower()
        text = text[2:] if text.startswith("0x") else text
        try:
            value = int(text, 16)
        except ValueError:
            raise KeyError(f"unknown oid {oid!r}: not a hex string") from None
    else:
        raise KeyError(f"unknown oid {oid!r}: not a hex string")
    if not 0 <= value < 2**64:
        raise KeyError(f"unknown oid {oid!r}: out of range")
    return value


_OID_TEXT = re.compile(r"(?:0x)?([0-9a-f]+)")
_OID_MAX_DIGITS = 16  # a ZODB OID is 64 bits


def normalize_oid(text: object) -> str:
    """An OID as a person or client writes it (``0x`` prefix, either case, leading zeros) -> the form
    :func:`oid_hex` gives (lower-case hex, no leading zeros, ``"0"`` for the root); ValueError otherwise."""
    m = _OID_TEXT.fullmatch(text.strip().lower()) if isinstance(text, str) else None
    digits = (m.group(1).lstrip("0") or "0") if m else ""
    if not digits or len(digits) > _OID_MAX_DIGITS:
        raise ValueError(f"bad OID {text!r}: an OID is hexadecimal (0 is the root object)")
    return digits


def resolve_oid(conn: Any, oid: str | int) -> persistent.Persistent:
    """The persistent object with this OID in ``conn``; KeyError("unknown oid ...") if none."""
    from ZODB.POSException import POSKeyError

    value = parse_oid(oid)
    try:
        obj = conn.get(p64(value))
        obj._p_activate()  # conn.get may hand back a ghost; loading proves it exists
    except (POSKeyError, KeyError):
        raise KeyError(f"unknown oid {oid!r}") from None
    return obj


# -- Prototypal Awakening ------------------------------------------------------------------

# Slots each prototype is born with. Mutable defaults are copied into every clone by the
# memory/kernel code that makes instances; prototypes only document the shape.
_PROTOTYPE_SLOTS: dict[str, dict[str, Any]] = {
    "traits": {"description": "Root trait object: every prototype delegates here."},
    "memory_chunk": {"source_text": "", "metadata": {}, "vector_embedding": None, "parent_summary": None},
    "contextual_summary": {"summary_text": "", "kind": "file", "metadata": {}, "child_chunks": None},
    "context_fractal": {"summary": "", "full_content_blob": None, "meta": {}},
    "query_morph": {"initial_prompt": "", "refined_query": None, "retrieved_context": None, "reasoning_log": []},
    "cognitive_cycle": {"cycle_id": "", "mission": {}, "psm_state": "IDLE", "status": "IN_PROGRESS"},
    "alfred": {"persona": "ALFRED", "role": "System steward and auditor"},
    "babs": {"persona": "BABS", "role": "Knowledge weaver and data curator"},
    "brick": {"persona": "BRICK", "role": "Logic and code generation"},
    "robin": {"persona": "ROBIN", "role": "Synthesis and explanation for the Architect"},
}


def awaken(root: Root) -> bool:
    """Give the root its prototypes if it lacks any; idempotent. True when something was added."""
    protos = root.get("prototypes")
    added = False
    if protos is None:
        protos = PersistentMapping()
        root["prototypes"] = protos
        added = True
    if "traits" not in protos:
        protos["traits"] = UvmObject("traits", **_PROTOTYPE_SLOTS["traits"])
        added = True
    traits = protos["traits"]
    for name in PROTOTYPE_NAMES[1:]:
        if name not in protos:
            protos[name] = UvmObject(name, parents=[traits], **_PROTOTYPE_SLOTS[name])
            added = True
    return added


def prototype_of(obj: UvmObject, prototypes: Mapping[str, UvmObject]) -> str:
    """The name of the first prototype in ``obj``'s chain (itself included); '' if none."""
    by_id = {id(p): name for name, p in prototypes.items()}
    for o in obj._chain():
        if id(o) in by_id:
            return by_id[id(o)]
    return ""
