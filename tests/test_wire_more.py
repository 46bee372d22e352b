"""wire.py details the control protocol's clients rely on (fast: part of
packaging/mutation-test); tests/test_wire.py has the basics, tests/test_fuzz.py the properties."""

import json

import pytest

from backend_mgmt import bounds, errors, wire
from backend_mgmt.errors import ServiceError
from backend_mgmt.messages import Request, Response


@pytest.mark.parametrize("frames, envelope", [
    ([b"id", b"", b"a", b""], (b"id", b"")),            # cut at the first delimiter
    ([b"id", b"x", b"", b"a"], (b"id", b"x", b"")),     # a longer envelope, kept for the reply
    ([b"", b"a", b"b"], (b"",)),                       # the identity itself empty: no delimiter
    ([b"id", b"a", b"b", b"c"], (b"id",)),
])
def test_bad_frames_keep_an_envelope_to_reply_with(frames, envelope):
    with pytest.raises(ServiceError) as caught:
        wire.split_envelope(frames)
    assert caught.value.code == errors.BAD_FRAMES
    assert caught.value.envelope.frames == envelope
    assert caught.value.message == \
        f"expected one payload frame, got {len(frames) - 1} frames"


def test_no_frames_at_all():
    with pytest.raises(ServiceError) as caught:
        wire.split_envelope([])
    assert caught.value.envelope is None
    assert caught.value.message == "expected one payload frame, got 0 frames"


def test_a_three_frame_message_is_req_only_with_an_empty_delimiter():
    with pytest.raises(ServiceError):
        wire.split_envelope([b"id", b"x", b"{}"])
    envelope, payload = wire.split_envelope([b"", b"", b"{}"])
    assert envelope.frames == (b"", b"") and payload == b"{}"


def test_replies_are_compact_json_with_every_field():
    assert wire.encode_success("c", {"a": [1, 2]}) == \
        b'{"correlation_id":"c","success":true,"data":{"a":[1,2]}}'
    assert wire.encode_success_json("c", '{"a": 1}') == \
        b'{"correlation_id":"c","success":true,"data":{"a": 1}}'
    assert wire.encode_success_json(None, "{}") == \
        b'{"correlation_id":null,"success":true,"data":{}}'
    assert wire.encode_success_json("\u00e9", "[]").decode("utf-8") == \
        '{"correlation_id":"\\u00e9","success":true,"data":[]}'
    assert wire.encode_error("c", "bad_json", "no", {"x": 1}) == \
        b'{"correlation_id":"c","success":false,"error":"no","code":"bad_json","data":{"x":1}}'
    assert wire.encode_error(7, "internal", "x", {}) == \
        b'{"correlation_id":7,"success":false,"error":"x","code":"internal"}'
    # Anything JSON cannot say is sent as its text, never an exception.
    assert json.loads(wire.encode_success("c", {"v": object}))["data"]["v"] \
        .startswith("<class")


def test_control_requests_and_replies_round_trip():
    assert wire.encode_control_request("status") == \
        b'{"command":"status","params":{},"correlation_id":null}'
    reply = wire.decode_control_reply(wire.encode_error("c", "bad_json", "no"))
    assert reply == {"correlation_id": "c", "success": False, "error": "no", "code": "bad_json"}
    assert wire.decode_control_reply(wire.encode_success("c", {}))["success"] is True
    for payload in (b"[1]", b'{"correlation_id": 1}', b"1"):
        with pytest.raises(ValueError):
            wire.decode_control_reply(payload)
    with pytest.raises(ValueError):
        wire.decode_control_reply(b"\xff")


