"""The ``ast`` tree seen as nested runs of whole lines: the places where a chunk may begin or end.

A *unit* is a statement (or several that share lines, ``a = 1; b = 2``) or one clause of a compound
statement (``elif``/``else``/``except``/``finally``/``case``). Its extent starts at the comments and
decorators directly above it and runs to the line before the next unit's extent, so the units of a
block tile it exactly: every line belongs to exactly one unit.

A unit that is too big is opened as a *container*: header lines (``def f(...):``, ``class C:``,
``if x:``, ``match v:``) followed by child units (its body statements, or its clauses). Only the
units on the path the splitter descends are opened, so the cost stays proportional to the file.
"""

from __future__ import annotations

import ast
from collections.abc import Sequence
from dataclasses import dataclass

from services.ingestor.source import Source

DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
Def = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef  # what DEFS matches
SINGLE_BODY = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.With, ast.AsyncWith)


@dataclass(eq=False)
class Unit:
    start: int
    end: int
    stmts: list[ast.stmt]  # the statements in this unit; for a clause, the clause's body
    owner: ast.stmt  # the statement itself, or the compound statement a clause belongs to
    clause: Clause | None = None


@dataclass(eq=False)
class Clause:
    keyword: str  # if, elif, else, for, while, try, except, finally, case, with, def, class
    keyword_line: int
    floor: int  # the header's last line is at least this (it holds the test / signature / pattern)
    body: list[ast.stmt]


@dataclass(eq=False)
class Container:
    """An opened unit: lines ``start..header_end`` are its header (possibly none), then ``children``."""

    start: int
    end: int
    header_end: int
    children: list[Unit]
    owner: ast.stmt | None  # None for the module
    is_clause: bool = False


def raw_start(node: ast.stmt) -> int:
    decorators = getattr(node, "decorator_list", None)
    return min(node.lineno, decorators[0].lineno) if decorators else node.lineno


def max_end(nodes: Sequence[ast.AST | None]) -> int:
    """The last line any of ``nodes`` reaches (nodes without positions are looked through)."""
    best = 0
    for n in nodes:
        if n is None:
            continue
        end = getattr(n, "end_lineno", None)
        if end is not None:
            best = max(best, end)
        else:
            best = max(best, max_end(list(ast.iter_child_nodes(n))))
    return best


def body_units(src: Source, stmts: list[ast.stmt], lo: int, hi: int) -> list[Unit]:
    """Units tiling lines ``lo..hi`` for the statements ``stmts`` (in order, all within that range)."""
    lines, blank = src.lines, src.blank
    units: list[Unit] = []
    prev: Unit | None = None
    prev_end = 0
    for s in stmts:
        decorators = s.decorator_list if isinstance(s, DEFS) else None
        first = decorators[0].lineno if decorators else s.lineno
        end = s.end_lineno or s.lineno
        if prev is not None and first <= prev_end:  # shares a line with the previous statement
            prev.stmts.append(s)
            prev_end = max(prev_end, end)
            continue
        if prev is None:
            k = lo
        else:
            k = first
            while k - 1 > prev_end and not blank[k - 1] and lines[k - 2].lstrip().startswith("#"):
                k -= 1  # comments directly above stay with it
            prev.end = k - 1
        prev = Unit(k, hi, [s], s)
        units.append(prev)
        prev_end = end
    return units


def _keyword_after(src: Source, line: int) -> int:
    """The first line after ``line`` that is neither blank nor a comment (an ``else:``/``finally:``)."""
    i = line + 1
    while i <= src.n and (src.blank[i] or src.is_comment(i)):
        i += 1
    return i


