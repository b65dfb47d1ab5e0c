"""Pure formatting: an event or a reply body in, lines of ``(style, text)`` fragments out.

Every command has a formatter that knows its reply's shape (answers with citations, search hits,
stats, status, traces...); anything else, or any key a formatter does not know, is shown by
:func:`format_tree` as readable ``key: value`` lines, so a reply that grows a field still shows it.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

Fragments = list[tuple[str, str]]

# Long texts (observations, snippets) are cut: the full text is one `trace` or `inspect` away.
OBSERVATION_CHARS = 400
SNIPPET_CHARS = 100
LIST_LIMIT = 50
BAR_CELLS = 20


def plain(frags: Fragments) -> str:
    return "".join(text for _, text in frags)


# Control characters that a terminal would act on (ESC sequences, BEL, CR overwriting a line, C1 codes,
# bidi overrides that reorder what is shown): text from results never drives the terminal. Newline and tab
# stay; the console's own styling is in fragment styles, never in the text.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape(m: re.Match[str]) -> str:
    code = ord(m.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe_text(text: str) -> str:
    """``text`` with terminal control characters shown as escapes (``\\x1b``), newline and tab kept."""
    return _CONTROL.sub(_escape, text)


def json_safe(line: str) -> str:
    """One ``json.dumps(ensure_ascii=False)`` line with the controls JSON leaves raw (DEL, C1, bidi) written as
    ``\\uXXXX`` escapes: still the same JSON, and inert on a terminal. They can only occur inside strings."""
    return _CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", line)


def safe_fragments(frags: Fragments) -> Fragments:
    return [(style, safe_text(text)) for style, text in frags]


def short_id(value: Any) -> str:
    text = str(value)
    return text[:8] if len(text) > 12 else text


def clip(text: Any, limit: int) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def one_line(text: Any, limit: int) -> str:
    return clip(" ".join(str(text).split()), limit)


def human_bytes(n: Any) -> str:
    try:
        size = float(n)
    except (TypeError, ValueError):
        return str(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(n)


def human_seconds(s: Any) -> str:
    try:
        sec = float(s)
    except (TypeError, ValueError):
        return str(s)
    if sec < 60:
        return f"{sec:.0f}s" if sec >= 10 else f"{sec:.1f}s"
    m, sec = divmod(int(sec + 0.5), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


def display_path(path: Any, cwd: Path | None = None) -> str:
    """A path relative to the working directory when under it (shorter), else as given."""
    text = str(path or "")
    if not text:
        return "?"
    try:
        rel = Path(text).relative_to(cwd or Path.cwd())
    except ValueError:
        return text
    return str(rel)


def location(meta: dict[str, Any], cwd: Path | None = None) -> str:
    """``file:start-end`` from Table 2 metadata (or a citation, which has the same keys)."""
    path = display_path(meta.get("file_path"), cwd)
    start, end = meta.get("start_line"), meta.get("end_line")
    if start is None:
        return path
    return f"{path}:{start}-{end}" if end not in (None, start) else f"{path}:{start}"


def format_progress(body: dict[str, Any]) -> Fragments:
    stage = str(body.get("stage", "progress"))
    done = body.get("done", body.get("files_done"))
    total = body.get("total", body.get("files_total"))
    parts: Fragments = [("class:progress", f"{stage:<10}")]
    if isinstance(done, int | float) and isinstance(total, int | float) and total > 0:
        frac = max(0.0, min(1.0, done / total))
        filled = int(frac * BAR_CELLS)
        bar = "=" * filled + (">" if filled < BAR_CELLS else "") + " " * max(0, BAR_CELLS - filled - 1)
        parts.append(("class:progress", f" [{bar}] {_num(done)}/{_num(total)} {frac * 100:3.0f}%"))
    elif done is not None:
        parts.append(("class:progress", f" {_num(done)}"))
    if isinstance(body.get("rate"), int | float):
        parts.append(("class:dim", f"  {body['rate']:.1f}/s"))
    if isinstance(body.get("eta_s"), int | float):
        parts.append(("class:dim", f"  eta {human_seconds(body['eta_s'])}"))
    skip = {"event", "stage", "done", "total", "files_done", "files_total", "rate", "eta_s", "cycle_id"}
    extras = [f"{k}={_num(v)}" for k, v in body.items() if k not in skip and isinstance(v, int | float | str)]
    if extras:
        parts.append(("class:dim", "  " + " ".join(extras)))
    return parts


def _num(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def format_event(body: dict[str, Any]) -> list[Fragments]:
    """Lines for one event other than ``token`` (tokens are streamed, not formatted)."""
    name = str(body.get("event", "?"))
    if name == "state":
        frm = body.get("from") or body.get("previous")
        arrow = f"{frm} → " if frm else "→ "
        cycle = f"  (cycle {short_id(body['cycle_id'])})" if body.get("cycle_id") else ""
        state = str(body.get("state", "?"))
        style = "class:error" if state == "FAILED" else "class:state"
        where = f" in {body['failed_in']}" if body.get("failed_in") else ""
        note = f" — {one_line(body['note'], 300)}" if body.get("note") else ""
        return [[(style, f"{arrow}{state}{where}"), ("", note), ("class:dim", cycle)]]
    if name in ("thought", "action", "observation"):
        return [_format_step(name, body)]
    if name == "progress":
        return [format_progress(body)]
    if name == "log":
        level = str(body.get("level", "")).lower()
        style = "class:warning" if level in ("warning", "error") else "class:dim"
        return [[(style, str(body.get("text", "")))]]
    rest = {k: v for k, v in body.items() if k != "event"}
    return [[("class:key", f"{name}: "), ("", one_line(_compact(rest), 300))]]


def _format_step(name: str, body: dict[str, Any]) -> Fragments:
    step = body.get("step")
    head = f"{name} {step}: " if step is not None else f"{name}: "
    text = body.get("text")
    if not text and name == "action":
        act = body.get("action", "?")
        query = body.get("query")
        text = f"{act}({json.dumps(query, ensure_ascii=False)})" if query is not None else str(act)
    limit = OBSERVATION_CHARS if name == "observation" else OBSERVATION_CHARS * 2
    return [(f"class:{name}", head), (f"class:{name}", one_line(text or "", limit))]


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=json_default, separators=(", ", ": "))


def format_citations(citations: list[Any], cwd: Path | None = None, heading: str = "citations:") -> list[Fragments]:
    if not citations:
        return []
    lines: list[Fragments] = [[("class:header", heading)]]
    for i, c in enumerate(citations, 1):
        if not isinstance(c, dict):
            lines.append([("class:cite", f"  [{i}] {c}")])
            continue
        oid = f"  oid {c['oid']}" if c.get("oid") else ""
        name = f" {c['node_name']}" if c.get("node_name") else ""
        lines.append([("class:cite", f"  [{c.get('label') or i}] {location(c, cwd)}{name}"), ("class:dim", oid)])
    return lines


def format_answer(body: dict[str, Any], streamed: bool, cwd: Path | None = None) -> list[Fragments]:
    lines: list[Fragments] = []
    # a rewritten answer (a retry, or the extractive reply) is not what was streamed: print it
    if (not streamed or body.get("rewritten")) and body.get("answer") is not None:
        lines += [[("class:answer", ln)] for ln in str(body["answer"]).splitlines() or [""]]
    lines += format_citations(body.get("citations") or [], cwd)
    lines += format_citations(body.get("also_retrieved") or [], cwd, "also retrieved:")
    rest = {k: v for k, v in body.items()  # what else the answer says, less what holds nothing
            if k not in ("answer", "citations", "also_retrieved", "cycle_id", "model_text", "rewritten")
            and v not in ([], {})}
    lines += format_tree(rest)
    if body.get("cycle_id"):
        lines.append(_cycle_hint(str(body["cycle_id"])))
    return lines


def format_hits(hits: list[Any], cwd: Path | None = None) -> list[Fragments]:
    if not hits:
        return [[("class:dim", "no hits")]]
    rows = []
    for i, h in enumerate(hits, 1):
        h = h if isinstance(h, dict) else {"text": h}
        meta = h.get("metadata") or {}
        score = h.get("score")
        rows.append((str(i), f"{score:.3f}" if isinstance(score, int | float) else "-", str(h.get("level", "")),
                     location(meta, cwd) if meta.get("file_path") else "-",
                     str(meta.get("node_name") or ""), str(h.get("oid", "")), h.get("text", "")))
    widths = [max(len(r[c]) for r in [*rows, ("#", "score", "level", "location", "name", "oid", "")])
              for c in range(6)]
    header = "  ".join(n.ljust(w) for n, w in zip(("#", "score", "level", "location", "name", "oid"), widths,
                                                  strict=True))
    lines: list[Fragments] = [[("class:header", header.rstrip())]]
    for r in rows:
        lines.append([("", "  ".join(v.ljust(w) for v, w in zip(r[:6], widths, strict=True)).rstrip())])
        snippet = next((ln.strip() for ln in str(r[6]).splitlines() if ln.strip()), "")
        if snippet:
            lines.append([("class:dim", "    " + clip(snippet, SNIPPET_CHARS))])
    return lines


def format_stats(body: dict[str, Any]) -> list[Fragments]:
    lines: list[Fragments] = []
    counts = body.get("counts")
    if isinstance(counts, dict):
        lines.append([("class:header", "objects per prototype:" if counts else "objects per prototype: none yet")])
        width = max([len(str(k)) for k in counts] + [1])
        lines += [[("class:key", f"  {k!s:<{width}}"), ("", f"  {v}")] for k, v in sorted(counts.items())]
    if "vectors" in body:
        lines.append([("class:key", "vectors: "), ("", _vectors(body["vectors"]))])
    if "storage_bytes" in body:
        lines.append([("class:key", "storage: "), ("", human_bytes(body["storage_bytes"]))])
    lines += format_tree({k: v for k, v in body.items() if k not in ("counts", "vectors", "storage_bytes")})
    return lines


def _vectors(v: Any) -> str:
    if isinstance(v, dict) and "rows" in v:
        live = v.get("live", v["rows"])
        return (f"{live} live of {v['rows']} rows in {v.get('shards', '?')} shards"
                + (f", {v['dim']} dimensions" if v.get("dim") else ""))
    return _scalar(v)


def format_ingest(body: dict[str, Any]) -> list[Fragments]:
    keys = ("files", "chunks", "skipped", "unchanged", "removed")
    if not any(k in body for k in keys):
        return format_tree(body)
    summary = ", ".join(f"{body[k]} {k}" for k in keys if k in body)
    took = f" in {human_seconds(body['seconds'])}" if "seconds" in body else ""
    lines: list[Fragments] = [[("class:ok", "ingested: "), ("", summary + took)]]
    errors = body.get("errors") or []
    for err in errors[:LIST_LIMIT]:
        lines.append([("class:warning", "  ! "), ("", one_line(_error_text(err), 300))])
    if len(errors) > LIST_LIMIT:
        lines.append([("class:dim", f"  … {len(errors) - LIST_LIMIT} more errors")])
    refused = body.get("refused") or []  # symlinks leaving the root, special files: never read
    for item in refused[:LIST_LIMIT]:
        text = f"{item.get('file_path', '?')}: {item.get('reason', '')}" if isinstance(item, dict) else str(item)
        lines.append([("class:warning", "  refused "), ("", one_line(text, 300))])
    if len(refused) > LIST_LIMIT:
        lines.append([("class:dim", f"  … {len(refused) - LIST_LIMIT} more refused")])
    lines += format_tree({k: v for k, v in body.items() if k not in (*keys, "seconds", "errors", "refused")})
    return lines


def _error_text(err: Any) -> str:
    if isinstance(err, dict):
        where = err.get("file_path") or err.get("path") or ""
        return f"{where}: {err.get('error') or err.get('message') or _compact(err)}" if where else _compact(err)
    return str(err)


def format_inspect(body: dict[str, Any]) -> list[Fragments]:
    head = [("class:header", f"oid {body.get('oid', '?')}")]
    if body.get("prototype"):
        head.append(("", f"  prototype {body['prototype']}"))
    if body.get("name"):
        head.append(("", f"  name {body['name']}"))
    lines: list[Fragments] = [head]
    if body.get("parents"):
        lines.append([("class:key", "parents: "), ("", ", ".join(map(str, body["parents"])))])
    slots = body.get("slots") or {}
    if isinstance(slots, dict) and slots:
        width = min(24, max(len(str(k)) for k in slots))
        lines.append([("class:header", "slots:")])
        lines += [[("class:key", f"  {k!s:<{width}}"), ("", " = " + clip(str(v), 200))]
                  for k, v in list(slots.items())[:LIST_LIMIT]]
        if len(slots) > LIST_LIMIT:
            lines.append([("class:dim", f"  … {len(slots) - LIST_LIMIT} more slots")])
    methods = body.get("methods")
    if methods:
        names = [m.get("selector", m.get("name", "?")) if isinstance(m, dict) else str(m) for m in methods]
        lines.append([("class:key", "methods: "), ("", ", ".join(map(str, names)))])
    lines += format_tree({k: v for k, v in body.items()
                          if k not in ("oid", "prototype", "name", "parents", "slots", "methods")})
    return lines


EVENT_ROWS = 200
# Keys of a Table 3 event_data worth a glance in a timeline (the full event is in the audit log).
_EVENT_GLANCE = ("from", "to", "note", "action", "query", "selector", "error", "retrieved_chunk_ids")


def format_events(items: list[Any]) -> list[Fragments]:
    """A timeline of audit events (Table 3) or context fractals (``{summary, meta}``), one line each."""
    lines: list[Fragments] = []
    for item in items[:EVENT_ROWS]:
        item = item if isinstance(item, dict) else {"summary": item}
        meta = item.get("meta")
        ev: dict[str, Any] = meta if isinstance(meta, dict) else item
        stamp = str(ev.get("timestamp") or "")[11:23] or "-"
        desc = " ".join(str(ev[k]) for k in ("psm_state", "event_type", "active_persona", "persona") if ev.get(k))
        status = str(ev.get("status") or "")
        style = "class:error" if status == "FAILURE" else "class:ok" if status.startswith("SUCCESS") else "class:dim"
        summary = item.get("summary")
        if not summary and isinstance(item.get("event_data"), dict):
            data = item["event_data"]
            summary = " ".join(f"{k}={_scalar(data[k])}" for k in _EVENT_GLANCE if data.get(k) is not None)
        lines.append([("class:dim", f"{stamp} "), ("", desc + " "), (style, status),
                      ("class:dim", f"  {one_line(summary, 160)}" if summary else "")])
    if len(items) > EVENT_ROWS:
        lines.append([("class:dim", f"… {len(items) - EVENT_ROWS} more")])
    return lines


def format_trace(body: dict[str, Any]) -> list[Fragments]:
    key = next((k for k in ("events", "fractals") if isinstance(body.get(k), list)), None)
    if key is None:
        return format_tree(body)
    lines = format_tree({k: v for k, v in body.items() if k != key and v not in ([], None)})
    lines.append([("class:header", f"{len(body[key])} {key}:")])
    return lines + format_events(body[key])


def format_audit(body: dict[str, Any]) -> list[Fragments]:
    recent = body.get("recent")
    lines = format_tree({k: v for k, v in body.items() if k != "recent"})
    if isinstance(recent, list):
        lines.append([("class:header", f"recent events ({len(recent)}):")])
        lines += format_events(recent)
    return lines


def format_status(body: dict[str, Any]) -> list[Fragments]:
    """The kernel worker's own status, the broker's worker table, and the kernel's cycles and loops."""
    lines: list[Fragments] = []
    if body.get("identity"):
        lines.append([("class:header", f"{body.get('service', 'kernel')} "), ("", f"{body['identity']}"),
                      ("class:dim", f"  pid {body.get('pid', '?')}  up {human_seconds(body.get('uptime_s', 0))}  "
                                    f"served {body.get('served', '?')}  in flight {body.get('inflight', '?')}")])
    shown = {"service", "identity", "pid", "uptime_s", "served", "inflight", "commands", "version"}
    table = body.get("broker") if isinstance(body.get("broker"), dict) else None
    if table is not None and isinstance(table.get("services"), dict):
        shown.add("broker")
        lines += _format_services(table["services"])
        b = table.get("broker") or {}
        if b:
            lines.append([("class:key", "broker: "),
                          ("", f"up {human_seconds(b.get('uptime_s', 0))}, {b.get('pending', 0)} pending"
                               + (f", queued {_compact(b['queued'])}" if b.get("queued") else ""))])
    kernel = body.get("kernel")
    if isinstance(kernel, dict):
        shown.add("kernel")
        cycles = kernel.get("active_cycles") or []
        lines.append([("class:key", "active cycles: "), ("", str(len(cycles)) if cycles else "none")])
        for c in cycles if isinstance(cycles, list) else []:
            if isinstance(c, dict):
                lines.append([("", f"  {short_id(c.get('cycle_id', '?'))} {c.get('state', '?')} "
                                   f"{c.get('mission_type', '')} {c.get('persona', '')}"),
                              ("class:dim", f"  {human_seconds(c.get('age_s', 0))}")])
        lines += format_tree({k: v for k, v in kernel.items() if k != "active_cycles"})
    return lines + format_tree({k: v for k, v in body.items() if k not in shown})


