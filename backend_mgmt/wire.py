"""Wire encoding: ZeroMQ frames in, typed requests out, and replies back to frames.

No sockets here: functions take and return lists of bytes, so every malformed input can be
tested without a daemon.

A ROUTER socket receives ``[identity, ..., payload]``. Two client styles are accepted, and the
reply repeats the envelope the request came with:
- DEALER (what the original CLI and engine use): ``[identity, payload]``;
- REQ: ``[identity, b"", payload]`` (the empty delimiter frame must come back).
"""

import json
import struct
from dataclasses import dataclass

from . import bounds, errors
from .errors import ServiceError
from .messages import Request, Response

# Requests larger than this get a ``too_large`` error reply. The sockets also set
# zmq.MAXMSGSIZE (HARD_FRAME_LIMIT) so a peer cannot make the daemon buffer gigabytes;
# past that hard limit libzmq drops the connection and no reply is possible.
MAX_REQUEST_BYTES = 64 * 1024
HARD_FRAME_LIMIT = 1024 * 1024


@dataclass(frozen=True)
class Envelope:
    """The routing frames of one request; the reply is sent with the same ones."""
    frames: tuple

    def reply(self, payload: bytes):
        return [*self.frames, payload]


@dataclass(frozen=True)
class ControlRequest:
    command: str
    params: dict
    correlation_id: object  # echoed back as sent (the original uses a UUID string)


class BadFrames(ServiceError):
    """Frames that are not one request. ``envelope``: the routing frames recovered from them
    (None: none), so the caller can still reply."""

    def __init__(self, message, envelope):
        super().__init__(errors.BAD_FRAMES, message)
        self.envelope = envelope


class BadRequest(ServiceError):
    """A control request refused while it is parsed. ``correlation_id``: the one it names,
    once that much is known, for the reply to echo."""

    def __init__(self, code, message, correlation_id=None):
        super().__init__(code, message)
        self.correlation_id = correlation_id


def split_envelope(frames):
    """Split received frames into (Envelope, payload). Raises BadFrames, which carries the
    Envelope where one can be recovered, so the caller can reply."""
    if len(frames) == 2:
        return Envelope((frames[0],)), frames[1]
    if len(frames) == 3 and frames[1] == b"":
        return Envelope((frames[0], b"")), frames[2]
    envelope = None
    if len(frames) >= 2 and b"" in frames[1:]:
        cut = frames.index(b"", 1)
        envelope = Envelope(tuple(frames[:cut + 1]))
    elif frames:
        envelope = Envelope((frames[0],))
    raise BadFrames(f"expected one payload frame, got {max(len(frames) - 1, 0)} frames",
                    envelope)


def parse_control(payload: bytes) -> ControlRequest:
    """Decode one control request payload (UTF-8 JSON). Raises BadRequest."""
    if len(payload) > MAX_REQUEST_BYTES:
        raise BadRequest(errors.TOO_LARGE,
                         f"request of {len(payload)} bytes exceeds the limit of "
                         f"{MAX_REQUEST_BYTES} bytes")
    try:
        message = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest(errors.BAD_JSON, f"request is not UTF-8 JSON: {exc}") from None
    except RecursionError:
        raise BadRequest(errors.BAD_JSON, "request is nested too deeply") from None
    if not isinstance(message, dict):
        raise BadRequest(errors.BAD_REQUEST,
                         f"request must be a JSON object, not {type(message).__name__}")
    try:
        correlation_id = bounds.correlation_id(message.get("correlation_id"))
    except ValueError as exc:
        # Not echoed: a reply must always encode, whatever a client sent.
        raise BadRequest(errors.BAD_REQUEST, str(exc)) from None
    command = message.get("command")
    if command is None:
        raise BadRequest(errors.MISSING_PARAM, "request has no 'command'", correlation_id)
    if not isinstance(command, str):
        raise BadRequest(errors.BAD_REQUEST, "'command' must be a string", correlation_id)
    params = message.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise BadRequest(errors.BAD_REQUEST, "'params' must be a JSON object",
                         correlation_id)
    return ControlRequest(command=command, params=params, correlation_id=correlation_id)


def encode_success(correlation_id, data) -> bytes:
    return _dump({"correlation_id": correlation_id, "success": True, "data": data})


def encode_success_json(correlation_id, data_json: str) -> bytes:
    """A success reply whose data is already encoded JSON text: the bytes encode_success
    gives, joined in one copy (status sends this, several kilobytes, per request)."""
    return b"".join((b'{"correlation_id":', _dump(correlation_id), b',"success":true,"data":',
                     data_json.encode("utf-8"), b"}"))


def encode_error(correlation_id, code, message, data=None) -> bytes:
    reply = {"correlation_id": correlation_id, "success": False, "error": message, "code": code}
    if data:
        reply["data"] = data
    return _dump(reply)


# Made once: json.dumps with any option builds a new encoder per call, which costs more than
# encoding a small reply. Same output as json.dumps(obj, separators=(",", ":"), default=str).
to_json = json.JSONEncoder(separators=(",", ":"), default=str).encode


def _dump(obj) -> bytes:
    return to_json(obj).encode("utf-8")


def encode_control_request(command, params=None, correlation_id=None) -> bytes:
    """The client side of the control protocol (used by the CLI and the tests)."""
    return _dump({"command": command, "params": params or {}, "correlation_id": correlation_id})


def decode_control_reply(payload: bytes) -> dict:
    reply = json.loads(payload.decode("utf-8"))
    if not isinstance(reply, dict) or "success" not in reply:
        raise ValueError("not a control reply")
    return reply


# --- the client handshake (protobuf) ---------------------------------------------------

def parse_handshake(payload: bytes) -> str:
    """The model a handshake Request names ("" when it names none). Raises ServiceError."""
    if len(payload) > MAX_REQUEST_BYTES:
        raise ServiceError(errors.TOO_LARGE, f"handshake of {len(payload)} bytes is too large")
    try:
        request = Request.FromString(payload)
    except Exception as exc:  # protobuf raises DecodeError, or others on some runtimes
        raise ServiceError(errors.BAD_REQUEST, f"handshake is not a valid Request: {exc}") from None
    if len(request.requested_model) > bounds.MAX_NAME_LENGTH:
        raise ServiceError(errors.BAD_PARAM, f"requested_model must be at most "
                                             f"{bounds.MAX_NAME_LENGTH} characters")
    return request.requested_model


def encode_handshake_reply(endpoint="", protocols=(), error_message="") -> bytes:
    return Response(protocols=list(protocols), model_ipc_endpoint=endpoint,
                    error_message=error_message).SerializeToString()


# -- socket monitor messages ---------------------------------------------------------------

_MONITOR_EVENT = struct.Struct("=HI")    # a monitor message's first frame: event id, value


def monitor_event(first_frame):
    """(event id, value) from a socket monitor message's first frame: what pyzmq's
    parse_monitor_message reads, without importing it (zmq.utils.monitor imports asyncio:
    30 ms of start-up) nor building its enum and dict per event. For ACCEPTED and
    DISCONNECTED the value is the connection's descriptor."""
    return _MONITOR_EVENT.unpack_from(first_frame)