def clauses(src: Source, node: ast.stmt) -> list[Clause]:
    """The clauses of a compound statement, in source order."""
    if isinstance(node, ast.If):
        out = [Clause("if", node.lineno, max_end([node.test]), node.body)]
        orelse = node.orelse
        while orelse:
            first = orelse[0]
            if len(orelse) == 1 and isinstance(first, ast.If) and src.line(first.lineno).lstrip().startswith("elif"):
                out.append(Clause("elif", first.lineno, max_end([first.test]), first.body))
                orelse = first.orelse
            else:
                kw = _keyword_after(src, out[-1].body[-1].end_lineno or 0)
                out.append(Clause("else", kw, kw, orelse))
                break
        return out
    if isinstance(node, (ast.For, ast.AsyncFor, ast.While)):
        head = [node.test] if isinstance(node, ast.While) else [node.target, node.iter]
        out = [Clause("while" if isinstance(node, ast.While) else "for", node.lineno, max_end(head), node.body)]
        if node.orelse:
            kw = _keyword_after(src, node.body[-1].end_lineno or 0)
            out.append(Clause("else", kw, kw, node.orelse))
        return out
    if isinstance(node, (ast.Try, ast.TryStar)):
        out = [Clause("try", node.lineno, node.lineno, node.body)]
        for h in node.handlers:
            out.append(Clause("except", h.lineno, max(h.lineno, max_end([h.type])), h.body))
        for keyword, body in (("else", node.orelse), ("finally", node.finalbody)):
            if body:
                kw = _keyword_after(src, out[-1].body[-1].end_lineno or 0)
                out.append(Clause(keyword, kw, kw, body))
        return out
    if isinstance(node, ast.Match):
        return [Clause("case", c.pattern.lineno, max_end([c.pattern, c.guard]), c.body) for c in node.cases]
    if isinstance(node, (ast.With, ast.AsyncWith)):
        return [Clause("with", node.lineno, max_end(list(node.items)), node.body)]
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        a = node.args
        parts: list[ast.AST | None] = [*a.posonlyargs, *a.args, a.vararg, *a.kwonlyargs, a.kwarg, *a.defaults,
                                       *a.kw_defaults, node.returns, *node.decorator_list]
        return [Clause("def", node.lineno, max(node.lineno, max_end(parts)), node.body)]
    if isinstance(node, ast.ClassDef):
        parts = [*node.bases, *node.keywords, *node.decorator_list]
        return [Clause("class", node.lineno, max(node.lineno, max_end(parts)), node.body)]
    return []


def _header_end(src: Source, clause: Clause, first_body_line: int) -> int | None:
    """The header's last line, or None when the body starts on the header line (``if x: y``)."""
    if first_body_line <= clause.floor:
        return None
    i = first_body_line - 1
    while i > clause.floor and (src.blank[i] or src.is_comment(i)):
        i -= 1
    return i


def _clause_container(src: Source, clause: Clause, owner: ast.stmt, start: int, end: int) -> Container | None:
    header_end = _header_end(src, clause, raw_start(clause.body[0]))
    if header_end is None:
        return None
    return Container(start, end, header_end, body_units(src, clause.body, header_end + 1, end), owner, is_clause=True)


def open_unit(src: Source, unit: Unit) -> Container | None:
    """The unit as a container, or None when it cannot be split at line boundaries (a leaf)."""
    if unit.clause is not None:
        return _clause_container(src, unit.clause, unit.owner, unit.start, unit.end)
    if len(unit.stmts) != 1:
        return None  # statements sharing lines
    node = unit.stmts[0]
    cls = clauses(src, node)
    if not cls:
        return None
    if isinstance(node, ast.Match):
        first_case = cls[0].keyword_line
        header_end = _header_end(src, Clause("match", node.lineno, max_end([node.subject]), []), first_case)
        if header_end is None:
            return None
        return Container(unit.start, unit.end, header_end, _clause_units(src, node, cls, header_end + 1, unit.end),
                         node)
    if len(cls) == 1:
        return _clause_container(src, cls[0], node, unit.start, unit.end)
    return Container(unit.start, unit.end, unit.start - 1, _clause_units(src, node, cls, unit.start, unit.end), node)


def _clause_units(src: Source, node: ast.stmt, cls: list[Clause], lo: int, hi: int) -> list[Unit]:
    units = []
    start = lo
    for i, c in enumerate(cls):
        end = hi if i + 1 == len(cls) else (c.body[-1].end_lineno or c.body[-1].lineno)
        units.append(Unit(start, end, c.body, node, clause=c))
        start = end + 1
    return units


def module_container(src: Source, tree: ast.Module) -> Container:
    units = body_units(src, tree.body, 1, src.n) if tree.body else []
    return Container(1, src.n, 0, units, None)