def _format_services(services: dict[str, Any]) -> list[Fragments]:
    lines: list[Fragments] = [[("class:header", "services:")]]
    if not services:
        lines.append([("class:warning", "  none registered")])
    width = max([len(str(n)) for n in services] + [7])
    for name, workers in sorted(services.items()):
        workers = workers if isinstance(workers, list) else []
        alive = sum(1 for w in workers if isinstance(w, dict) and w.get("alive", True))
        inflight = sum(int(w.get("inflight", 0)) for w in workers if isinstance(w, dict))
        capacity = sum(int(w.get("capacity", 0)) for w in workers if isinstance(w, dict))
        served = sum(int(w.get("served", 0)) for w in workers if isinstance(w, dict))
        style = "" if alive else "class:warning"
        lines.append([("class:key", f"  {name!s:<{width}}"),
                      (style, f"  {alive}/{len(workers)} alive  in flight {inflight}/{capacity}  served {served}")])
    return lines


def format_send(body: dict[str, Any]) -> list[Fragments]:
    if "result" not in body:
        return format_tree(body)
    lines: list[Fragments] = [[("class:ok", "→ "), ("", clip(_repr(body["result"]), 2000))]]
    return lines + format_tree({k: v for k, v in body.items() if k != "result"})


def _repr(value: Any) -> str:
    return value if isinstance(value, str) else _compact(value)


