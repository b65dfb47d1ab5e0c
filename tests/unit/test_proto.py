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
    ok = proto.parse_table1({"command": "initiate_cognitive_cycle", "target_oid": "0",
                             "mission_brief": {"type": "unhandled_message", "selector": "greet",
                                               "args": [], "kwargs": {}}})
    assert ok.mission_brief.selector == "greet" and ok.schema_version == proto.TABLE1_SCHEMA_VERSION
    for bad in ({"command": "x"}, {"command": "x", "target_oid": 0, "mission_brief": {}},
                {"command": "x", "target_oid": "0", "mission_brief": {"type": "t", "selector": "s",
                                                                     "args": {}, "kwargs": {}}}):
        with pytest.raises(ProtocolError) as e:
            proto.parse_table1(bad)
        assert e.value.code == ErrorCode.BAD_ARGS


def test_bytes_travel_as_bytes():
    req = proto.request("memory", "blob_put", {"data": b"\x00\xffadapter", "meta": {"k": 1}})
    assert proto.decode(proto.encode(req)).body["data"] == b"\x00\xffadapter"
