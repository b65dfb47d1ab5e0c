"""The AST chunker on crafted sources: structure, metadata, flags, summaries, options."""

from __future__ import annotations

import textwrap

import pytest

from batos import tokens
from services.ingestor import parsecheck, quality
from services.ingestor.chunker import chunk_python

PATH = "/repo/pkg/sample.py"

SAMPLE = textwrap.dedent('''\
    """Sample module for the chunker."""

    import os
    import json as j
    from collections import OrderedDict

    CONSTANT = 1


    # A comment directly above the class
    @decorator
    class Big(Base):
        """Big class docstring.

        More text.
        """

        attr = 1

        # comment above method one
        def one(self, x):
            """First method."""
            return os.path.join(x, "a") + "b" * 20 + "c" * 30 + str(x) * 3

        @property
        def two(self):
            data = j.dumps({"a": 1, "b": 2, "c": 3, "d": 4, "e": 5, "f": 6})
            return data + "long string here to use some tokens up" * 2

        def three(self):
            if self.x:
                a = 1
            elif self.y:
                a = 3
            else:
                a = 4
            try:
                z = OrderedDict()
            except KeyError:
                z = None
            return a, z


    def small():
        return 1
    ''')


def by_start(fc, line):
    return next(c for c in fc.chunks if c.metadata["start_line"] == line)


SMALL = textwrap.dedent('''\
    """One function and its imports."""

    import os


    def here(x):
        return os.path.join(x, "a")
    ''')


def test_small_file_with_one_definition_is_one_module_chunk() -> None:
    fc = chunk_python(SMALL, PATH, 10_000, file_hash="h")
    assert len(fc.chunks) == 1
    m = fc.chunks[0].metadata
    assert (m["start_line"], m["end_line"], m["node_type"], m["node_name"]) == (1, 7, "Module", "sample")
    assert m["dependencies"] == ["os"]
    assert fc.chunks[0].text == SMALL and fc.file_hash == "h"
    assert [s.kind for s in fc.summaries] == ["file"]


def test_each_definition_is_its_own_chunk_even_when_the_file_fits() -> None:
    # Changed 2026-12-06 (issue 12, "chunks that match how people ask"): a small file used to be one chunk and
    # small methods were merged with their neighbours; a question names one function, so each definition is a
    # chunk of its own, and only non-definition statements (docstring, imports, constants) are grouped.
    fc = chunk_python(SAMPLE, PATH, 10_000, file_hash="h")
    assert not quality.check(SAMPLE, fc.chunks, 10_000).problems
    got = [(c.metadata["start_line"], c.metadata["end_line"], c.metadata["node_name"]) for c in fc.chunks]
    assert got == [(1, 7, "__doc__"), (10, 18, "Big"), (20, 23, "one"), (25, 28, "two"), (30, 41, "three"),
                   (44, 45, "small")]
    one = by_start(fc, 20)
    assert one.metadata["parent_nodes"] == ["Big"] and one.summary_key == f"{PATH}::Big"
    # the embedded text carries path, scope and the enclosing class's header; the stored text is the exact lines
    assert one.embed_text.startswith("# pkg/sample.py :: Big.one\nclass Big(Base):\n    \"\"\"Big class docstring.")
    assert one.text == "".join(SAMPLE.splitlines(keepends=True)[19:23])
    assert fc.chunks[0].metadata["dependencies"] == ["collections", "json", "os"]


TINY = textwrap.dedent('''\
    class Atom(Token):
        kind = "atom"

    class Word(Token):
        kind = "word"

    def parse(text):
        words = text.split()
        words = [w for w in words if w]
        return [Word(w) for w in words]

    def render(tokens):
        out = [str(t) for t in tokens]
        out = [o for o in out if o]
        return " ".join(out)
    ''')


def test_tiny_definitions_group_and_real_ones_stand_alone() -> None:
    fc = chunk_python(TINY, PATH, 10_000)
    assert not quality.check(TINY, fc.chunks, 10_000).problems
    got = [(c.metadata["start_line"], c.metadata["end_line"], c.metadata["node_name"]) for c in fc.chunks]
    assert got == [(1, 5, "Atom"), (7, 10, "parse"), (12, 15, "render")]


