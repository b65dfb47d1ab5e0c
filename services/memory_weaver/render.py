"""Plain-data views of image objects for `inspect` (any object, by OID)."""

from __future__ import annotations

from typing import Any

import persistent
from ZODB.blob import Blob

from batos.errors import ServiceError
from batos.uvm import UvmObject, oid_hex, prototype_of, resolve_oid
from proto import ErrorCode

REPR_CHARS = 300  # a slot's rendering is cut here; `get` is for looking, not for bulk export
MAX_CHILDREN = 1000


def resolve(conn: Any, oid: str | int) -> persistent.Persistent:
    try:
        return resolve_oid(conn, oid)
    except KeyError as e:
        raise ServiceError(ErrorCode.NOT_FOUND, str(e.args[0])) from None


def _ref(obj: persistent.Persistent) -> str:
    name = obj.uvm_name if isinstance(obj, UvmObject) else type(obj).__name__
    return f"<{name} oid={_oid(obj)}>"


def _oid(obj: persistent.Persistent) -> str:
    return oid_hex(obj) if obj._p_oid is not None else ""


def render_value(value: Any, limit: int = REPR_CHARS) -> str:
    """A short, safe text for a slot value (never loads a whole graph)."""
    if isinstance(value, Blob):
        return "<blob>"
    if isinstance(value, persistent.Persistent) and not isinstance(value, dict | list):
        return _ref(value)
    if isinstance(value, bytes | bytearray):
        return f"<{len(value)} bytes>"
    if isinstance(value, list | tuple) and value and all(isinstance(v, persistent.Persistent) for v in value[:20]):
        shown = ", ".join(_ref(v) for v in value[:10])
        return f"[{shown}{', ...' if len(value) > 10 else ''}] ({len(value)})"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def inspect_object(root: Any, conn: Any, oid: str | int) -> dict[str, Any]:
    obj = resolve(conn, oid)
    if isinstance(obj, UvmObject):
        chain_methods = []
        seen: set[str] = set()
        for o in obj._chain():
            for sel in o.method_names():
                if sel not in seen:
                    seen.add(sel)
                    m = o._methods[sel]
                    chain_methods.append({"selector": sel, "version": m.version, "owner": _oid(o)})
        return {
            "oid": _oid(obj), "prototype": prototype_of(obj, root["prototypes"]), "name": obj.uvm_name,
            "slots": {k: render_value(v) for k, v in obj.own_slots().items()},
            "parents": [_oid(p) for p in obj.parents], "methods": obj.method_names(),
            "all_methods": chain_methods, "live": _is_live(root, obj),
        }
    if hasattr(obj, "items"):  # the root and other mappings
        slots = {str(k): render_value(v) for k, v in list(obj.items())[:MAX_CHILDREN]}
    else:
        state = obj.__getstate__() if hasattr(obj, "__getstate__") else {}
        slots = {str(k): render_value(v) for k, v in (state or {}).items()} if isinstance(state, dict) else {}
    return {"oid": _oid(obj), "prototype": "", "name": "root" if _oid(obj) == "0" else type(obj).__name__,
            "slots": slots, "parents": [], "methods": []}


def _is_live(root: Any, obj: UvmObject) -> bool | None:
    mem = root.get("memory")
    if mem is None or prototype_of(obj, root["prototypes"]) not in (
            "memory_chunk", "contextual_summary", "context_fractal"):
        return None
    return int.from_bytes(obj._p_oid, "big") in mem.objects