def format_tree(value: Any, indent: int = 0) -> list[Fragments]:
    """Any reply body, as readable ``key: value`` lines (nested values indented)."""
    pad = " " * indent
    lines: list[Fragments] = []
    if isinstance(value, dict):
        for k, v in list(value.items())[:LIST_LIMIT]:
            if isinstance(v, dict | list) and v and len(_compact(v)) > 100:
                lines.append([("class:key", f"{pad}{k}:")])
                lines += format_tree(v, indent + 2)
            elif isinstance(v, str) and "\n" in v:
                lines.append([("class:key", f"{pad}{k}:")])
                lines += [[("", f"{pad}  {ln}")] for ln in v.splitlines()]
            else:
                lines.append([("class:key", f"{pad}{k}: "), ("", _scalar(v))])
        if len(value) > LIST_LIMIT:
            lines.append([("class:dim", f"{pad}… {len(value) - LIST_LIMIT} more")])
    elif isinstance(value, list):
        for item in value[:LIST_LIMIT]:
            if isinstance(item, dict | list) and len(_compact(item)) > 100:
                sub = format_tree(item, indent + 2)
                if sub:
                    (style, text), *rest = sub[0]  # the item's first line carries the bullet
                    sub[0] = [("class:dim", f"{pad}- "), (style, text.lstrip(" ")), *rest]
                lines += sub
            else:
                lines.append([("class:dim", f"{pad}- "), ("", _scalar(item))])
        if len(value) > LIST_LIMIT:
            lines.append([("class:dim", f"{pad}… {len(value) - LIST_LIMIT} more")])
    else:
        lines.append([("", pad + _scalar(value))])
    return lines


