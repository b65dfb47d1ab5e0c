"""Table 2's ``dependencies``: the modules imported in a chunk's scope that the chunk uses.

A chunk depends on (a) every module its own import statements name, and (b) the module behind each
imported name it mentions, whether that import sits at module level (read exactly from the ``ast``)
or earlier in an enclosing function that was split (read from that function's lines). Mentions are
found with one regular expression per file over the chunk text, not an ``ast`` walk: walking every
node of every chunk would cost as much as parsing the file again. A name that only appears in a
comment or a string therefore counts as used; that is the price, and it errs towards listing.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable

IMPORT_LINE = re.compile(r"^[ \t]*(?:from[ \t]+(\.*[\w.]*)[ \t]+import[ \t(]+([^\n#;]*)|import[ \t]+([^\n#;]+))",
                         re.MULTILINE)

Bindings = dict[str, set[str]]


def _add(bindings: Bindings, name: str, module: str) -> None:
    bindings.setdefault(name, set()).add(module)


def _from_module(level: int, module: str | None) -> str:
    return "." * level + (module or "")


def module_bindings(tree: ast.Module) -> Bindings:
    """Names bound by imports at module level, including inside module-level if/try/with blocks."""
    bindings: Bindings = {}
    todo: list[ast.stmt] = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import):
            for a in node.names:
                _add(bindings, a.asname or a.name.split(".")[0], a.name)
        elif isinstance(node, ast.ImportFrom):
            module = _from_module(node.level, node.module)
            for a in node.names:
                if a.name != "*":
                    _add(bindings, a.asname or a.name, module)
        elif isinstance(node, (ast.If, ast.Try, ast.TryStar, ast.With, ast.AsyncWith)):
            for name in ("body", "orelse", "finalbody"):
                todo.extend(getattr(node, name, []))
            for h in getattr(node, "handlers", []):
                todo.extend(h.body)
    return bindings


def text_imports(text: str) -> tuple[set[str], Bindings]:
    """Modules named by import lines in ``text`` and the names those lines bind."""
    modules: set[str] = set()
    bindings: Bindings = {}
    if "import" not in text:
        return modules, bindings
    for m in IMPORT_LINE.finditer(text):
        if m.group(1) is not None:
            module = m.group(1)
            if not module:
                continue
            modules.add(module)
            for part in m.group(2).replace(")", "").split(","):
                words = part.split()
                if words and words[0] != "*" and words[0].isidentifier():
                    _add(bindings, words[-1] if len(words) == 3 and words[1] == "as" else words[0], module)
        else:
            for part in m.group(3).split(","):
                words = part.split()
                if not words or not all(p.isidentifier() for p in words[0].split(".")):
                    continue
                modules.add(words[0])
                bound = words[2] if len(words) == 3 and words[1] == "as" else words[0].split(".")[0]
                _add(bindings, bound, words[0])
    return modules, bindings


class DependencyFinder:
    """Per file: the module-level bindings, and the modules a chunk text depends on."""

    def __init__(self, tree: ast.Module):
        self.bindings = module_bindings(tree)

    def for_text(self, text: str, scope_bindings: Iterable[Bindings] = ()) -> list[str]:
        modules, _ = text_imports(text)
        for bindings in (self.bindings, *scope_bindings):
            for name, mods in bindings.items():
                # a substring test first: most names are absent, and ``in`` is far cheaper than a regex scan
                if name in text and not mods <= modules and mentions(text, name):
                    modules.update(mods)
        return sorted(modules)


def mentions(text: str, name: str) -> bool:
    """Does ``name`` occur as a whole identifier that is not an attribute of something else?"""
    size = len(name)
    i = text.find(name)
    while i != -1:
        before = text[i - 1] if i else " "
        after = text[i + size] if i + size < len(text) else " "
        if not (before.isalnum() or before in "_.") and not (after.isalnum() or after == "_"):
            return True
        i = text.find(name, i + 1)
    return False