def test_split_class_structure_and_metadata() -> None:
    fc = chunk_python(SAMPLE, PATH, 60)
    assert not quality.check(SAMPLE, fc.chunks, 60).problems
    head = by_start(fc, 10)  # the comment and decorator above the class open its first piece
    assert head.text.startswith("# A comment directly above the class\n@decorator\nclass Big(Base):")
    assert head.metadata["node_type"] == "ClassDef" and head.metadata["node_name"] == "Big"
    assert head.metadata["parent_nodes"] == []
    one = by_start(fc, 20)
    assert one.text.lstrip().startswith("# comment above method one\n    def one")
    m = one.metadata
    assert (m["node_type"], m["node_name"], m["parent_nodes"], m["dependencies"]) == ("FunctionDef", "one", ["Big"],
                                                                                      ["os"])
    assert m["context_header"] == 'class Big(Base):\n    """Big class docstring."""\n'
    assert one.embed_text.startswith("# pkg/sample.py :: Big.one\nclass Big(Base):")
    assert one.embed_text.endswith(one.text)
    assert by_start(fc, 25).metadata["dependencies"] == ["json"]  # `j` is json
    class_key = f"{PATH}::Big"
    assert {c.summary_key for c in fc.chunks if c.metadata["start_line"] in range(10, 44)} == {class_key}
    assert fc.chunks[-1].summary_key == PATH and fc.chunks[-1].metadata["node_name"] == "small"
    keys = {s.key: s for s in fc.summaries}
    assert set(keys) == {PATH, class_key}
    assert "def one(self, x):  # First method." in keys[class_key].text
    assert keys[class_key].metadata["node_type"] == "ClassDef"


def test_every_chunk_metadata_has_exactly_the_table2_fields_plus_ours() -> None:
    fc = chunk_python(SAMPLE, PATH, 40)
    base = {"file_path", "start_line", "end_line", "node_type", "node_name", "parent_nodes", "dependencies",
            "content_hash", "token_count", "flags"}
    for c in fc.chunks:
        assert set(c.metadata) - {"context_header"} == base
        assert c.metadata["file_path"] == PATH
        payload = c.payload()
        assert set(payload["metadata"]) == base and payload["source_text"] == c.text
    hashes = [c.metadata["content_hash"] for c in fc.chunks]
    assert len(set(hashes)) == len(hashes)


def test_split_function_body_pieces_carry_the_signature() -> None:
    fc = chunk_python(SAMPLE, PATH, 40)
    assert not quality.check(SAMPLE, fc.chunks, 40).problems
    inner = [c for c in fc.chunks if c.metadata["parent_nodes"] == ["Big", "three"]]
    assert inner, "three() should have been split at 40 tokens"
    for c in inner:
        assert c.metadata["context_header"].endswith("    def three(self):\n")
        assert "OrderedDict" not in c.text or c.metadata["dependencies"] == ["collections"]


CLAUSES = textwrap.dedent('''\
    def f(v):
        match v:
            case 1:
                x = "one one one one one one one one one one one one one one"
            case 2:
                x = "two two two two two two two two two two two two two two"
        if v:
            y = "aaaa aaaa aaaa aaaa aaaa aaaa aaaa aaaa aaaa aaaa aaaa aaaa"
        elif v > 1:
            y = "bbbb bbbb bbbb bbbb bbbb bbbb bbbb bbbb bbbb bbbb bbbb bbbb"
        else:
            y = "cccc cccc cccc cccc cccc cccc cccc cccc cccc cccc cccc cccc"
        try:
            z = "dddd dddd dddd dddd dddd dddd dddd dddd dddd dddd dddd dddd"
        except ValueError:
            z = "eeee eeee eeee eeee eeee eeee eeee eeee eeee eeee eeee eeee"
        finally:
            z = "ffff ffff ffff ffff ffff ffff ffff ffff ffff ffff ffff ffff"
        a = 1; b = 2
        import shutil
        return shutil.which("x")
    ''')


def test_compound_statements_split_into_clauses_that_parse() -> None:
    fc = chunk_python(CLAUSES, PATH, 40)
    report = quality.check(CLAUSES, fc.chunks, 40)
    assert not report.problems and report.flagged == 0
    firsts = [parsecheck.leading_clause(c.text) for c in fc.chunks]
    assert {"case", "elif", "else", "except", "finally"} <= set(firsts)
    else_piece = next(c for c in fc.chunks if parsecheck.leading_clause(c.text) == "else")
    assert not parsecheck.parses_plain(else_piece.text) and parsecheck.parses(else_piece.text)  # the opener rule
    last = fc.chunks[-1]
    assert last.metadata["dependencies"] == ["shutil"] and last.metadata["parent_nodes"] == ["f"]


def test_statements_sharing_a_line_stay_together() -> None:
    src = "a = 1; b = [\n    2]; c = 3\nd = 4\n"
    fc = chunk_python(src, PATH, 18)  # the shared lines cost 17 tokens, the whole file 22
    assert not quality.check(src, fc.chunks, 18).problems and len(fc.chunks) == 2
    assert fc.chunks[0].text == "a = 1; b = [\n    2]; c = 3\n"


