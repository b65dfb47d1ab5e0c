"""AST policy for generated and hand-written methods (`_doesNotUnderstand_` and `define`).

The policy is a filter, not a boundary: it turns away the obvious escapes early, with a reason
BRICK can act on, and keeps stored methods readable. Whatever passes still runs only inside the
process sandbox (sandbox.py), which must hold even when this check is fooled. See SANDBOX.md.

Public API:
    validate_method_source(source, selector) -> ValidatedMethod   (raises PolicyViolation)
    extract_method_source(llm_text, selector) -> str              (raises PolicyViolation)
"""

from __future__ import annotations

import ast
import importlib
import keyword
import re
import string
import textwrap
import types
from dataclasses import dataclass
from typing import NoReturn

# Pure, side-effect-free stdlib modules a method may import (inside its body).
ALLOWED_MODULES: frozenset[str] = frozenset(
    {
        "math", "statistics", "itertools", "functools", "collections", "re", "json", "datetime",
        "string", "textwrap", "decimal", "fractions", "random", "operator", "heapq", "bisect",
    }
)  # fmt: skip

# Builtins that execute code, reach files or the terminal, or expose namespaces.
FORBIDDEN_NAMES: frozenset[str] = frozenset(
    {
        "eval", "exec", "compile", "open", "__import__", "globals", "locals", "vars", "breakpoint",
        "input", "help", "exit", "quit", "memoryview", "copyright", "credits", "license",
        # `type(name, bases, ns)` builds classes from strings (dunders included: __instancecheck__,
        # __match_args__), and any class reached through `type(x)` is a metaclass away from it; `super`
        # walks to the parents' methods. Methods use isinstance() instead.
        "type", "super",
    }
)  # fmt: skip

# Builtins that look attributes up by a string: only `f(obj, "public_literal", ...)` is allowed,
# because a computed name can be rebuilt into "__class__" at run time.
ATTR_BUILTINS: frozenset[str] = frozenset({"getattr", "setattr", "delattr", "hasattr"})

# Attribute names (without underscores) that walk frames, code or tracebacks, or turn strings
# into attribute lookups (operator.attrgetter("__class__"), string.Formatter().get_field).
FORBIDDEN_ATTRIBUTES: frozenset[str] = frozenset(
    {
        "f_globals", "f_locals", "f_builtins", "f_back", "f_code", "f_trace", "f_lasti",
        "gi_frame", "gi_code", "gi_yieldfrom", "cr_frame", "cr_code", "cr_await", "ag_frame", "ag_code",
        "tb_frame", "tb_next", "co_code", "co_consts", "co_names", "func_globals", "func_code", "mro",
        "attrgetter", "methodcaller", "Formatter", "format_field", "get_field", "vformat",
    }
)  # fmt: skip

# Module names that must never be reached as an attribute of an allowed module (statistics.sys,
# json.codecs.open ...). Completed at import time from what this Python's allowed modules expose.
_ALWAYS_FORBIDDEN_MODULE_ATTRS = frozenset(
    {
        "sys", "os", "posix", "nt", "io", "builtins", "importlib", "subprocess", "socket", "ctypes", "gc",
        "inspect", "types", "codecs", "pickle", "marshal", "shutil", "pathlib", "signal", "threading",
        "multiprocessing", "copyreg", "enum", "numbers", "weakref", "abc_impl", "linecache", "tokenize",
    }
)  # fmt: skip

MAX_SOURCE_CHARS = 20_000  # a method, not a program; also bounds parser recursion
_DUNDER_TEXT = re.compile(r"^__\w+__$")  # a string that names a dunder is a dunder access waiting to happen
# str.format / format_map look attributes up by the names written in the format string: allowed only as
# the direct callee of a call on a string literal, whose fields are then checked like attribute names.
FORMAT_METHODS = frozenset({"format", "format_map"})
# Builtin classes that match `case int(x)` against the subject itself. Any other class with positional
# sub-patterns reads the attributes its __match_args__ names (strings chosen at run time).
SELF_MATCHING = frozenset({"bool", "bytearray", "bytes", "dict", "float", "frozenset", "int", "list", "set",
                           "str", "tuple"})


