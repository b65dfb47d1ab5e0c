"""The AST policy for methods (services/kernel/code_policy.py): accepts plain methods, rejects each
known escape pattern with a precise reason, and extracts a def from a chatty LLM reply."""

from __future__ import annotations

import pytest

from services.kernel.code_policy import (
    ALLOWED_MODULES,
    PolicyViolation,
    extract_method_source,
    validate_method_source,
)

GOOD = '''
def summarize(self, limit=3, *extra, sep=", ", **options):
    """Top words of the text slot."""
    import collections
    from statistics import mean
    counts = collections.Counter(self.text.split())
    words = [w for w, _ in counts.most_common(limit)]
    _ = mean([len(w) for w in words] or [0])
    return f"{sep.join(words)} ({len(words)})"
'''


def test_good_method_is_accepted_with_its_metadata() -> None:
    method = validate_method_source(GOOD, "summarize")
    assert method.selector == "summarize"
    assert method.params == ("limit", "*extra", "sep", "**options")
    assert method.imports == ("collections", "statistics")
    assert method.doc == "Top words of the text slot."
    assert method.source.startswith("def summarize(self")
    compile(method.source, "<m>", "exec")  # the normalised text still compiles


def test_indented_source_is_dedented() -> None:
    method = validate_method_source("    def area(self):\n        return self.w * self.h\n", "area")
    assert method.source == "def area(self):\n    return self.w * self.h\n"


def test_every_allowed_module_is_importable_inside_the_body() -> None:
    body = "\n".join(f"    import {name}" for name in sorted(ALLOWED_MODULES))
    method = validate_method_source(f"def m(self):\n{body}\n    return 1\n", "m")
    assert set(method.imports) == ALLOWED_MODULES


def test_literal_getattr_and_format_are_allowed() -> None:
    source = 'def m(self):\n    return getattr(self, "width", 0), "{0} {1:>4}".format(1, 2), f"{self.w!r}"\n'
    assert validate_method_source(source, "m").selector == "m"


def _reason(source: str, selector: str = "m") -> str:
    with pytest.raises(PolicyViolation) as info:
        validate_method_source(source, selector)
    return str(info.value)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # dunder walks to builtins / os
        ("return ().__class__.__base__.__subclasses__()", "dunder attribute access `.__class__`"),
        ("return self.run.__globals__", "dunder attribute access `.__globals__`"),
        ("return __builtins__['open']", "dunder name `__builtins__`"),
        ("return self._p_jar", "private attribute access `._p_jar`"),
        # builtins that execute code or reach files
        ("return eval('1+1')", "`eval` is not allowed"),
        ("exec('x = 1')", "`exec` is not allowed"),
        ("return compile('1', 'f', 'eval')", "`compile` is not allowed"),
        ("return open('/etc/passwd').read()", "`open` is not allowed"),
        ("return __import__('os')", "dunder name `__import__`"),
        ("return globals()", "`globals` is not allowed"),
        ("return locals()", "`locals` is not allowed"),
        ("return vars(self)", "`vars` is not allowed"),
        ("breakpoint()", "`breakpoint` is not allowed"),
        ("return input()", "`input` is not allowed"),
        # names rebuilt from strings
        ("return getattr((), '__cl' + 'ass__')", "`getattr` needs a literal attribute name"),
        ("return getattr(self, '__class__')", "dunder attribute access `.__class__`"),
        ("name = 'x'\n    setattr(self, name, 1)", "`setattr` needs a literal attribute name"),
        ("g = getattr\n    return g(self, 'x')", "`getattr` may only be called directly"),
        ("import functools\n    return functools.reduce(getattr, ['a'], self)", "`getattr` may only be called"),
        ("return '{0.__class__}'.format(self)", "format string field {0.__class__} reaches"),
        ("fmt = self.f\n    return fmt.format(self)", "`.format()` needs a literal format string"),
        ("import operator\n    return operator.attrgetter('x')(self)", "attribute `.attrgetter` is not allowed"),
        ("from operator import methodcaller\n    return 1", "importing 'methodcaller' from operator"),
        ("import string\n    return string.Formatter().vformat('{}', [1], {})", "attribute `.Formatter`"),
        # frame and traceback walks
        ("g = (i for i in [1])\n    return g.gi_frame.f_back", "attribute `.gi_frame` is not allowed"),
        ("try:\n        1/0\n    except Exception as e:\n        return e.__traceback__", "`.__traceback__`"),
        # imports outside the allow-list, and modules reached through allowed ones
        ("import os\n    return os.getcwd()", "import of 'os' is not allowed"),
        ("import ctypes\n    return 1", "import of 'ctypes' is not allowed"),
        ("import subprocess\n    return 1", "import of 'subprocess' is not allowed"),
        ("from os import path\n    return 1", "import of 'os' is not allowed"),
        ("import statistics\n    return statistics.sys.modules", "attribute `.sys` is not allowed"),
        ("import json\n    return json.codecs.open('/etc/passwd')", "attribute `.codecs` is not allowed"),
        ("import random\n    return random._os", "private attribute access `._os`"),
        ("from random import _inst\n    return 1", "importing '_inst' from random"),
        ("import collections._sys\n    return 1", "private module 'collections._sys'"),
        # match-class keyword patterns read attributes too
        ("match self:\n        case object(__class__=c):\n            return c", "dunder attribute access"),
        # state outside slots, generators, async
        ("global X\n    X = 1", "`global` is not allowed"),
        ("yield 1", "`yield` makes it a generator"),
        ("async def inner():\n        pass\n    return 1", "async functions are not allowed"),
        ("class K(metaclass=type):\n        pass\n    return 1", "class keywords (metaclass=...)"),
    ],
)
def test_hostile_pattern_is_rejected_with_reason(body: str, expected: str) -> None:
    assert expected in _reason(f"def m(self):\n    {body}\n")


