"""Which files under a path are candidates for ingestion.

Honours every ``.gitignore`` on the way down (and ``.git/info/exclude`` at the root), never enters
``ALWAYS_SKIP`` directories, and follows no directory symlinks (no loops, nothing outside the tree).
A path that names a file is returned as is: asking for it by name overrides the ignore rules.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from services.ingestor import gitignore

ALWAYS_SKIP = frozenset({".git", ".venv", "var", "__pycache__"})


def walk(root: str | Path) -> list[str]:
    """Absolute paths of the non-ignored files under ``root``, sorted."""
    base = Path(root).expanduser().resolve()
    if base.is_file():
        return [str(base)]
    if not base.is_dir():
        raise FileNotFoundError(f"no such file or directory: {root}")
    rules = _root_rules(base)
    return sorted(_walk(base, "", rules))


def _root_rules(base: Path) -> list[gitignore.Rule]:
    rules: list[gitignore.Rule] = []
    try:
        exclude = (base / ".git" / "info" / "exclude").read_text(encoding="utf-8", errors="replace")
        rules.extend(gitignore.parse(exclude))
    except OSError:
        pass
    return rules


def _walk(directory: Path, rel_dir: str, inherited: list[gitignore.Rule]) -> Iterator[str]:
    rules = inherited + gitignore.load(directory, rel_dir)
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return  # unreadable directory: nothing to ingest there
    for entry in entries:
        rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
        try:
            is_dir = entry.is_dir(follow_symlinks=False)
            is_file = entry.is_file()  # a symlink to a file counts as the file
        except OSError:
            continue
        if is_dir:
            if entry.name in ALWAYS_SKIP or gitignore.ignored(rules, rel, True):
                continue
            yield from _walk(Path(entry.path), rel, rules)
        elif is_file and not gitignore.ignored(rules, rel, False):
            yield os.path.abspath(entry.path)