class PolicyViolation(ValueError):
    """The method source is not acceptable. `reason` is a precise, human-readable message."""

    def __init__(self, reason: str, lineno: int | None = None) -> None:
        self.reason = reason
        self.lineno = lineno
        super().__init__(f"line {lineno}: {reason}" if lineno else reason)


@dataclass(frozen=True)
class ValidatedMethod:
    selector: str
    source: str  # normalised (dedented, stripped) text to persist and to run
    params: tuple[str, ...]  # parameter names after `self`, in order (incl. *args/**kwargs names)
    imports: tuple[str, ...]  # top-level module names imported inside the body
    doc: str | None


def _allowed_modules() -> list[types.ModuleType]:
    """The allow-listed modules themselves (all stdlib; one that fails to import exposes nothing)."""
    mods = []
    for mod_name in ALLOWED_MODULES:
        try:
            mods.append(importlib.import_module(mod_name))
        except ImportError:  # pragma: no cover - all are stdlib
            continue
    return mods


def _reachable_foreign_modules() -> frozenset[str]:
    """Attribute names under which allowed modules expose modules outside the allow-list."""
    return frozenset(
        attr for mod in _allowed_modules() for attr, value in vars(mod).items()
        if isinstance(value, types.ModuleType) and value.__name__.split(".")[0] not in ALLOWED_MODULES
    )


def _reachable_metaclasses() -> frozenset[str]:
    """Names under which allowed modules (and their allowed submodules) expose metaclasses (collections.abc's
    ABCMeta): a metaclass builds classes from strings, as `type` does."""
    names: set[str] = set()
    for mod in _allowed_modules():
        for sub in [mod, *(v for v in vars(mod).values() if isinstance(v, types.ModuleType))]:
            names.update(k for k, v in vars(sub).items() if isinstance(v, type) and issubclass(v, type))
    return frozenset(names)


FORBIDDEN_MODULE_ATTRS: frozenset[str] = (_ALWAYS_FORBIDDEN_MODULE_ATTRS | _reachable_foreign_modules()
                                          | _reachable_metaclasses())


def check_selector(selector: str) -> None:
    if not isinstance(selector, str) or not selector.isidentifier() or keyword.iskeyword(selector):
        raise PolicyViolation(f"selector {selector!r} is not a valid Python identifier")
    if selector.startswith("_"):
        # `_`-names are private in the object model (never reach _doesNotUnderstand_) and would
        # let a method shadow persistence or dunder machinery.
        raise PolicyViolation(f"selector {selector!r} starts with '_': private names cannot be methods")


def validate_method_source(source: str, selector: str) -> ValidatedMethod:
    """Check that `source` is exactly one `def <selector>(self, ...)` that passes the policy."""
    check_selector(selector)
    if not isinstance(source, str) or not source.strip():
        raise PolicyViolation("method source is empty")
    if len(source) > MAX_SOURCE_CHARS:
        raise PolicyViolation(f"method source is {len(source)} characters; the limit is {MAX_SOURCE_CHARS}")
    text = textwrap.dedent(source).strip("\n") + "\n"
    try:
        tree = ast.parse(text, filename=f"<method {selector}>")
    except (SyntaxError, ValueError) as exc:  # ValueError: null bytes
        lineno = getattr(exc, "lineno", None)
        raise PolicyViolation(f"source does not parse: {getattr(exc, 'msg', exc)}", lineno) from None
    func = _the_single_def(tree, selector)
    checker = _PolicyChecker(func)
    checker.visit(func)
    params = _param_names(func.args)
    return ValidatedMethod(
        selector=selector,
        source=text,
        params=params,
        imports=tuple(sorted(checker.imports)),
        doc=ast.get_docstring(func),
    )


def _the_single_def(tree: ast.Module, selector: str) -> ast.FunctionDef:
    if len(tree.body) != 1:
        kinds = ", ".join(type(node).__name__ for node in tree.body)
        raise PolicyViolation(
            f"source must contain exactly one top-level statement, `def {selector}(self, ...)`; found {kinds}"
        )
    node = tree.body[0]
    if isinstance(node, ast.AsyncFunctionDef):
        raise PolicyViolation(f"`async def {node.name}` is not allowed; write a plain `def`", node.lineno)
    if not isinstance(node, ast.FunctionDef):
        raise PolicyViolation(
            f"top-level statement is {type(node).__name__}, expected `def {selector}(self, ...)`", node.lineno
        )
    if node.name != selector:
        raise PolicyViolation(f"function is named {node.name!r}, expected {selector!r}", node.lineno)
    if node.decorator_list:
        raise PolicyViolation("decorators are not allowed on methods", node.lineno)
    positional = [*node.args.posonlyargs, *node.args.args]
    if not positional or positional[0].arg != "self":
        raise PolicyViolation(f"the first parameter of {selector} must be `self`", node.lineno)
    for child in _own_scope(node):
        if isinstance(child, ast.Yield | ast.YieldFrom):
            raise PolicyViolation("a method must return a value; `yield` makes it a generator", child.lineno)
    return node