def test_violation_carries_the_line_number() -> None:
    with pytest.raises(PolicyViolation) as info:
        validate_method_source("def m(self):\n    x = 1\n    return eval('x')\n", "m")
    assert info.value.lineno == 3
    assert info.value.reason == "`eval` is not allowed in methods"
    assert str(info.value).startswith("line 3:")


def test_nested_generator_is_fine_but_default_values_are_checked() -> None:
    assert validate_method_source("def m(self):\n    return sum(i for i in range(3))\n", "m")
    assert "`open` is not allowed" in _reason("def m(self, f=open):\n    return f\n")


@pytest.mark.parametrize(
    ("source", "selector", "expected"),
    [
        ("def m(self):\n    return (\n", "m", "source does not parse"),
        ("", "m", "method source is empty"),
        ("def m(self):\n    return 1\ndef n(self):\n    return 2\n", "m", "exactly one top-level statement"),
        ("import math\ndef m(self):\n    return math.pi\n", "m", "exactly one top-level statement"),
        ("x = 1\n", "m", "expected `def m(self, ...)`"),
        ("def other(self):\n    return 1\n", "m", "function is named 'other', expected 'm'"),
        ("def m():\n    return 1\n", "m", "first parameter of m must be `self`"),
        ("def m(cls):\n    return 1\n", "m", "first parameter of m must be `self`"),
        ("@staticmethod\ndef m(self):\n    return 1\n", "m", "decorators are not allowed"),
        ("async def m(self):\n    return 1\n", "m", "`async def m` is not allowed"),
        ("def __init__(self):\n    pass\n", "__init__", "starts with '_'"),
        ("def m(self):\n    return 1\n", "not-an-identifier", "not a valid Python identifier"),
        ("def m(self):\n    return 1\n" + "#" * 20_000, "m", "the limit is 20000"),
    ],
)
def test_shape_errors(source: str, selector: str, expected: str) -> None:
    assert expected in _reason(source, selector)


# ------------------------------------------------------------------------------------------------
# extract_method_source
# ------------------------------------------------------------------------------------------------


def test_extract_from_fenced_block_moves_top_level_imports_into_the_body() -> None:
    reply = (
        "Sure! Here is the method:\n\n```python\nimport math\n\ndef area(self, scale=1):\n"
        '    """Area of the circle."""\n    return math.pi * self.radius ** 2 * scale\n\n'
        "print(area(obj))\n```\nThis uses math.pi."
    )
    source = extract_method_source(reply, "area")
    assert source == (
        'def area(self, scale=1):\n    """Area of the circle."""\n    import math\n'
        "    return math.pi * self.radius ** 2 * scale\n"
    )
    assert validate_method_source(source, "area").imports == ("math",)


def test_extract_from_prose_without_fences_keeps_comments() -> None:
    reply = (
        "Here you go:\n    def area(self):\n        # width times height\n        return self.w * self.h\nThat's it."
    )
    assert (
        extract_method_source(reply, "area")
        == "def area(self):\n    # width times height\n    return self.w * self.h\n"
    )


def test_extract_from_a_wrapping_class_and_adds_missing_self() -> None:
    wrapped = "```python\nclass Shape:\n    def area(self):\n        return self.w * self.h  # kept\n```"
    assert extract_method_source(wrapped, "area") == "def area(self):\n    return self.w * self.h  # kept\n"
    bare = "```python\ndef area(w, h):\n    return w * h\n```"
    assert extract_method_source(bare, "area") == "def area(self, w, h):\n    return w * h\n"


def test_extract_picks_the_block_with_the_selector_even_if_unterminated() -> None:
    reply = "```py\ndef helper(self):\n    pass\n```\nand then\n```python\ndef area(self):\n    return 1\n"
    assert extract_method_source(reply, "area") == "def area(self):\n    return 1\n"


def test_extract_does_not_loosen_the_policy() -> None:
    reply = "```python\nimport os\n\ndef area(self):\n    return os.getcwd()\n```"
    source = extract_method_source(reply, "area")
    assert "import os" not in source  # a forbidden top-level import is not smuggled into the body
    with pytest.raises(PolicyViolation, match="dunder attribute access"):
        validate_method_source(extract_method_source("def area(self): return self.__dict__", "area"), "area")


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("I cannot write that method.", "no `def area(...)` found in the reply"),
        ("```python\ndef volume(self):\n    return 1\n```", "no `def area(...)` found"),
        ("   ", "the reply is empty"),
    ],
)
def test_extract_failures_are_explained(reply: str, expected: str) -> None:
    with pytest.raises(PolicyViolation, match=expected.replace("(", r"\(").replace(")", r"\)")):
        extract_method_source(reply, "area")
