import json

import pytest

from backend_mgmt import wire
from backend_mgmt.errors import ServiceError
from backend_mgmt.messages import Request, Response


def test_dealer_and_req_envelopes():
    envelope, payload = wire.split_envelope([b"id", b"{}"])
    assert payload == b"{}" and envelope.reply(b"r") == [b"id", b"r"]
    envelope, payload = wire.split_envelope([b"id", b"", b"{}"])
    assert envelope.reply(b"r") == [b"id", b"", b"r"]


@pytest.mark.parametrize("frames, reply_frames", [
    ([b"id"], [b"id"]),
    ([b"id", b"a", b"b"], [b"id"]),
    ([b"id", b"", b"a", b"b"], [b"id", b""]),
    ([], None),
])
def test_wrong_frame_counts(frames, reply_frames):
    with pytest.raises(ServiceError) as caught:
        wire.split_envelope(frames)
    assert caught.value.code == "bad_frames"
    envelope = caught.value.envelope
    assert (envelope.frames if envelope else None) == \
        (tuple(reply_frames) if reply_frames else None)


@pytest.mark.parametrize("payload, code", [
    (b"{", "bad_json"), (b"\xff", "bad_json"), (b"1", "bad_request"), (b"{}", "missing_param"),
    (b'{"command": []}', "bad_request"), (b'{"command": "x", "params": 1}', "bad_request"),
    (b" " * (wire.MAX_REQUEST_BYTES + 1), "too_large"),
])
def test_parse_control_errors(payload, code):
    with pytest.raises(ServiceError) as caught:
        wire.parse_control(payload)
    assert caught.value.code == code


def test_parse_control_round_trip():
    request = wire.parse_control(wire.encode_control_request("load-model", {"model_name": "m"},
                                                             "c1"))
    assert (request.command, request.params, request.correlation_id) == (
        "load-model", {"model_name": "m"}, "c1")
    assert wire.parse_control(b'{"command": "status", "params": null}').params == {}


def test_replies():
    assert json.loads(wire.encode_success("c", {"a": 1})) == {
        "correlation_id": "c", "success": True, "data": {"a": 1}}
    assert json.loads(wire.encode_error("c", "bad_json", "no")) == {
        "correlation_id": "c", "success": False, "error": "no", "code": "bad_json"}


def test_handshake_messages():
    assert wire.parse_handshake(b"") == ""
    assert wire.parse_handshake(Request(requested_model="m").SerializeToString()) == "m"
    with pytest.raises(ServiceError):
        wire.parse_handshake(b"\xff\xff")
    reply = Response.FromString(wire.encode_handshake_reply("ipc://x", ["ping"]))
    assert reply.model_ipc_endpoint == "ipc://x" and list(reply.protocols) == ["ping"]


def test_handshake_wire_bytes_match_the_original_proto():
    # field 1 (requested_model), length-delimited: tag 0x0a
    assert Request(requested_model="ab").SerializeToString() == b"\x0a\x02ab"
    assert Response(protocols=["p"], model_ipc_endpoint="e", error_message="x"
                    ).SerializeToString() == b"\x0a\x01p\x12\x01e\x1a\x01x"