def _own_scope(func: ast.FunctionDef) -> list[ast.AST]:
    """Nodes of `func`'s body that are not inside a nested def, lambda or class."""
    found: list[ast.AST] = []
    stack: list[ast.AST] = list(func.body)
    while stack:
        node = stack.pop()
        found.append(node)
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef):
            stack.extend(ast.iter_child_nodes(node))
    return found


def _param_names(args: ast.arguments) -> tuple[str, ...]:
    names = [a.arg for a in (*args.posonlyargs, *args.args)][1:]
    if args.vararg:
        names.append("*" + args.vararg.arg)
    names.extend(a.arg for a in args.kwonlyargs)
    if args.kwarg:
        names.append("**" + args.kwarg.arg)
    return tuple(names)


def _is_private(name: str) -> bool:
    return name.startswith("_")


class _PolicyChecker(ast.NodeVisitor):
    """Walks the whole def (defaults and annotations included) and raises on the first violation."""

    def __init__(self, func: ast.FunctionDef) -> None:
        self.func = func
        self.imports: set[str] = set()
        self._direct_calls: set[int] = set()  # ids of Name nodes used as the callee of a Call
        self._literal_formats: set[int] = set()  # ids of `"literal".format` Attribute nodes that are called

    def fail(self, node: ast.AST, reason: str) -> NoReturn:
        raise PolicyViolation(reason, getattr(node, "lineno", None))

    # -- imports ---------------------------------------------------------------------------------
    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._check_module(node, alias.name)
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            self.fail(node, "relative imports are not allowed")
        self._check_module(node, node.module or "")
        for alias in node.names:
            if alias.name == "*":
                self.fail(node, f"`from {node.module} import *` is not allowed")
            if _is_private(alias.name) or alias.name in FORBIDDEN_ATTRIBUTES | FORBIDDEN_MODULE_ATTRS:
                self.fail(node, f"importing {alias.name!r} from {node.module} is not allowed")
        self.generic_visit(node)

    def _check_module(self, node: ast.AST, dotted: str) -> None:
        root = dotted.split(".")[0]
        if root not in ALLOWED_MODULES:
            allowed = ", ".join(sorted(ALLOWED_MODULES))
            self.fail(node, f"import of {dotted!r} is not allowed (allowed: {allowed})")
        if any(_is_private(part) for part in dotted.split(".")):
            self.fail(node, f"import of private module {dotted!r} is not allowed")
        self.imports.add(root)

    # -- names and attributes ---------------------------------------------------------------------
    def visit_Name(self, node: ast.Name) -> None:
        if node.id.startswith("__"):
            self.fail(node, f"dunder name `{node.id}` is not allowed")
        if node.id in FORBIDDEN_NAMES:
            self.fail(node, f"`{node.id}` is not allowed in methods")
        if node.id in ATTR_BUILTINS and id(node) not in self._direct_calls:
            self.fail(node, f"`{node.id}` may only be called directly with a literal attribute name")

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self.generic_visit(node)  # inner first: `a.__class__.__base__` is reported at `.__class__`
        self._check_attr_name(node, node.attr)
        if node.attr in FORMAT_METHODS and id(node) not in self._literal_formats:
            self.fail(node, f"`.{node.attr}` may only be called directly on a string literal "
                            "(format fields read attributes by name)")

    def _check_attr_name(self, node: ast.AST, attr: str) -> None:
        if attr.startswith("__") and attr.endswith("__"):
            self.fail(node, f"dunder attribute access `.{attr}` is not allowed")
        if _is_private(attr):
            self.fail(node, f"private attribute access `.{attr}` is not allowed")
        if attr in FORBIDDEN_ATTRIBUTES:
            self.fail(node, f"attribute `.{attr}` is not allowed (introspection or string-driven lookup)")
        if attr in FORBIDDEN_MODULE_ATTRS:
            self.fail(node, f"attribute `.{attr}` is not allowed (reaches module {attr!r})")

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Name) and func.id in ATTR_BUILTINS:
            self._direct_calls.add(id(func))
            name_arg = node.args[1] if len(node.args) > 1 else None
            if not (isinstance(name_arg, ast.Constant) and isinstance(name_arg.value, str)):
                self.fail(
                    node, f"`{func.id}` needs a literal attribute name (a computed name can be rebuilt into a dunder)"
                )
            self._check_attr_name(node, name_arg.value)
            if name_arg.value in FORMAT_METHODS:
                self.fail(node, f"`{func.id}(..., {name_arg.value!r})` reaches a format method indirectly")
            if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
                self.fail(node, f"`{func.id}` must be called with plain positional arguments")
        if isinstance(func, ast.Attribute) and func.attr in {"format", "format_map"}:
            receiver = func.value
            if not (isinstance(receiver, ast.Constant) and isinstance(receiver.value, str)):
                self.fail(node, f"`.{func.attr}()` needs a literal format string (format fields can read attributes)")
            self._literal_formats.add(id(func))
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        if not isinstance(node.value, str):
            return
        if _DUNDER_TEXT.match(node.value.strip()):
            self.fail(node, f"the string {node.value!r} names a dunder")
        problem = _format_field_problem(node.value)
        if problem:
            self.fail(node, f"format string field {problem}")

    def visit_MatchClass(self, node: ast.MatchClass) -> None:
        # `case C(__class__=x)` is an attribute read spelled as a keyword pattern; `case C(x)` reads the
        # attribute C.__match_args__ names, chosen at run time (and C's metaclass may match anything).
        for attr in node.kwd_attrs:
            self._check_attr_name(node, attr)
        if node.patterns and not (isinstance(node.cls, ast.Name) and node.cls.id in SELF_MATCHING):
            self.fail(node, f"positional class patterns are allowed only for {', '.join(sorted(SELF_MATCHING))}; "
                            "use keyword patterns (case C(name=x))")
        self.generic_visit(node)

    # -- statements ---------------------------------------------------------------------------------
    def visit_Global(self, node: ast.Global) -> None:
        self.fail(node, "`global` is not allowed: methods keep state in slots (self.x = ...)")

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self.fail(node, "async functions are not allowed in methods")

    def visit_Await(self, node: ast.Await) -> None:
        self.fail(node, "`await` is not allowed in methods")

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        if node is not self.func:
            if node.decorator_list:
                self.fail(node, "decorators are not allowed in methods")
            if _is_private(node.name):  # `def __getattr__` / `def __instancecheck__` in a nested class body
                self.fail(node, f"nested function `{node.name}`: private and dunder names are not allowed")
        self.generic_visit(node)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        if _is_private(node.name):
            self.fail(node, f"class `{node.name}`: private and dunder names are not allowed")
        if node.decorator_list:
            self.fail(node, "decorators are not allowed in methods")
        if node.keywords:
            self.fail(node, "class keywords (metaclass=...) are not allowed in methods")
        self.generic_visit(node)


