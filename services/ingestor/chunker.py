"""Blueprint §2.2: recursive split-then-merge chunking of Python source on the ``ast`` tree.

Split: a unit (statement, or clause of a compound statement) whose lines fit ``max_tokens`` is
kept whole; one that does not is opened (``structure.open_unit``) and its children are chunked
the same way: classes into methods, functions into statement blocks, large ``if``/``try``/
``with``/``match`` blocks into clauses and statements, at any depth.
Merge: the children of an opened unit are grouped greedily, adjacent siblings while they fit.
A child that is itself opened breaks the run; its pieces never merge with its siblings.
Headers: a header (``def f(...):``, ``class C:``, decorators and comments above them) never stands
alone: it opens the first group of its body, and when even the first child is too big it is
carried down into that child's first piece. A split class's (or function's) header is given to the
later pieces as ``context_header`` in their metadata and at the top of their ``embed_text``.
Last resort: a leaf that cannot be opened (a huge literal or string, statements sharing lines) is
cut at line boundaries and flagged ``line_split``; a single line over the budget is cut into
token windows flagged ``partial_line``. Nothing is ever dropped.

The text of a chunk is the original source lines it claims (comments kept, line numbers exact);
``use_unparse=True`` swaps in ``ast.unparse`` output, as the blueprint's prose suggests.
"""

from __future__ import annotations

import ast
import contextlib
import gc
import os
import textwrap
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from batos import tokens
from services.ingestor import deps, parsecheck, summaries
from services.ingestor.model import LINE_SPLIT, PARTIAL_LINE, UNPARSED, Chunk, FileChunks, Summary
from services.ingestor.source import Source, Span, content_hash, normalize_newlines
from services.ingestor.structure import DEFS, Container, Unit, module_container, open_unit

CONTEXT_HEADER_TOKENS = 64  # a context header is a reminder, not a second chunk
TINY_DEF_LINES = 3  # definitions this short group with their neighbours (bench/retrieval.py chose it)


@dataclass
class _Piece:
    start: int
    end: int
    primary: ast.stmt | None
    chain: tuple[ast.stmt, ...]
    flags: tuple[str, ...] = ()
    span: Span | None = None


def _is_def(u: Unit) -> bool:
    return u.clause is None and len(u.stmts) == 1 and isinstance(u.stmts[0], DEFS)


def _methods(node: ast.stmt) -> int:
    return sum(isinstance(m, DEFS) for m in getattr(node, "body", ()))


def _def_count(c: Container) -> int:
    """Definitions a module container holds at its top level and one level inside its classes."""
    return sum(1 + (_methods(u.stmts[0]) if isinstance(u.stmts[0], ast.ClassDef) else 0) for u in c.children
               if _is_def(u))


class _Splitter:
    def __init__(self, src: Source, budget: int, one_def: bool = True):
        self.src = src
        self.budget = budget
        self.one_def = one_def  # each definition its own chunk (where it fits), never merged with neighbours
        self.pieces: list[_Piece] = []
        self.header_start: dict[int, int] = {}  # id(def/class) -> first line of its opened extent
        self.header_end: dict[int, int] = {}
        self.opened_classes: list[tuple[ast.ClassDef, tuple[ast.stmt, ...]]] = []
        self.opened_functions: set[int] = set()  # ids of split functions (their imports scope later pieces)

    def fits(self, start: int, end: int) -> bool:
        return self.src.cost(start, end) <= self.budget

    def run(self, module: Container) -> None:
        if self.fits(1, self.src.n) and not (self.one_def and _def_count(module) > 1):
            self.pieces.append(_Piece(1, self.src.n, None, ()))
        elif not module.children:
            self.line_split(1, self.src.n, None, ())
        else:
            self.split(module, None, (), None)

    def split(self, c: Container, prefix_start: int | None, chain: tuple[ast.stmt, ...],
              head_owner: ast.stmt | None) -> None:
        has_header = c.header_end >= c.start
        self._note_opened(c, chain, has_header)
        gstart = c.start if prefix_start is None else prefix_start
        head = head_owner if prefix_start is not None else (c.owner if has_header else None)
        pending = head is not None  # header lines wait for a body to open with them
        group: list[Unit] = []
        for u in c.children:
            alone = self.one_def and _is_def(u) and not self._tiny(u)
            if not alone and self.fits(gstart, u.end):
                group.append(u)
                continue
            if group:
                self.emit(gstart, group[-1].end, head if pending else _primary(group), chain)
                pending, group, gstart = False, [], u.start
                if not alone and self.fits(gstart, u.end):
                    group.append(u)
                    continue
            if alone and self.fits(gstart, u.end) and not self._open_anyway(u):
                self.emit(gstart, u.end, u.owner, chain)  # a pending header travels with it, named after the def
                pending, gstart = False, u.end + 1
                continue
            carry = gstart if gstart < u.start else None  # header lines that must open u's first piece
            sub = open_unit(self.src, u)
            if sub is None and carry is not None and self.fits(u.start, u.end):
                # a leaf that fits only without the header (a long docstring): the header goes alone, flagged,
                # and the leaf stays whole, free to merge with its next siblings
                self.line_split(carry, u.start - 1, head, chain)
                pending, group, gstart = False, [u], u.start
                continue
            if sub is None:
                self.line_split(gstart, u.end, head if carry is not None else u.owner, chain)
            else:
                sub_chain = chain if u.clause is not None else (*chain, u.owner)
                self.split(sub, carry, sub_chain, head if carry is not None else None)
            pending, gstart = False, u.end + 1
        if group:
            self.emit(gstart, group[-1].end, head if pending else _primary(group), chain)

    def _tiny(self, u: Unit) -> bool:
        """A definition of at most TINY_DEF_LINES lines (``class Atom(TokenList): token_type = 'atom'``, a
        one-line property) is grouped with its small neighbours, like a run of constants: alone it is a
        chunk that says almost nothing and crowds the results."""
        start, end = self.src.trim(u.start, u.end)
        return end - start + 1 <= TINY_DEF_LINES

    def _open_anyway(self, u: Unit) -> bool:
        """A class with several methods is opened even when it fits: one method per chunk."""
        return isinstance(u.owner, ast.ClassDef) and _methods(u.owner) > 1

    def _note_opened(self, c: Container, chain: tuple[ast.stmt, ...], has_header: bool) -> None:
        node = c.owner
        if node is None or not isinstance(node, DEFS) or not has_header:
            return
        self.header_start[id(node)] = c.start
        self.header_end[id(node)] = c.header_end
        if isinstance(node, ast.ClassDef):
            self.opened_classes.append((node, chain))
        else:
            self.opened_functions.add(id(node))

    def emit(self, start: int, end: int, primary: ast.stmt | None, chain: tuple[ast.stmt, ...]) -> None:
        self.pieces.append(_Piece(start, end, primary, chain))

    def line_split(self, start: int, end: int, primary: ast.stmt | None, chain: tuple[ast.stmt, ...]) -> None:
        for span in self.src.windows(start, end, self.budget):
            flags = (LINE_SPLIT, PARTIAL_LINE) if span.partial else (LINE_SPLIT,)
            self.pieces.append(_Piece(span.start, span.end, primary, chain, flags, span))


