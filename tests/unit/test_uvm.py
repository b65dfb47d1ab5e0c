"""UvmObject: slots, delegation, method slots, DoesNotUnderstand, OIDs, awakening."""

from __future__ import annotations

import pickle

import pytest
import transaction
import ZODB
from persistent.mapping import PersistentMapping

from batos.uvm import (
    PROTOTYPE_NAMES,
    BoundMethod,
    DoesNotUnderstand,
    MethodNotRunnable,
    UvmObject,
    awaken,
    normalize_oid,
    oid_hex,
    prototype_of,
    resolve_oid,
)


@pytest.fixture
def db():
    d = ZODB.DB(None)  # in-memory MappingStorage: pickling and OIDs without a server
    yield d
    d.close()


def test_slots_and_attribute_access():
    o = UvmObject("thing", colour="red")
    assert o.get_slot("colour") == "red"
    assert o.colour == "red"
    o.size = 3  # non-underscore assignment becomes a slot
    assert o.own_slots() == {"colour": "red", "size": 3}
    assert o.has_slot("size") and not o.has_slot("nope")
    o.del_slot("size")
    assert o.slot_names() == ["colour"]
    with pytest.raises(ValueError):
        o.set_slot("_hidden", 1)
    with pytest.raises(ValueError):
        o.set_slot("clone", 1)  # reserved by the class


def test_delegation_order_depth_first_left_to_right_and_cycles():
    top = UvmObject("top", x="top", only_top=1)
    left = UvmObject("left", parents=[top])
    right = UvmObject("right", x="right")
    child = UvmObject("child", parents=[left, right])
    # depth-first: left -> top (has x) is visited before right
    assert child.lookup("x") == "top"
    assert child.only_top == 1
    child.x = "own"
    assert child.x == "own"
    top.add_parent(child)  # a cycle must not hang
    with pytest.raises(DoesNotUnderstand):
        child.lookup("missing")


def test_does_not_understand_carries_selector_but_underscore_names_do_not():
    o = UvmObject("o")
    with pytest.raises(DoesNotUnderstand) as ei:
        _ = o.frobnicate
    assert ei.value.selector == "frobnicate"
    assert isinstance(ei.value, AttributeError)
    with pytest.raises(AttributeError) as ei2:
        _ = o._private_thing
    assert not isinstance(ei2.value, DoesNotUnderstand)
    assert not hasattr(o, "__wrapped__")
    with pytest.raises(DoesNotUnderstand):
        o.send("missing", 1)


def test_methods_bound_to_receiver_and_versioned():
    proto = UvmObject("proto", greeting="hello")
    proto.define_method("greet", "def greet(self, who):\n    return f'{self.greeting}, {who}'\n", author="test")
    child = proto.clone(greeting="hi")
    found = child.lookup("greet")
    assert isinstance(found, BoundMethod)  # data about the method, bound to the receiver, not the owner
    assert found.receiver is child and found.owner is proto and found.version == 1
    assert found.info().signature == "greet(self, who)"
    proto.define_method("greet", "def greet(self, who):\n    return who.upper()\n")
    assert proto.method_source("greet").version == 2
    assert child.lookup("greet").source.endswith("return who.upper()\n")
    assert child.method_source("greet").meta.get("defined_at")
    assert child.method_names() == []
    assert child.responds_to("greet") and not child.responds_to("nope")


@pytest.mark.parametrize(
    "src",
    ["def other(self):\n    return 1\n", "def greet(:\n", "greet = lambda self: 1\n", "def greet():\n    return 1\n"],
)
def test_define_method_rejects_bad_source(src):
    with pytest.raises(ValueError):
        UvmObject("o").define_method("greet", src)


HOSTILE_DEFAULTS = [
    "def m(self, x=open({marker!r}, 'w').write('ran')):\n    return x\n",
    "def m(self, x=[open({marker!r}, 'w') for _ in [0]]):\n    return x\n",
    "@(lambda f: open({marker!r}, 'w') and f)\ndef m(self):\n    return 1\n",
    "def m(self, *, x=__import__('pathlib').Path({marker!r}).write_text('ran')):\n    return x\n",
]


@pytest.mark.parametrize("template", HOSTILE_DEFAULTS)
def test_method_source_is_parsed_never_executed(tmp_path, template):
    """Defaults and decorators are expressions: defining, looking up, describing or sending must not run them."""
    marker = tmp_path / "ran"
    o = UvmObject("o")
    o.define_method("m", template.format(marker=str(marker)))
    found = o.lookup("m")
    assert isinstance(found, BoundMethod) and o.responds_to("m")
    assert found.info().selector == "m"  # described from the AST alone
    with pytest.raises(MethodNotRunnable):
        found()
    with pytest.raises(MethodNotRunnable):
        o.send("m")
    with pytest.raises(MethodNotRunnable):
        o.m()
    assert not marker.exists()


