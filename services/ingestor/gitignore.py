"""``.gitignore`` matching (git's "gitwildmatch"), without a dependency.

Semantics followed (gitignore(5)): blank lines and ``#`` lines are ignored (``\\#`` is a literal);
trailing spaces are dropped unless escaped; ``!`` negates (``\\!`` is a literal); a trailing ``/``
matches directories only; a pattern with a ``/`` anywhere but the end is anchored to the directory
of its ``.gitignore``, otherwise it matches a name at any depth below it; ``*`` and ``?`` never
match ``/``; ``[...]`` is a class (``[!...]`` negates) that never matches ``/``; a leading ``**/``
matches in all directories, a trailing ``/**`` everything inside, ``/**/`` zero or more directories,
and any other ``**`` is an ordinary ``*``. The last matching pattern wins, deeper files after
shallower ones. A file inside an ignored directory cannot be re-included: the walker never enters
an ignored directory, exactly as git.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Rule:
    regex: re.Pattern[str]
    negate: bool
    dir_only: bool
    base: str  # directory of the .gitignore, relative to the walk's root, posix, "" for the root

    def matches(self, rel: str, is_dir: bool) -> bool:
        if self.dir_only and not is_dir:
            return False
        if self.base:
            if not rel.startswith(self.base + "/"):
                return False
            rel = rel[len(self.base) + 1:]
        return self.regex.match(rel) is not None


def _strip_trailing_spaces(line: str) -> str:
    while line.endswith(" ") and not line.endswith("\\ "):
        line = line[:-1]
    return line


def _class(pattern: str, i: int) -> tuple[str, int] | None:
    """Translate the bracket expression starting at ``pattern[i] == "["``; None if it is not closed."""
    j = i + 1
    negate = j < len(pattern) and pattern[j] in "!^"
    if negate:
        j += 1
    if j < len(pattern) and pattern[j] == "]":  # a leading ] is a literal member
        j += 1
    while j < len(pattern) and pattern[j] != "]":
        j += 2 if pattern[j] == "\\" else 1
    if j >= len(pattern):
        return None
    body = pattern[i + 1 + negate:j]
    members = []
    k = 0
    while k < len(body):
        ch = body[k]
        if ch == "\\" and k + 1 < len(body):
            members.append(re.escape(body[k + 1]))
            k += 2
            continue
        if ch == "-" and members and k + 1 < len(body):  # a range keeps its dash
            members.append("-")
        else:
            members.append(re.escape(ch) if ch in "\\^[]" else ch)
        k += 1
    inner = "".join(members)
    return ("[^/" + inner + "]" if negate else "(?!/)[" + inner + "]"), j + 1


def translate(pattern: str) -> str:
    """The body of a regex for one gitwildmatch pattern (no anchoring)."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "*":
            if pattern.startswith("**", i):
                at_start = i == 0 or pattern[i - 1] == "/"
                after = i + 2
                if at_start and after == n:  # trailing /** (or a lone **): everything
                    out.append(".*")
                    i = after
                    continue
                if at_start and pattern.startswith("/", after):  # **/ : zero or more directories
                    out.append("(?:.*/)?")
                    i = after + 1
                    continue
                while i < n and pattern[i] == "*":  # any other run of stars is one star
                    i += 1
                out.append("[^/]*")
                continue
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "[":
            got = _class(pattern, i)
            if got is None:
                out.append(re.escape(ch))
            else:
                out.append(got[0])
                i = got[1]
                continue
        elif ch == "\\" and i + 1 < n:
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        else:
            out.append(re.escape(ch))
        i += 1
    return "".join(out)


def parse_line(line: str, base: str) -> Rule | None:
    line = _strip_trailing_spaces(line.rstrip("\r\n"))
    if not line or line.startswith("#"):
        return None
    negate = line.startswith("!")
    if negate:
        line = line[1:]
    elif line.startswith(("\\!", "\\#")):
        line = line[1:]
    dir_only = line.endswith("/") and not line.endswith("\\/")
    if dir_only:
        line = line[:-1]
    if not line:
        return None
    anchored = "/" in line
    line = line.lstrip("/") if line.startswith("/") else line
    body = translate(line)
    regex = re.compile(("" if anchored else "(?:.*/)?") + body + r"\Z", re.DOTALL)
    return Rule(regex, negate, dir_only, base)


def parse(text: str, base: str = "") -> list[Rule]:
    return [r for line in text.splitlines() if (r := parse_line(line, base)) is not None]


def load(directory: Path, base: str) -> list[Rule]:
    """The rules of ``directory/.gitignore`` (empty when there is none or it cannot be read)."""
    try:
        text = (directory / ".gitignore").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    return parse(text, base)


def ignored(rules: list[Rule], rel: str, is_dir: bool) -> bool:
    """Is ``rel`` (posix, relative to the walk's root) ignored? The last matching rule decides."""
    for rule in reversed(rules):
        if rule.matches(rel, is_dir):
            return not rule.negate
    return False