def _primary(group: list[Unit]) -> ast.stmt:
    """The node a group of sibling units is named after: its first definition, else its first statement."""
    for u in group:
        if u.clause is None:
            for s in u.stmts:
                if isinstance(s, DEFS):
                    return s
    return group[0].owner


def node_name(node: ast.stmt | None) -> str:
    if node is None:
        return ""
    if isinstance(node, DEFS):
        return node.name
    target: ast.expr | None = None
    if isinstance(node, ast.Assign) and node.targets:
        target = node.targets[0]
    elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
        target = node.target
    if isinstance(target, ast.Name):
        return target.id
    if isinstance(target, ast.Attribute):
        return target.attr
    if isinstance(node, ast.Import):
        return node.names[0].name
    if isinstance(node, ast.ImportFrom):
        return "." * node.level + (node.module or "")
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
        return "__doc__"  # a docstring (or a bare string) leads the chunk
    return ""


def _scope_names(chain: tuple[ast.stmt, ...], stop: ast.stmt | None) -> list[str]:
    names = []
    for n in chain:
        if n is stop:
            break
        if isinstance(n, DEFS):
            names.append(n.name)
    return names


class _Builder:
    """Turns pieces into Chunks: text, Table 2 metadata, context header, summary key, dependencies."""

    def __init__(self, src: Source, tree: ast.Module, file_path: str, splitter: _Splitter, file_key: str,
                 class_keys: dict[int, str]):
        self.src = src
        self.file_path = file_path
        self.sp = splitter
        self.finder = deps.DependencyFinder(tree)
        self.file_key = file_key
        self.class_keys = class_keys
        self.basename = os.path.basename(file_path)
        # the embedded header names the file by its last two components (``broker/broker.py``): the
        # package says what the file is about; an absolute prefix (/home/...) would only add noise
        self.short_path = "/".join(file_path.replace(os.sep, "/").split("/")[-2:])
        self._headers: dict[int, str] = {}
        self._scope_bindings: dict[int, deps.Bindings] = {}
        self._contexts: dict[tuple[int, ...], str] = {}

    def header_text(self, node: ast.stmt) -> str:
        got = self._headers.get(id(node))
        if got is None:
            lines = self.src.lines[node.lineno - 1:self.sp.header_end[id(node)]]
            if isinstance(node, ast.ClassDef):
                doc = summaries.first_doc_line(node)
                if doc:
                    indent = " " * (node.col_offset + 4)
                    lines = [*lines, f'{indent}"""{doc}"""\n']
            got = self._headers[id(node)] = "".join(lines)
        return got

    def context_header(self, outer: Sequence[ast.stmt]) -> str:
        key = tuple(id(n) for n in outer)
        got = self._contexts.get(key)
        if got is None:
            text = textwrap.dedent("".join(self.header_text(n) for n in outer))
            got = self._contexts[key] = tokens.truncate_to(text, CONTEXT_HEADER_TOKENS)
        return got

    def scope_bindings(self, node: ast.stmt) -> deps.Bindings:
        got = self._scope_bindings.get(id(node))
        if got is None:
            text = self.src.text_of(node.lineno, node.end_lineno or node.lineno)
            got = self._scope_bindings[id(node)] = deps.text_imports(text)[1]
        return got

    def chunk(self, p: _Piece) -> Chunk | None:
        span = p.span or self.src.span(p.start, p.end)
        if span is None:
            return None
        parents = _scope_names(p.chain, p.primary)
        outer = [n for n in p.chain if isinstance(n, DEFS) and self.sp.header_start.get(id(n), span.start) < span.start]
        context = self.context_header(outer) if outer else ""
        bindings = [self.scope_bindings(n) for n in p.chain if id(n) in self.sp.opened_functions]
        key = self.file_key
        for n in reversed(p.chain):
            if id(n) in self.class_keys:
                key = self.class_keys[id(n)]
                break
        name = node_name(p.primary) if p.primary is not None else os.path.splitext(self.basename)[0]
        metadata: dict[str, Any] = {
            "file_path": self.file_path,
            "start_line": span.start,
            "end_line": span.end,
            "node_type": type(p.primary).__name__ if p.primary is not None else "Module",
            "node_name": name,
            "parent_nodes": parents,
            "dependencies": self.finder.for_text(span.text, bindings),
            "content_hash": content_hash(self.file_path, span.text),
            "token_count": span.tokens,
            "flags": list(p.flags),
        }
        if context:
            metadata["context_header"] = context
        scope = ".".join([*parents, name]) if name else ".".join(parents)
        label = f"# {self.short_path}" + (f" :: {scope}" if scope else "")
        embed = "\n".join(x for x in (label, context.rstrip("\n"), span.text) if x)
        return Chunk(span.text, embed, metadata, key)


