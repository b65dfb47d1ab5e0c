"""ContextualSummary texts: a deterministic outline per file and per split class (no LLM).

A file outline is the module docstring's first line, its imports, then each top-level definition's
signature with the first line of its docstring (a class also lists its methods). A class outline
is the class signature and docstring line, then each member's signature and docstring line.
Outlines are cut to the chunk budget so that a summary never crowds a prompt more than a chunk does.
"""

from __future__ import annotations

import ast
import os

from batos import tokens
from services.ingestor.model import Summary
from services.ingestor.source import Source, content_hash
from services.ingestor.structure import DEFS, Def

SIGNATURE_CHARS = 200
MAX_CHARS_PER_TOKEN = 8  # an outline is prose and signatures: ~4 characters a token, rarely more than 8
LISTED_NAMES = 24  # imports, methods, module-level names shown per line before "..."


def first_doc_line(node: Def | ast.Module) -> str:
    doc = ast.get_docstring(node, clean=False)
    if not doc:
        return ""
    for line in doc.splitlines():
        if line.strip():
            return line.strip()
    return ""


def signature(src: Source, node: Def) -> str:
    """The header of a def/class as one line: ``def name(args) -> ret:``."""
    first_body = node.body[0].lineno
    if first_body == node.lineno:  # ``def f(): return 1``: cut where the body starts (offsets are bytes)
        raw = src.line(node.lineno).encode("utf-8")
        text = raw[node.col_offset:node.body[0].col_offset].decode("utf-8", "ignore")
    else:
        lines = src.lines[node.lineno - 1:first_body - 1]
        text = " ".join(line.strip() for line in lines if not line.lstrip().startswith("#"))
    text = " ".join(text.split())
    return text if len(text) <= SIGNATURE_CHARS else text[:SIGNATURE_CHARS - 3] + "..."


def _listing(label: str, names: list[str]) -> str:
    shown = ", ".join(names[:LISTED_NAMES])
    return f"{label}: {shown}" + (", ..." if len(names) > LISTED_NAMES else "")


def _entry(src: Source, node: Def, indent: str = "") -> str:
    doc = first_doc_line(node)
    return f"{indent}{signature(src, node)}" + (f"  # {doc}" if doc else "")


def _assigned_names(node: ast.stmt) -> list[str]:
    targets: list[ast.expr] = []
    if isinstance(node, ast.Assign):
        targets = node.targets
    elif isinstance(node, ast.AnnAssign):
        targets = [node.target]
    return [t.id for t in targets if isinstance(t, ast.Name)]


def _summary(key: str, kind: str, text: str, file_path: str, start: int, end: int, node_type: str, name: str,
             parents: list[str], budget: int) -> Summary:
    text, n = tokens.fit(text[: budget * MAX_CHARS_PER_TOKEN], budget)  # the cap spares encoding a huge outline
    meta = {"file_path": file_path, "start_line": start, "end_line": end, "node_type": node_type, "node_name": name,
            "parent_nodes": parents, "dependencies": [], "content_hash": content_hash(file_path, text),
            "token_count": n}
    return Summary(key, kind, text, meta)


def file_summary(src: Source, tree: ast.Module, file_path: str, budget: int) -> Summary:
    name = os.path.basename(file_path)
    doc = first_doc_line(tree)
    lines = [f"Module {name} ({src.n} lines)" + (f": {doc}" if doc else "")]
    imports: list[str] = []
    names: list[str] = []
    defs: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            imports.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            imports.append("." * node.level + (node.module or ""))
        elif isinstance(node, DEFS):
            defs.append(_entry(src, node))
            if isinstance(node, ast.ClassDef):
                methods = [m.name for m in node.body if isinstance(m, DEFS)]
                if methods:
                    defs.append("    " + _listing("members", methods))
        else:
            names.extend(_assigned_names(node))
    if imports:
        lines.append(_listing("Imports", list(dict.fromkeys(imports))))
    if names:
        lines.append(_listing("Names", names))
    lines.extend(defs)
    return _summary(file_path, "file", "\n".join(lines), file_path, 1, src.n, "Module",
                    os.path.splitext(name)[0], [], budget)


def class_summaries(src: Source, opened: list[tuple[ast.ClassDef, tuple[ast.stmt, ...]]], file_path: str,
                    budget: int) -> list[Summary]:
    """One outline per class the chunker split, keyed ``file_path::Outer.Class`` (unique per file)."""
    out: list[Summary] = []
    seen: set[str] = set()
    for node, chain in opened:
        scope = [n.name for n in chain if isinstance(n, DEFS)]
        qualname = ".".join(scope) or node.name
        key = f"{file_path}::{qualname}"
        n = 2
        while key in seen:  # the same class defined twice (e.g. in both branches of an ``if``)
            key = f"{file_path}::{qualname}#{n}"
            n += 1
        seen.add(key)
        lines = [_entry(src, node) + f"  (in {os.path.basename(file_path)}, lines {node.lineno}-{node.end_lineno})"]
        lines.extend(_entry(src, m, "    ") for m in node.body if isinstance(m, DEFS))
        attrs = [a for m in node.body for a in _assigned_names(m)]
        if attrs:
            lines.insert(1, "    " + _listing("attributes", attrs))
        parents = scope[:-1]
        out.append(_summary(key, "class", "\n".join(lines), file_path, node.lineno, node.end_lineno or node.lineno,
                            "ClassDef", node.name, parents, budget))
    return out