def _scalar(v: Any) -> str:
    if isinstance(v, str):
        return clip(v, 500)
    if isinstance(v, bytes):
        return f"<{len(v)} bytes>"
    return clip(_compact(v), 500)


REPLY_FORMATS: dict[str, Callable[[dict[str, Any]], list[Fragments]]] = {
    "stats": format_stats,
    "ingest": format_ingest,
    "inspect": format_inspect,
    "trace": format_trace,
    "audit": format_audit,
    "status": format_status,
    "send": format_send,
}


def format_reply(command: str, body: dict[str, Any], *, streamed: bool = False,
                 cwd: Path | None = None) -> list[Fragments]:
    if command == "ask" or ("answer" in body and "citations" in body):
        return format_answer(body, streamed, cwd)
    if command == "search" or isinstance(body.get("hits"), list):
        rest = {k: v for k, v in body.items() if k != "hits"}
        return format_hits(body.get("hits") or [], cwd) + format_tree(rest)
    fmt = REPLY_FORMATS.get(command, format_tree)
    cycle = body.get("cycle_id") if isinstance(body.get("cycle_id"), str) else None
    lines = fmt({k: v for k, v in body.items() if k != "cycle_id"} if cycle else body)
    if cycle:
        lines.append(_cycle_hint(cycle))
    return lines or [[("class:ok", "ok")]]


def _cycle_hint(cycle_id: str) -> Fragments:
    return [("class:dim", f"cycle {cycle_id} (see it with: trace {cycle_id})")]


def format_error(code: str, message: str, details: dict[str, Any] | None = None) -> list[Fragments]:
    lines: list[Fragments] = [[("class:error", f"error [{code}] "), ("", message)]]
    if details:
        lines += format_tree(details, 2)
    return lines


def json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return repr(value)