def chunk_python(text: str, file_path: str, max_tokens: int, *, file_hash: str = "", use_unparse: bool = False,
                 tree: ast.Module | None = None) -> FileChunks:
    """Chunk one Python source text; raises SyntaxError (or ValueError for NUL bytes) if it does not parse."""
    if max_tokens < 1:
        raise ValueError("max_tokens must be >= 1")
    with _gc_paused():
        return _chunk_python(text, file_path, max_tokens, file_hash, use_unparse, tree)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Hold the cyclic GC while a file is parsed and chunked: the AST is acyclic and freed by refcount,
    and collections triggered by its thousands of young nodes cost ~15% of the chunker's time."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _chunk_python(text: str, file_path: str, max_tokens: int, file_hash: str, use_unparse: bool,
                  tree: ast.Module | None) -> FileChunks:
    text = normalize_newlines(text)  # line numbers as Python counts them; chunk texts use "\n"
    if tree is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the ingested code's SyntaxWarnings are its own business
            tree = ast.parse(text, filename=file_path)
    src = Source(text)
    splitter = _Splitter(src, max_tokens)
    splitter.run(module_container(src, tree))
    file_summary = summaries.file_summary(src, tree, file_path, max_tokens)
    class_sums = summaries.class_summaries(src, splitter.opened_classes, file_path, max_tokens)
    class_keys = {id(node): s.key for (node, _), s in zip(splitter.opened_classes, class_sums, strict=True)}
    builder = _Builder(src, tree, file_path, splitter, file_summary.key, class_keys)
    chunks = [c for p in splitter.pieces if (c := builder.chunk(p)) is not None]
    if use_unparse:
        chunks = [_unparsed(c, max_tokens) for c in chunks]
    file_summary.metadata["dependencies"] = sorted({m for ms in builder.finder.bindings.values() for m in ms})
    for (node, _), summary in zip(splitter.opened_classes, class_sums, strict=True):
        summary.metadata["dependencies"] = builder.finder.for_text(src.text_of(node.lineno, node.end_lineno or 0))
    out = FileChunks(file_path, file_hash, "python", src.n, chunks, [file_summary, *class_sums])
    return out


def _unparsed(chunk: Chunk, max_tokens: int) -> Chunk:
    """The chunk as ``ast.unparse`` writes it, when it parses on its own and still fits; else unchanged."""
    if chunk.metadata["flags"]:
        return chunk
    try:
        text = ast.unparse(ast.parse(parsecheck.normalize(chunk.text))) + "\n"
    except SyntaxError:
        return chunk
    n = tokens.count(text)
    if n > max_tokens:
        return chunk
    meta = {**chunk.metadata, "token_count": n, "flags": [UNPARSED],
            "content_hash": content_hash(chunk.metadata["file_path"], text)}
    embed = chunk.embed_text[: len(chunk.embed_text) - len(chunk.text)] + text
    return Chunk(text, embed, meta, chunk.summary_key)


__all__ = ["Chunk", "FileChunks", "Summary", "chunk_python", "node_name"]
