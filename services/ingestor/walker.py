"""Which files under a path are candidates for ingestion.

Honours every ``.gitignore`` on the way down (and ``.git/info/exclude`` at the root), never enters
``ALWAYS_SKIP`` directories, and follows no directory symlinks (no loops, nothing outside the tree).
A path that names a file is returned as is: asking for it by name overrides the ignore rules.
A symlink (file or directory) that resolves outside the walked root, and a special file (fifo, socket,
device), is never returned: it goes into ``refused`` with the reason, so the caller can say so.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

from services.ingestor import gitignore
from services.ingestor.roots import special_kind, within

ALWAYS_SKIP = frozenset({".git", ".venv", "var", "__pycache__"})


def walk(root: str | Path, refused: list[dict[str, str]] | None = None) -> list[str]:
    """Absolute paths of the non-ignored files under ``root``, sorted; what was refused is appended to
    ``refused`` as ``{"file_path", "reason"}``."""
    base = Path(root).expanduser().resolve()
    if base.is_file():
        return [str(base)]
    if not base.is_dir():
        raise FileNotFoundError(f"no such file or directory: {root}")
    rules = _root_rules(base)
    out = refused if refused is not None else []
    return sorted(_walk(base, "", rules, str(base), out))


def _root_rules(base: Path) -> list[gitignore.Rule]:
    rules: list[gitignore.Rule] = []
    try:
        exclude = (base / ".git" / "info" / "exclude").read_text(encoding="utf-8", errors="replace")
        rules.extend(gitignore.parse(exclude))
    except OSError:
        pass
    return rules


def _walk(directory: Path, rel_dir: str, inherited: list[gitignore.Rule], base: str,
          refused: list[dict[str, str]]) -> Iterator[str]:
    rules = inherited + gitignore.load(directory, rel_dir)
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return  # unreadable directory: nothing to ingest there
    for entry in entries:
        rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
        try:
            is_dir = entry.is_dir(follow_symlinks=False)
            is_link = entry.is_symlink()
            mode = os.stat(entry.path).st_mode  # follows a symlink: what would be read
        except OSError:
            continue  # unreadable or a dangling symlink
        if is_link:
            target = os.path.realpath(entry.path)
            if not within(target, base):
                refused.append({"file_path": os.path.abspath(entry.path),
                                "reason": f"symlink leaving the root (to {target})"})
                continue
        if is_dir:
            if entry.name in ALWAYS_SKIP or gitignore.ignored(rules, rel, True):
                continue
            yield from _walk(Path(entry.path), rel, rules, base, refused)
        elif stat.S_ISREG(mode):  # a symlink to a file inside the root counts as the file
            if not gitignore.ignored(rules, rel, False):
                yield os.path.abspath(entry.path)
        elif not stat.S_ISDIR(mode):  # a symlinked directory inside the root is not followed (no loops)
            refused.append({"file_path": os.path.abspath(entry.path),
                            "reason": f"special file ({special_kind(mode)})"})
