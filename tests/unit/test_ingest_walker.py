"""The walker and gitwildmatch, checked against git itself (``git ls-files --others --exclude-standard``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.ingestor import gitignore, walker

GIT = shutil.which("git")
needs_git = pytest.mark.skipif(GIT is None, reason="git is not installed")

TREE = [
    "a.py", "b.txt", "README.md", "notes.log", "ab.py", "x[1].py", "space name.txt", "#hash.py", "!bang.py",
    "src/a.py", "src/b.txt", "src/ab/c.py", "src/ab/d.log", "src/deep/er/a.py", "src/deep/er/z.txt",
    "docs/index.rst", "docs/a.py", "docs/build/out.txt", "build/out.py", "build/keep.py", "lib/build/x.py",
    "foo/bar/baz.py", "foo/a/b/bar/c.py", "logs/debug.log", "logs/important.log",
]


def _make(root: Path, files: list[str]) -> None:
    for rel in files:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(rel + "\n")


def _git_view(root: Path) -> list[str]:
    env = {**os.environ, "HOME": str(root), "GIT_CONFIG_NOSYSTEM": "1", "XDG_CONFIG_HOME": str(root / ".xdg")}
    subprocess.run([GIT, "init", "-q", str(root)], check=True, env=env)
    out = subprocess.run([GIT, "-c", "core.quotepath=off", "ls-files", "--others", "--exclude-standard", "-z"],
                         cwd=root, check=True, capture_output=True, env=env).stdout
    return sorted(str(root / p) for p in out.decode().split("\0") if p and not p.endswith(".gitignore"))


def _ours(root: Path) -> list[str]:
    return sorted(p for p in walker.walk(root) if not p.endswith(".gitignore"))


RULES = """\
# comment
*.log
!important.log
/build/
docs/build
src/**/*.txt
**/er/a.py
foo/**/bar
x\\[1\\].py
\\#hash.py
\\!bang.py
space\\ name.txt
a?.py
"""


@needs_git
def test_walker_agrees_with_git_on_a_tricky_gitignore(tmp_path: Path) -> None:
    _make(tmp_path, TREE)
    (tmp_path / ".gitignore").write_text(RULES)
    (tmp_path / "src" / ".gitignore").write_text("c.py\n!ab/\n")
    (tmp_path / "src" / "deep" / ".gitignore").write_text("!z.txt\n")
    assert _ours(tmp_path) == _git_view(tmp_path)


def test_always_skipped_directories_and_explicit_files(tmp_path: Path) -> None:
    _make(tmp_path, ["keep.py", ".venv/lib/x.py", "var/live.fs", "pkg/__pycache__/m.pyc", "pkg/var/y.py",
                     ".git/config", "pkg/m.py"])
    assert [os.path.relpath(p, tmp_path) for p in walker.walk(tmp_path)] == ["keep.py", "pkg/m.py"]
    (tmp_path / ".gitignore").write_text("keep.py\n")
    assert walker.walk(tmp_path / "keep.py") == [str(tmp_path / "keep.py")]  # named explicitly: taken
    with pytest.raises(FileNotFoundError):
        walker.walk(tmp_path / "missing")


def test_symlinked_directories_are_not_followed(tmp_path: Path) -> None:
    _make(tmp_path, ["real/a.py"])
    (tmp_path / "loop").symlink_to(tmp_path, target_is_directory=True)
    assert walker.walk(tmp_path) == [str(tmp_path / "real" / "a.py")]


def test_translate_units() -> None:
    def m(pattern: str, path: str, is_dir: bool = False) -> bool:
        rule = gitignore.parse_line(pattern, "")
        assert rule is not None
        return rule.matches(path, is_dir)

    assert m("*.py", "a/b/c.py") and not m("/*.py", "a/c.py") and m("/*.py", "c.py")
    assert m("a/**/b", "a/b") and m("a/**/b", "a/x/y/b") and not m("a/**/b", "xa/b")
    assert m("a/**", "a/x/y") and not m("a/**", "a")
    assert m("[a-c]x", "bx") and not m("[!a-c]x", "bx") and not m("a[/]b", "a/b")
    assert m("dir/", "dir", True) and not m("dir/", "dir", False)
    assert gitignore.parse_line("   ", "") is None and gitignore.parse_line("# x", "") is None
    assert m("trailing\\ ", "trailing ") and m("x  ", "x")


SEGMENTS = st.sampled_from(["a", "b", "ab", "*", "?", "**", "[ab]", "[!a]", "*.py", "a*", "deep", "src"])
PATTERNS = st.builds(
    lambda neg, lead, segs, trail: "!" * neg + "/" * lead + "/".join(segs) + "/" * trail,
    st.booleans(), st.booleans(), st.lists(SEGMENTS, min_size=1, max_size=3), st.booleans())
RANDOM_TREE = ["ba", "b.py", "ab.py", "a/b", "a/b.py", "b/a.py", "ab/a/b.py", "src/a.py", "src/deep/b.py",
               "deep/a/b/ab.py", "src/ab", "x/src/a.py"]


@needs_git
@given(st.lists(PATTERNS, min_size=1, max_size=5))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_random_patterns_agree_with_git(tmp_path: Path, patterns: list[str]) -> None:
    with tempfile.TemporaryDirectory(dir=tmp_path) as d:
        root = Path(d)
        _make(root, RANDOM_TREE)
        (root / ".gitignore").write_text("\n".join(patterns) + "\n")
        assert _ours(root) == _git_view(root), patterns