def test_error_messages_say_what_is_wrong():
    with pytest.raises(ServiceError) as caught:
        wire.parse_control(b" " * (wire.MAX_REQUEST_BYTES + 1))
    assert caught.value.message == "request of 65537 bytes exceeds the limit of 65536 bytes"
    wire.parse_control(b'{"command": "status"}' + b" " * (wire.MAX_REQUEST_BYTES - 21))
    with pytest.raises(ServiceError) as caught:
        wire.parse_control(b"[" * 100000)
    assert caught.value.code == errors.TOO_LARGE
    with pytest.raises(ServiceError) as caught:
        wire.parse_control(b"[" * 60000)
    assert (caught.value.code, caught.value.message) == (
        errors.BAD_JSON, "request is nested too deeply")
    with pytest.raises(ServiceError) as caught:
        wire.parse_control(b'{"command": 1, "correlation_id": "c"}')
    assert caught.value.message == "'command' must be a string"
    assert caught.value.correlation_id == "c" and caught.value.data is None
    with pytest.raises(ServiceError) as caught:
        wire.parse_control(b'{"correlation_id": "c"}')
    assert caught.value.message == "request has no 'command'"
    assert caught.value.correlation_id == "c" and caught.value.data is None
    with pytest.raises(ServiceError) as caught:
        wire.parse_control(b'{"command": "x", "params": [], "correlation_id": "c"}')
    assert caught.value.message == "'params' must be a JSON object"
    assert caught.value.correlation_id == "c" and caught.value.data is None
    with pytest.raises(ServiceError) as caught:
        wire.parse_control(b"5")
    assert caught.value.message == "request must be a JSON object, not int"


def test_handshake_limits_and_replies():
    assert wire.parse_handshake(Request(requested_model="m" * bounds.MAX_NAME_LENGTH)
                                .SerializeToString()) == "m" * bounds.MAX_NAME_LENGTH
    with pytest.raises(ServiceError) as caught:
        wire.parse_handshake(Request(requested_model="m" * (bounds.MAX_NAME_LENGTH + 1))
                             .SerializeToString())
    assert caught.value.code == errors.BAD_PARAM
    assert caught.value.message == \
        f"requested_model must be at most {bounds.MAX_NAME_LENGTH} characters"
    with pytest.raises(ServiceError) as caught:
        wire.parse_handshake(b"\x0a" + b"\x00" * wire.MAX_REQUEST_BYTES)
    assert caught.value.code == errors.TOO_LARGE
    assert caught.value.message == f"handshake of {wire.MAX_REQUEST_BYTES + 1} bytes is too large"
    with pytest.raises(ServiceError) as caught:
        wire.parse_handshake(b"\xff\xff")
    assert caught.value.code == errors.BAD_REQUEST
    assert caught.value.message.startswith("handshake is not a valid Request: ")
    assert wire.encode_handshake_reply() == b""
    reply = Response.FromString(wire.encode_handshake_reply(error_message="unknown model"))
    assert (reply.error_message, reply.model_ipc_endpoint, list(reply.protocols)) == \
        ("unknown model", "", [])
    assert wire.encode_handshake_reply("e", ("a", "b")) == b"\x0a\x01a\x0a\x01b\x12\x01e"


@pytest.mark.parametrize("message, code, text, correlation_id", [
    ({"command": "status", "correlation_id": {"a": 1}}, errors.BAD_REQUEST,
     "correlation_id must be a string or a number, not dict", None),
    ({"command": "status", "correlation_id": "x" * 257}, errors.BAD_REQUEST,
     "correlation_id must be at most 256 characters, not 257", None),
    ({"correlation_id": "c1"}, errors.MISSING_PARAM, "request has no 'command'", "c1"),
    ({"command": 5, "correlation_id": "c1"}, errors.BAD_REQUEST,
     "'command' must be a string", "c1"),
    ({"command": "status", "params": [], "correlation_id": 7}, errors.BAD_REQUEST,
     "'params' must be a JSON object", 7),
])
def test_parse_control_says_what_is_wrong_and_keeps_an_echoable_id(message, code, text,
                                                                   correlation_id):
    """An id that cannot be echoed is not (the reply must encode); a good one is kept for
    the error reply of a request that is wrong otherwise, beside the error's data (which goes
    to the client as it is: none here)."""
    with pytest.raises(wire.BadRequest) as caught:
        wire.parse_control(json.dumps(message).encode())
    error = caught.value
    assert (error.code, error.message, error.correlation_id, error.data) == (
        code, text, correlation_id, None)


def test_parse_control_takes_null_params_as_none_given():
    request = wire.parse_control(b'{"command": "status", "params": null, "correlation_id": 3}')
    assert (request.command, request.params, request.correlation_id) == ("status", {}, 3)
