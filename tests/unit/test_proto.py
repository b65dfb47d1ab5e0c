"""The envelope: round trips, validation at the boundary, Table 1."""

from __future__ import annotations

import ormsgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

import proto
from proto import ErrorCode, Kind, ProtocolError


def test_round_trip_request_reply_event_error():
    req = proto.request("kernel", "ask", {"question": "what?"}, idempotent=True)
    back = proto.decode(proto.encode(req))
    assert back == req
    rep = proto.reply(back, {"answer": 42})
    assert proto.decode(proto.encode(rep)).corr == req.id
    ev = proto.event(back, "state", {"state": "REASONING"})
    assert proto.decode(proto.encode(ev)).body == {"event": "state", "state": "REASONING"}
    err = proto.error_for(back, ErrorCode.BAD_ARGS, "nope")
    assert proto.decode(proto.encode(err)).body["code"] == "bad_args"


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b"\xc1", ErrorCode.BAD_FRAME),
        (ormsgpack.packb([1, 2]), ErrorCode.BAD_FRAME),
        (ormsgpack.packb({"v": 2, "id": "a", "kind": "request"}), ErrorCode.BAD_VERSION),
        (ormsgpack.packb({"v": 1, "id": "a", "kind": "nope"}), ErrorCode.BAD_KIND),
        (ormsgpack.packb({"v": 1, "id": 3, "kind": "request"}), ErrorCode.BAD_FRAME),
        (ormsgpack.packb({"v": 1, "id": "a", "kind": "request", "body": []}), ErrorCode.BAD_FRAME),
    ],
)
def test_decode_rejects_with_a_code(frame, code):
    with pytest.raises(ProtocolError) as e:
        proto.decode(frame)
    assert e.value.code == code


def test_partial_keeps_request_id_for_the_error_reply():
    with pytest.raises(ProtocolError) as e:
        proto.decode(ormsgpack.packb({"v": 7, "id": "abc", "kind": "request", "service": "kernel"}))
    assert e.value.partial["id"] == "abc"


@given(st.binary(max_size=200))
def test_decode_never_raises_anything_but_protocol_error(data):
    try:
        env = proto.decode(data)
    except ProtocolError:
        return
    assert env.kind in Kind


def test_table1_valid_and_invalid():
    from proto.bodies.kernel import parse_table1

    ok = parse_table1({"command": "initiate_cognitive_cycle", "target_oid": "0",
                             "mission_brief": {"type": "unhandled_message", "selector": "greet",
                                               "args": [], "kwargs": {}}})
    assert ok.mission_brief.selector == "greet" and ok.schema_version == proto.TABLE1_SCHEMA_VERSION
    for bad in ({"command": "x"}, {"command": "x", "target_oid": 0, "mission_brief": {}},
                {"command": "x", "target_oid": "0", "mission_brief": {"type": "t", "selector": "s",
                                                                     "args": {}, "kwargs": {}}}):
        with pytest.raises(ProtocolError) as e:
            parse_table1(bad)
        assert e.value.code == ErrorCode.BAD_ARGS


def test_bytes_travel_as_bytes():
    req = proto.request("echo", "put", {"data": b"\x00\xffadapter", "meta": {"k": 1}})
    assert proto.decode(proto.encode(req)).body["data"] == b"\x00\xffadapter"


# -- limits: depth, sizes, typed control bodies (issue 13 item 4) ------------------------------


def _with_raw_body(body: bytes, kind: str = "request") -> bytes:
    head = ormsgpack.packb({"v": 1, "id": "deep", "kind": kind, "service": "echo"})
    return bytes([head[0] + 1]) + head[1:] + ormsgpack.packb("body") + body


@pytest.mark.parametrize("depth", [2_000, 100_000])
def test_deep_nesting_is_a_protocol_error_not_a_recursion_error(depth):
    for frame in (b"\x91" * depth + b"\xc0", _with_raw_body(b"\x81\xa1k" * depth + b"\xc0")):
        for decode in (proto.decode, proto.decode_header):
            with pytest.raises(ProtocolError) as e:
                decode(frame)
            assert e.value.code == ErrorCode.BAD_FRAME


def test_body_depth_limit_is_exact():
    def nested(levels: int) -> dict:  # ``levels`` containers, the body map included
        value: object = 1
        for i in range(levels - 1):
            value = [value] if i % 2 else {"k": value}
        return {"k": value}

    ok = proto.request("echo", "echo", nested(proto.MAX_BODY_DEPTH))
    assert proto.decode(proto.encode(ok)).body == ok.body
    deep = proto.encode(proto.request("echo", "echo", nested(proto.MAX_BODY_DEPTH + 1)))
    with pytest.raises(ProtocolError) as e:
        proto.decode(deep)
    assert e.value.partial["id"] and "nested deeper" in e.value.message
    proto.decode_header(deep)  # routing does not read bodies: the worker refuses it, with the id
    wide = proto.request("echo", "echo", {"rows": [{"a": [1, 2]} for _ in range(5_000)]})
    assert len(proto.decode(proto.encode(wide)).body["rows"]) == 5_000  # many containers, shallow


def test_ids_and_names_are_bounded():
    for field, value in (("id", "i" * 200), ("id", ""), ("service", "s" * 200), ("corr", "c" * 200)):
        frame = ormsgpack.packb({"v": 1, "id": "a", "kind": "request", field: value})
        with pytest.raises(ProtocolError):
            proto.decode_header(frame)


def test_invalid_utf8_is_a_protocol_error():
    frame = ormsgpack.packb({"v": 1, "id": "abc", "kind": "request"}).replace(b"abc", b"\xbf\xbf\xbf")
    for decode in (proto.decode, proto.decode_header):
        with pytest.raises(ProtocolError):
            decode(frame)


@pytest.mark.parametrize("body", [{"capacity": 2.5}, {"capacity": float("inf")}, {"capacity": "8"},
                                  {"capacity": -1}, {"capacity": 10**9}, {"capacity": True}, {"pid": "x"},
                                  {"version": ["v"]}, [1, 2], "ready"])
def test_ready_bodies_are_typed(body):
    frame = ormsgpack.packb({"v": 1, "id": "r", "kind": "ready", "service": "echo", "body": body})
    with pytest.raises(ProtocolError) as e:
        proto.decode_ready(frame)
    assert e.value.code == ErrorCode.BAD_ARGS


def test_ready_body_defaults_and_values():
    good = proto.encode(proto.control(Kind.READY, service="echo", body={"capacity": 4, "pid": 7, "version": "1"}))
    assert proto.decode_ready(good) == proto.ReadyBody(capacity=4, pid=7, version="1")
    assert proto.decode_ready(proto.encode(proto.control(Kind.READY, service="echo"))).capacity is None


def test_oversized_frame_is_too_large_and_its_header_still_readable():
    frame = proto.encode(proto.reply(proto.request("echo", "big"), {"data": b"x" * 5000}))
    with pytest.raises(ProtocolError) as e:
        proto.decode(frame, max_bytes=1000)
    assert e.value.code == ErrorCode.TOO_LARGE
    assert proto.peek_header(frame).kind == Kind.REPLY