def test_oversized_leaves_are_split_by_lines_and_flagged_never_dropped() -> None:
    table = "TABLE = [\n" + "".join(f"    {i}, {i + 1}, {i + 2},\n" for i in range(0, 300, 3)) + "]\n"
    long_line = "LONG = '" + "zzzz " * 300 + "'\n"
    src = table + long_line + "def ok():\n    return 1\n"
    fc = chunk_python(src, PATH, 50)
    report = quality.check(src, fc.chunks, 50)
    assert not report.problems and report.covered == report.lines
    flags = [tuple(c.metadata["flags"]) for c in fc.chunks]
    assert ("line_split",) in flags and ("line_split", "partial_line") in flags
    assert all(c.metadata["token_count"] <= 50 for c in fc.chunks)
    long_pieces = [c.text for c in fc.chunks if c.metadata["start_line"] == table.count("\n") + 1]
    assert len(long_pieces) > 1
    assert "".join(long_pieces).rstrip("\n") == long_line.rstrip("\n")  # a trailing-newline-only piece is dropped
    assert fc.chunks[-1].metadata["flags"] == [] and fc.chunks[-1].metadata["node_name"] == "ok"


def test_header_too_big_for_its_first_statement_travels_with_it() -> None:
    src = "def f(a, b):\n    return [\n" + "".join(f"        {i},\n" for i in range(60)) + "    ]\n"
    fc = chunk_python(src, PATH, 40)
    assert not quality.check(src, fc.chunks, 40).problems
    assert fc.chunks[0].text.startswith("def f(a, b):\n    return [")
    assert all("line_split" in c.metadata["flags"] for c in fc.chunks)


def test_crlf_and_comments_only_and_empty_sources() -> None:
    crlf = "x = 1\r\n\r\ndef f():\r\n    return x\r\n"
    fc = chunk_python(crlf, PATH, 256)
    assert fc.chunks[0].text == "x = 1\n\ndef f():\n    return x\n"
    assert chunk_python("", PATH, 256).chunks == []
    comments = "".join(f"# comment line {i} with some words in it\n" for i in range(40))
    fc = chunk_python(comments, PATH, 64)
    assert not quality.check(comments, fc.chunks, 64).problems and len(fc.chunks) > 1


def test_use_unparse_rewrites_parseable_chunks() -> None:
    fc = chunk_python(SAMPLE, PATH, 60, use_unparse=True)
    one = next(c for c in fc.chunks if c.metadata["node_name"] == "one")
    assert "# comment above method one" not in one.text  # ast.unparse drops comments
    assert one.metadata["flags"] == ["unparsed"] and one.metadata["token_count"] == tokens.count(one.text)
    assert one.text.startswith("def one(self, x):")


def test_function_scope_imports_count_for_later_pieces() -> None:
    body = "".join(f"    v{i} = helper.run('{'x' * 30}', {i})\n" for i in range(12))
    src = "def f():\n    import helper\n" + body
    fc = chunk_python(src, PATH, 60)
    assert len(fc.chunks) > 2
    assert all(c.metadata["dependencies"] == ["helper"] for c in fc.chunks)


def test_nested_split_classes_get_their_own_summaries() -> None:
    methods = "".join(f"        def m{i}(self):\n            return '{'y' * 40}'\n\n" for i in range(6))
    src = f"class Outer:\n    class Inner:\n        '''Inner doc.'''\n{methods}    def tail(self):\n        pass\n"
    fc = chunk_python(src, PATH, 60)
    assert not quality.check(src, fc.chunks, 60).problems
    keys = [s.key for s in fc.summaries]
    assert keys == [PATH, f"{PATH}::Outer", f"{PATH}::Outer.Inner"]
    m3 = next(c for c in fc.chunks if "def m3" in c.text)
    assert m3.summary_key == f"{PATH}::Outer.Inner" and m3.metadata["parent_nodes"] == ["Outer", "Inner"]
    assert m3.metadata["node_type"] == "FunctionDef" and m3.metadata["node_name"].startswith("m")
    assert m3.metadata["context_header"].startswith("class Outer:\n    class Inner:\n        '''Inner doc.'''") \
        or m3.metadata["context_header"].startswith('class Outer:\n    class Inner:\n        """Inner doc."""')


def test_bad_input() -> None:
    with pytest.raises(SyntaxError):
        chunk_python("def broken(:\n", PATH, 100)
    with pytest.raises(ValueError):
        chunk_python("x = 1\n", PATH, 0)