def _format_field_problem(text: str, depth: int = 0) -> str | None:
    """Why `text`, used as a str.format template, would read something it must not; None when harmless."""
    if "{" not in text or depth > 3:
        return None
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError:  # not a valid template: .format would raise before reading anything
        return None
    for _, field, spec, _ in parsed:
        if field:
            for part in re.split(r"[.\[]", field)[1:]:
                name = part.rstrip("]").strip()
                if _is_private(name) or name in FORBIDDEN_ATTRIBUTES or name in FORBIDDEN_MODULE_ATTRS \
                        or name in FORMAT_METHODS:
                    return f"{{{field}}} reaches {name!r}"
        if spec:
            problem = _format_field_problem(spec, depth + 1)  # "{0:{1.__class__}}": fields nest in specs
            if problem:
                return problem
    return None


# ----------------------------------------------------------------------------------------------------
# Extraction from an LLM reply
# ----------------------------------------------------------------------------------------------------

_FENCE = re.compile(r"^[ \t]*(```|~~~)[ \t]*([\w+-]*)[^\n]*\n(.*?)^[ \t]*\1[ \t]*$", re.MULTILINE | re.DOTALL)


def extract_method_source(llm_text: str, selector: str) -> str:
    """Pull `def <selector>(...)` out of an LLM reply (code fences, prose, a wrapping class).

    Tolerant on purpose: top-level imports of allowed modules are moved into the body, a missing
    `self` parameter is added, surrounding examples are dropped. The result still has to pass
    validate_method_source; this function never loosens the policy.
    """
    check_selector(selector)
    if not isinstance(llm_text, str) or not llm_text.strip():
        raise PolicyViolation("the reply is empty")
    header = re.compile(rf"^[ \t]*def[ \t]+{re.escape(selector)}[ \t]*\(", re.MULTILINE)
    candidates = [m.group(3) for m in _FENCE.finditer(llm_text)]
    # An unterminated fence (reply cut off at max_tokens) still holds usable code.
    tail = re.search(r"^[ \t]*(```|~~~)[^\n]*\n((?:(?!^[ \t]*(```|~~~)).)*)\Z", llm_text, re.MULTILINE | re.DOTALL)
    if tail:
        candidates.append(tail.group(2))
    candidates.append(llm_text)
    for block in candidates:
        if not header.search(block):
            continue
        found = _extract_from_block(block, selector, header)
        if found is not None:
            return found
    raise PolicyViolation(f"no `def {selector}(...)` found in the reply")