def test_method_info_reads_the_signature_from_the_ast():
    o = UvmObject("o")
    o.define_method("f", 'def f(self, a, b=1 + 2, *rest, k=None, **kw):\n    """Doc."""\n    return a\n')
    info = o.lookup("f").info()
    assert info.params == ("a", "b=1 + 2", "*rest", "k=None", "**kw") and info.doc == "Doc."
    with pytest.raises(ValueError, match="limit"):
        o.define_method("g", "def g(self):\n    return 1\n" + "#" * 30_000)


def test_builtin_selectors_reachable_by_send():
    o = UvmObject("o", a=1)
    assert o.send("get_slot", "a") == 1
    c = o.send("clone", b=2)
    assert c.parents == [o] and c.a == 1 and c.b == 2


def test_persisted_methods_survive_reload_and_oids(db):
    conn = db.open()
    root = conn.root()
    proto = UvmObject("proto", n=1)
    proto.define_method("double", "def double(self):\n    return self.n * 2\n")
    root["obj"] = proto.clone(n=21)
    root["proto"] = proto
    transaction.commit()
    oid = oid_hex(root["obj"])
    conn.close()
    conn2 = db.open()
    obj = resolve_oid(conn2, oid)
    assert obj.lookup("double").source == "def double(self):\n    return self.n * 2\n"
    assert obj.n == 21
    assert oid_hex(conn2.get(b"\0" * 8)) == "0"
    assert resolve_oid(conn2, "0") is conn2.get(b"\0" * 8)
    with pytest.raises(KeyError, match="unknown oid"):
        resolve_oid(conn2, "ffffff")
    with pytest.raises(KeyError, match="unknown oid"):
        resolve_oid(conn2, "not-hex")
    conn2.close()


def test_p_changed_discipline_for_plain_mutable_slots(db):
    conn = db.open()
    root = conn.root()
    root["o"] = UvmObject("o", log=[])
    transaction.commit()
    root["o"].log.append("a")  # in-place: ZODB cannot see this...
    root["o"]._p_changed = True  # ...so the discipline is to say so
    transaction.commit()
    conn.close()
    conn2 = db.open()
    assert conn2.root()["o"].log == ["a"]
    conn2.close()


def test_awaken_idempotent(db):
    conn = db.open()
    root = conn.root()
    assert awaken(root) is True
    transaction.commit()
    protos = root["prototypes"]
    assert set(protos) == set(PROTOTYPE_NAMES)
    ids = {name: p._p_oid for name, p in protos.items()}
    assert awaken(root) is False
    assert {name: p._p_oid for name, p in root["prototypes"].items()} == ids
    chunk = protos["memory_chunk"].clone(source_text="x")
    assert prototype_of(chunk, protos) == "memory_chunk"
    assert protos["brick"].parents == [protos["traits"]]
    assert isinstance(protos, PersistentMapping)
    conn.close()


def test_method_source_pickles():
    o = UvmObject("o")
    m = o.define_method("f", "def f(self):\n    return 1\n")
    m2 = pickle.loads(pickle.dumps(m))
    assert (m2.selector, m2.source, m2.version) == ("f", m.source, 1)


def test_a_large_slot_value_is_not_rewritten_when_its_object_changes(tmp_path):
    from ZODB.FileStorage import FileStorage

    storage = FileStorage(str(tmp_path / "image.fs"))
    db = ZODB.DB(storage)
    conn = db.open()
    big = "x" * (1 << 20)
    conn.root()["o"] = UvmObject("o", blob=big, count=0)
    transaction.commit()
    size = (tmp_path / "image.fs").stat().st_size
    for _ in range(5):
        o = conn.root()["o"]
        o.count = o.count + 1  # one small change to the object that holds the 1 MB slot
        transaction.commit()
    grown = (tmp_path / "image.fs").stat().st_size - size
    assert grown < 50_000, f"5 one-integer changes grew the image by {grown} bytes"
    o = conn.root()["o"]
    assert o.blob == big and o.get_slot("blob") == big and o.own_slots()["blob"] == big and o.count == 5
    o.blob = big  # the same value again: nothing rewritten
    o.blob = "y" * (1 << 17)  # a new large value: only its own record
    transaction.commit()
    conn.close()
    conn2 = db.open()
    assert conn2.root()["o"].blob == "y" * (1 << 17)
    conn2.close()
    db.close()


def test_normalize_oid_gives_the_form_oid_hex_gives(db):
    conn = db.open()
    obj = UvmObject()
    conn.add(obj)
    hexed = oid_hex(obj)
    assert normalize_oid(hexed) == hexed
    assert normalize_oid(f" 0x{hexed.upper().zfill(16)} ") == hexed
    assert normalize_oid("0") == normalize_oid("0x000") == "0"
    assert normalize_oid("0x0001Ab") == "1ab"
    transaction.abort()
    conn.close()


@pytest.mark.parametrize("bad", ["", "0x", "0xg", "-1", "1_0", "+1", "1" * 17, 5, None])
def test_normalize_oid_refuses_what_is_not_a_64_bit_hex_oid(bad):
    with pytest.raises(ValueError, match="bad OID"):
        normalize_oid(bad)
