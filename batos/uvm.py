"""The UvmObject model: persistent prototype objects shared by the kernel and memory.

A UvmObject holds named slots, an ordered list of parents for delegation, and method
slots stored as *source text* with a version (functions do not pickle, and a function
stored in a slot would not be bound to the receiver). Methods are compiled on first use,
cached in a volatile ``_v_`` attribute (dropped whenever ZODB ghosts or invalidates the
object), and bound to the receiver with ``types.MethodType``.

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
import builtins
import linecache
import time
import types
from collections.abc import Iterator
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


class DoesNotUnderstand(AttributeError):
    """No slot or method named ``selector`` anywhere in the receiver's delegation chain."""

    def __init__(self, selector: str, receiver_oid: str = ""):
        super().__init__(f"object {receiver_oid or '<new>'} does not understand #{selector}")
        self.selector = selector
        self.receiver_oid = receiver_oid


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


def validate_method_source(selector: str, source: str) -> ast.AST:
    """Parse ``source`` and check that it defines ``selector`` at top level; raise ValueError."""
    _check_name(selector, "method")
    if not isinstance(source, str):
        raise ValueError(f"method source must be a string, got {type(source).__name__}")
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        raise ValueError(f"method source for #{selector} does not parse: {e.msg} (line {e.lineno})") from e
    defs = [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == selector]
    if not defs:
        raise ValueError(f"method source must define a top-level function named {selector!r}")
    if not defs[-1].args.args and not defs[-1].args.vararg:
        raise ValueError(f"method {selector!r} must take the receiver (self) as its first parameter")
    return tree


def compile_method(method: MethodSource, label: str) -> types.FunctionType:
    """Compile a method slot into a plain function (not yet bound)."""
    validate_method_source(method.selector, method.source)
    filename = f"<uvm {label}#{method.selector} v{method.version}>"
    # Register the source so tracebacks through generated methods show their lines.
    linecache.cache[filename] = (len(method.source), None, method.source.splitlines(True), filename)
    namespace: dict[str, Any] = {"__builtins__": builtins, "__name__": f"uvm.{method.selector}"}
    exec(compile(method.source, filename, "exec"), namespace)
    fn = namespace[method.selector]
    if not isinstance(fn, types.FunctionType):
        raise ValueError(f"{method.selector!r} in method source is not a function")
    return fn


class UvmObject(persistent.Persistent):
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
        return self._slots.get(name, default)

    def set_slot(self, name: str, value: Any) -> None:
        _check_name(name, "slot")
        self._slots[name] = value
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
        return dict(self._slots)

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
        self._compiled().pop(selector, None)
        return method

    def remove_method(self, selector: str) -> None:
        if selector not in self._methods:
            raise KeyError(selector)
        del self._methods[selector]
        self._p_changed = True
        self._compiled().pop(selector, None)

    def method_names(self) -> list[str]:
        """Own method selectors."""
        return list(self._methods)

    def method_source(self, selector: str) -> MethodSource | None:
        for obj in self._chain():
            if selector in obj._methods:
                return obj._methods[selector]
        return None

    def _compiled(self) -> dict[str, tuple[int, types.FunctionType]]:
        # Volatile: ZODB drops _v_ attributes when it ghosts or invalidates the object,
        # so a method redefined by another process is recompiled here on next use.
        try:
            return self._v_compiled
        except AttributeError:
            self._v_compiled: dict[str, tuple[int, types.FunctionType]] = {}
            return self._v_compiled

    def _function_for(self, selector: str) -> types.FunctionType:
        method = self._methods[selector]
        cache = self._compiled()
        hit = cache.get(selector)
        if hit is not None and hit[0] == method.version:
            return hit[1]
        fn = compile_method(method, _safe_oid(self))
        cache[selector] = (method.version, fn)
        return fn

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
        """Resolve ``selector``: a slot's value or a method bound to this receiver."""
        if not isinstance(selector, str) or not selector:
            raise TypeError(f"a selector must be a non-empty string, got {selector!r}")
        if selector.startswith("_"):
            raise AttributeError(selector)
        for obj in self._chain():
            if selector in obj._slots:
                return obj._slots[selector]
            if selector in obj._methods:
                return types.MethodType(obj._function_for(selector), self)
        if selector in BUILTIN_SELECTORS:
            return getattr(self, selector)
        raise DoesNotUnderstand(selector, _safe_oid(self))

    def send(self, selector: str, *args: Any, **kwargs: Any) -> Any:
        """Send a message: call the method (or callable slot) found by lookup."""
        target = self.lookup(selector)
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


def awaken(root: Any) -> bool:
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


def prototype_of(obj: UvmObject, prototypes: Any) -> str:
    """The name of the first prototype in ``obj``'s chain (itself included); '' if none."""
    by_id = {id(p): name for name, p in prototypes.items()}
    for o in obj._chain():
        if id(o) in by_id:
            return by_id[id(o)]
    return ""