def _extract_from_block(block: str, selector: str, header: re.Pattern[str]) -> str | None:
    text = textwrap.dedent(block)
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        # Prose around the code: cut the def out by indentation and parse that alone.
        return _extract_by_lines(text, selector, header)
    return _extract_from_tree(text, tree, selector)


def _extract_by_lines(text: str, selector: str, header: re.Pattern[str]) -> str | None:
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if header.match(line)), None)
    if start is None:
        return None
    indent = len(lines[start]) - len(lines[start].lstrip())
    end = start + 1
    while end < len(lines):
        line = lines[end]
        if line.strip() and len(line) - len(line.lstrip()) <= indent and not line.lstrip().startswith((")", "]", "}")):
            break
        end += 1
    imports_above: list[str] = []
    i = start - 1
    while i >= 0 and (not lines[i].strip() or re.match(r"\s*(import|from)\s+\w", lines[i])):
        imports_above.insert(0, lines[i])
        i -= 1
    snippet = textwrap.dedent("\n".join(imports_above + lines[start:end]))
    try:
        tree = ast.parse(snippet)
    except (SyntaxError, ValueError):
        return None
    return _extract_from_tree(snippet, tree, selector)


def _find_def(tree: ast.Module, selector: str) -> ast.FunctionDef | None:
    for node in tree.body:  # top level first, then inside a class the model wrapped it in
        if isinstance(node, ast.FunctionDef) and node.name == selector:
            return node
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == selector:
                    return item
    return None


def _extract_from_tree(text: str, tree: ast.Module, selector: str) -> str | None:
    func = _find_def(tree, selector)
    if func is None:
        return None
    imports = [
        node
        for node in tree.body
        if isinstance(node, ast.Import | ast.ImportFrom)
        and all(name.split(".")[0] in ALLOWED_MODULES for name in _imported_modules(node))
    ]
    positional = [*func.args.posonlyargs, *func.args.args]
    needs_self = not positional or positional[0].arg != "self"
    if not imports and not needs_self:
        segment = _source_segment(text, func)
        if segment is not None:
            return segment
    if needs_self:
        func.args.args.insert(0, ast.arg(arg="self"))
    if imports:
        at = 1 if ast.get_docstring(func) is not None else 0
        func.body[at:at] = imports
    ast.fix_missing_locations(func)
    return ast.unparse(func) + "\n"  # comments are lost only in this rewriting case


def _imported_modules(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.ImportFrom):
        return [node.module or ""] if not node.level else [""]
    return [alias.name for alias in node.names]


def _source_segment(text: str, func: ast.FunctionDef) -> str | None:
    lines = text.splitlines()
    if func.end_lineno is None:
        return None
    segment = "\n".join(lines[func.lineno - 1 : func.end_lineno])
    return textwrap.dedent(segment).strip("\n") + "\n"
