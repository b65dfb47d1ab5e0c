"""The code policy's known holes, closed (issue 13 item 2). Defence in depth: the sandbox is the wall.

Each payload below is a working escape step in plain CPython (checked here by running it unconfined in a
throwaway subprocess, where it reaches a dunder or a frame); each must now be refused by the policy with a
reason, and the benign code a method writes must still pass.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from services.kernel.code_policy import PolicyViolation, validate_method_source

MATCH = {
    "match_args from type()": """
        def m(self):
            C = type('C', (), {'__match_args__': ('__class__',)})
            match C():
                case C(k):
                    return k
        """,
    "metaclass __instancecheck__ matches anything": """
        def m(self):
            M = type('M', (type,), {'__instancecheck__': lambda c, o: True, '__match_args__': ('__subclasses__',)})
            C = M('C', (), {})
            match object:
                case C(s):
                    return s()
        """,
    "ABCMeta from collections.abc as the metaclass": """
        def m(self):
            from collections.abc import ABCMeta
            C = ABCMeta('C', (), {'__match_args__': ('__class__',)})
            match C():
                case C(k):
                    return k
        """,
    "positional pattern on a user class": """
        def m(self, C=None):
            match self:
                case C(k):
                    return k
        """,
    "keyword pattern reading a dunder": """
        def m(self):
            match self:
                case object(__class__=c):
                    return c
        """,
    "type() rebuilt from type(x)": """
        def m(self):
            T = type(type(1))
            return T('C', (), {})
        """,
}

FORMAT = {
    "unbound str.format through map": """
        def m(self):
            return list(map(str.format, ['{0.' + '__class__}'], [1]))
        """,
    "getattr(fmt, 'format')": """
        def m(self):
            fmt = '{0.' + '_' * 2 + 'class__}'
            return getattr(fmt, 'format')(1)
        """,
    "format field reading a frame": """
        def m(self):
            return '{0.gi_frame}'.format(x for x in [1])
        """,
    "field nested in a format spec": """
        def m(self):
            return '{0:{1.__class__}}'.format(1, 2)
        """,
    "format_map": """
        def m(self):
            return '{x.__class__}'.format_map({'x': 1})
        """,
    "format method kept in a variable": """
        def m(self):
            f = '{0.__class__}'.format
            return f(1)
        """,
    "format string built by an f-string": """
        def m(self):
            name = 'class'
            return f'{{0.__{name}__}}'.format(1)
        """,
}

NESTED_DUNDERS = {
    "__getattr__ in a nested class": """
        def m(self):
            class A:
                def __getattr__(self, n):
                    return n
            return A().anything
        """,
    "__instancecheck__ in a nested metaclass body": """
        def m(self):
            class M(type):
                def __instancecheck__(cls, o):
                    return True
            return M
        """,
    "__init_subclass__ in a nested class": """
        def m(self):
            class A:
                def __init_subclass__(cls):
                    return None
            return A
        """,
    "a private-named nested class": """
        def m(self):
            class __Hidden:
                pass
            return 1
        """,
    "super() from a nested class": """
        def m(self):
            class A(Exception):
                def f(self):
                    return super()
            return str(A().f())
        """,
}

COMPUTED_ATTRS = {
    "getattr with a built name": """
        def m(self):
            n = '__cl' + 'ass__'
            return getattr(self, n)
        """,
    "setattr with a built name": """
        def m(self):
            setattr(self, 'x' + 'y', 1)
        """,
    "delattr with a name from a slot": """
        def m(self):
            delattr(self, self.name)
        """,
    "getattr as a default value": """
        def m(self, g=getattr):
            return g(self, 'x')
        """,
    "getattr through functools.partial": """
        def m(self):
            import functools
            return functools.partial(getattr, self)('x')
        """,
    "getattr with keyword or star arguments": """
        def m(self):
            args = (self, 'x')
            return getattr(*args)
        """,
    "a dunder name in a string": """
        def m(self):
            return {'__class__': 1}
        """,
    "hasattr on a dunder": """
        def m(self):
            return hasattr(self, '__dict__')
        """,
}

CLASSES = {"match": MATCH, "format": FORMAT, "nested dunders": NESTED_DUNDERS, "computed attributes": COMPUTED_ATTRS}
ALL = [(cls, name, textwrap.dedent(src)) for cls, payloads in CLASSES.items() for name, src in payloads.items()]

BENIGN = [
    "def m(self, words):\n    return '{} has {:>5.2f} words'.format(self.owner, len(words.split()))\n",
    "def m(self):\n    return '{owner}!'.format_map({'owner': self.owner})\n",
    "def m(self, spec='>10'):\n    return f'{self.owner:{spec}}'\n",
    "def m(self, x):\n    match x:\n        case int(n) | float(n):\n            return n\n        case {'k': v}:\n"
    "            return v\n        case [a, *rest]:\n            return a\n    return None\n",
    "def m(self):\n    class Point:\n        def norm(self):\n            return 0\n    return Point().norm()\n",
    "def m(self):\n    return getattr(self, 'owner', None), hasattr(self, 'count')\n",
    "def m(self, x):\n    return isinstance(x, (int, str)) and x != '__'\n",
]


@pytest.mark.parametrize(("cls", "name", "source"), ALL, ids=[f"{c}: {n}" for c, n, _ in ALL])
def test_each_known_hole_is_refused_with_a_reason(cls, name, source):
    with pytest.raises(PolicyViolation) as info:
        validate_method_source(source, "m")
    assert info.value.reason and info.value.lineno


@pytest.mark.parametrize("source", BENIGN)
def test_ordinary_methods_still_pass(source):
    validate_method_source(source, "m")


REAL = {  # payload -> what it reaches when run unconfined (proof that each class is a real hole)
    "match": (MATCH["match_args from type()"], "<class '__main__.C'>"),
    "format": (FORMAT["unbound str.format through map"], "<class 'int'>"),
    "nested dunders": (NESTED_DUNDERS["__getattr__ in a nested class"], "anything"),
}


@pytest.mark.parametrize("cls", list(REAL))
def test_the_payloads_are_real_escapes_when_nothing_checks_them(cls):
    source, expect = REAL[cls]
    code = textwrap.dedent(source) + "\nclass S:\n    pass\nprint(m(S()))\n"
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=30)
    assert expect in out.stdout, out.stderr
