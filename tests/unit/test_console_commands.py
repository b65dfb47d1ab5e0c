"""Console line parsing: every command's body, quoting, OIDs, literals, Table 1, define sources."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from proto.bodies import kernel as K
from services.console.commands import (
    COMMAND_NAMES,
    SPECS,
    CommandError,
    Local,
    NeedsSource,
    Request,
    help_text,
    literal,
    normalize_oid,
    parse_line,
    split_args,
)

TABLE1 = ('{"command": "initiate_cognitive_cycle", "target_oid": "00A", "mission_brief": '
          '{"type": "unhandled_message", "selector": "greet", "args": [1], "kwargs": {"x": true}}}')


def req(line: str, **kw) -> Request:
    parsed = parse_line(line, **kw)
    assert isinstance(parsed, Request), parsed
    return parsed


@pytest.mark.parametrize("line, command, body", [
    ("status", "status", {}),
    ("STATS", "stats", {}),
    ("display_yourself", "display_yourself", {}),
    ("audit", "audit", {}),
    ("ask what's a UvmObject?", "ask", {"question": "what's a UvmObject?"}),
    ('ask "why  spaces"', "ask", {"question": "why  spaces"}),
    ("search ZODB transaction", "search", {"text": "ZODB transaction"}),  # k's default is Search's
    ("search k=3 'vector shard'", "search", {"text": "vector shard", "k": 3}),
    ("search level=chunks k=2 a=b", "search", {"text": "a=b", "k": 2, "level": "chunks"}),
    ("ask persona=brick how does send work?", "ask", {"question": "how does send work?", "persona": "BRICK"}),
    ("ask x=1 is free text", "ask", {"question": "x=1 is free text"}),
    ("inspect 0", "inspect", {"oid": "0"}),
    ("inspect 0x00FF", "inspect", {"oid": "ff"}),
    ("inspect 000", "inspect", {"oid": "0"}),
    ("trace 3F2504E0-4F89-11D3-9A0C-0305E82C3301", "trace", {"cycle_id": "3f2504e0-4f89-11d3-9a0c-0305e82c3301"}),
    ("forge brick", "forge", {"persona": "BRICK"}),
])
def test_kernel_commands(line, command, body):
    r = req(line)
    assert (r.service, r.command, r.body) == ("kernel", command, body)


def test_ingest_resolves_relative_paths_on_the_console_side(tmp_path: Path):
    assert req("ingest src/pkg", cwd=tmp_path).body == {"path": str((tmp_path / "src/pkg").resolve())}
    assert req("ingest '/a b/c'").body == {"path": "/a b/c"}
    assert req("ingest ~/x").body["path"] == str(Path("~/x").expanduser())


def test_send_parses_literals_and_keywords():
    r = req('send 1a greet "hello world" 42 4.5 [1, "a b", {"k": null}] None true x=1 y="42" z={"a": (1, 2)}')
    assert r.body == {
        "oid": "1a", "selector": "greet",
        "args": ["hello world", 42, 4.5, [1, "a b", {"k": None}], None, True],
        "kwargs": {"x": 1, "y": "42", "z": {"a": [1, 2]}},
    }


def test_send_words_that_are_not_literals_are_strings():
    r = req("send 0 f hello - a.b x=world")
    assert r.body["args"] == ["hello", "-", "a.b"] and r.body["kwargs"] == {"x": "world"}


def test_send_quoted_keyword_is_positional_string():
    assert req("send 0 f 'x=1'").body["args"] == ["x=1"]


@pytest.mark.parametrize("line, fragment", [
    ("send 0", "usage"),
    ("send 0 9bad", "selector"),
    ("send 0 f [1, 2", "unclosed bracket"),
    ("send 0 f 1]", "unbalanced"),
    ("send 0 f 'open", "no closing"),
    ("send 0 f 1j", "complex"),
    ("send 0 f {1, 2}", "set"),
    ("send 0 f 18446744073709551616", "64 bits"),
    ("send 0 f x=1 2", "after keyword"),
    ("send 0 f x=1 x=2", "twice"),
    ("send zz f", "bad OID"),
    ("inspect", "usage"),
    ("inspect 12 13", "usage"),
    ("inspect -1", "bad OID"),
    ("ingest 'a", "bad quoting"),
    ("ingest a b", "usage"),
    ("ask", "usage"),
    ("search k=0 x", "Expected `int` >= 1 - at `$.k`"),  # the kernel's own type says so
    ("search k=3", "usage"),
    ("search level=everything x", "Invalid enum value 'everything' - at `$.level`"),
    ("search k=1 k=2 x", "twice"),
    ("ask persona=bob hi", "unknown persona 'bob'"),
    ("forge bob", "ALFRED"),
    ("trace", "usage"),
    ("trace not-hex!", "usage"),
    ("status now", "takes no arguments"),
    ("frobnicate 1", "unknown command"),
    ("cancel soon", "cancel takes"),
    ("{not json", "not valid JSON"),
    ('{"command": "x"}', "Table 1"),
    ('{"command": "x", "target_oid": "zz", "mission_brief": {"type": "t", "selector": "s", "args": [], '
     '"kwargs": {}}}', "bad OID"),
    ('{"command": "x", "target_oid": "0", "extra": 1, "mission_brief": {"type": "t", "selector": "s", '
     '"args": [], "kwargs": {}}}', "Table 1"),
])
def test_bad_lines_are_clear_errors(line, fragment):
    with pytest.raises(CommandError) as e:
        parse_line(line)
    assert fragment.lower() in str(e.value).lower()


def test_table1_line_is_validated_and_sent_as_command():
    r = req(TABLE1)
    assert r.command == "command" and r.service == "kernel"
    assert r.body == {"command": "initiate_cognitive_cycle", "target_oid": "a", "schema_version": 1,
                      "mission_brief": {"type": "unhandled_message", "selector": "greet", "args": [1],
                                        "kwargs": {"x": True}}}
    assert r.long_running


@pytest.mark.parametrize(("line", "kind", "fields"), [
    ("search k=0 x", K.Search, {"text": "x", "k": 0}),
    ("ask persona=JOKER why", K.Ask, {"question": "why", "persona": "JOKER"}),
    ("trace xyz!", K.Trace, {"cycle_id": "xyz!"}),
    ('{"command": "search", "target_oid": "0", "mission_brief": {"type": "search", "selector": "search", '
     '"args": ["x"], "kwargs": {"k": 0}}}', K.Search, {"text": "x", "k": 0}),
    ('{"command": "initiate_cognitive_cycle", "target_oid": "0", "mission_brief": {"type": "query", '
     '"selector": "ask", "args": ["q"], "kwargs": {"persona": "JOKER"}}}', K.Ask,
     {"question": "q", "persona": "JOKER"}),
])
def test_the_console_refuses_with_the_kernels_own_type_and_message(line, kind, fields):
    """One set of argument rules: a convenience line and a raw Table 1 line are refused by the kernel's request
    type, with msgspec's message naming the field -- the message the kernel's worker would give."""
    with pytest.raises(msgspec.ValidationError) as expected:
        msgspec.convert(fields, kind)
    with pytest.raises(CommandError) as got:
        parse_line(line)
    assert str(expected.value) in str(got.value)


def test_every_console_request_is_the_kernels_type_and_its_table1_object_reads_back():
    for line in ("ask why", "search k=3 x", "inspect 0x1a", "send 0 greet 1 a=2", "stats", "audit", "verify repair",
                 "forge brick", "watch", "trace abcd", "display_yourself", "status"):
        r = req(line)
        assert type(r.call).__module__ == "proto.bodies.kernel"
        if not isinstance(r.call, K.KernelStatus):
            assert K.request_of(K.table1_of(r.call)) == r.call


def test_local_commands_and_blank_lines():
    assert parse_line("   ") is None
    assert parse_line("# a comment") is None
    assert parse_line("quit") == Local("quit")
    assert parse_line("exit") == Local("quit")
    assert parse_line("help send") == Local("help", "send")
    assert parse_line("cancel") == Local("cancel", "")
    assert parse_line("cancel [3]") == Local("cancel", "3")
    assert parse_line("cancel all") == Local("cancel", "all")


def test_define_from_following_lines():
    pending = parse_line("define 0 greet")
    assert pending == NeedsSource("0", "greet")
    r = pending.finish(["def greet(self, name):", "    return 'hi ' + name"])
    assert r.command == "define"
    assert r.body == {"oid": "0", "selector": "greet", "source": "def greet(self, name):\n    return 'hi ' + name\n"}
    with pytest.raises(CommandError, match="no source"):
        pending.finish(["", "  "])


def test_define_from_file(tmp_path: Path):
    (tmp_path / "m.py").write_text("def area(self):\n    return self.w * self.h\n")
    r = req("define 2b area @m.py", cwd=tmp_path)
    assert r.body == {"oid": "2b", "selector": "area", "source": "def area(self):\n    return self.w * self.h\n"}
    with pytest.raises(CommandError, match="cannot read"):
        parse_line("define 2b area @missing.py", cwd=tmp_path)
    with pytest.raises(CommandError, match="@FILE"):
        parse_line("define 2b area m.py", cwd=tmp_path)


def test_split_args_keeps_brackets_and_inner_quotes():
    words = split_args('a "b c" [1, "x y"] k={"z": 1} \'q\'')
    assert [w.text for w in words] == ["a", "b c", '[1, "x y"]', 'k={"z": 1}', "q"]
    assert [w.quoted for w in words] == [False, True, False, False, True]


@pytest.mark.parametrize("text, value", [
    ("1", 1), ("-2.5", -2.5), ("'s'", "s"), ("true", True), ("null", None), ("None", None),
    ("(1, 2)", [1, 2]), ('{"a": [1]}', {"a": [1]}), ("b'x'", b"x"), ("word", "word"), ("1+", "1+"),
])
def test_literal(text, value):
    assert literal(text) == value


def test_literal_quoted_is_string():
    assert literal("42", quoted=True) == "42"


def test_normalize_oid_is_the_uvm_rule_with_the_console_error():
    assert normalize_oid("0x0001Ab") == "1ab"
    with pytest.raises(CommandError, match="bad OID"):
        normalize_oid("0xg")


def test_help_lists_every_command():
    text = "\n".join(help_text())
    for name in SPECS:
        assert SPECS[name].usage in text
    assert help_text("send")[0].startswith("send OID SELECTOR")
    with pytest.raises(CommandError):
        help_text("nope")
    assert "quit" in COMMAND_NAMES and "exit" in COMMAND_NAMES


def test_long_running_commands():
    assert req("ask x").long_running and req("ingest /x").long_running and req("forge alfred").long_running
    assert not req("search x").long_running and not req("inspect 0").long_running


def test_watch_everything_or_one_id():
    assert parse_line("watch") == Request(K.Watch(), label="watch", resumable=True)
    assert parse_line("watch 1A2B3C4D") == Request(K.Watch(id="1a2b3c4d"), label="watch", resumable=True)
    assert req("watch").long_running
    for bad in ("watch zz", "watch 1a2b 3c4d", "watch 1a2"):
        with pytest.raises(CommandError, match="usage: watch"):
            parse_line(bad)
    assert any(line.startswith("watch [ID]") for line in help_text())
