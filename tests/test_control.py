"""The control endpoint in-process: a real ROUTER on an ipc:// path, a real DEALER client, and
a command table made for each test (the daemon's commands are tested through the daemon)."""

import json
import os
import shutil
import time

import pytest
import zmq

from backend_mgmt import control, errors, metrics, wire
from backend_mgmt.errors import ServiceError
from harness import short_tempdir


class Endpoint:
    """A ControlEndpoint on its own socket, and a client to talk to it."""

    def __init__(self, path, commands, stopping=False):
        self.context = zmq.Context()
        address = "ipc://" + path
        server = self.context.socket(zmq.ROUTER)
        server.setsockopt(zmq.LINGER, 0)
        server.bind(address)
        self.requests = {"control": 0, "handshake": 0, "errors": 0}
        self.durations = metrics.Histogram()
        self.later = []          # replies a command keeps, to answer after it returned
        self.endpoint = control.ControlEndpoint(
            server, commands, self, self.requests, self.durations, lambda: stopping)
        self.client = self.context.socket(zmq.DEALER)
        self.client.setsockopt(zmq.LINGER, 0)
        self.client.connect(address)

    def ask(self, *frames):
        """Send ``frames`` (a DEALER adds nothing; the ROUTER adds the identity), let the
        endpoint handle what arrived, and return every reply that came back."""
        self.client.send_multipart(list(frames))
        assert self.endpoint.socket.poll(5000), "the request did not arrive"
        self.endpoint.on_readable()
        return self.replies()

    def replies(self, wait_ms=200):
        received = []
        while self.client.poll(wait_ms):
            received.append(self.client.recv_multipart())
            wait_ms = 50                 # a second reply would follow at once
        return received

    def close(self):
        self.endpoint.socket.close(linger=0)
        self.client.close(linger=0)
        self.context.term()


@pytest.fixture
def make():
    made = []
    directory = short_tempdir()

    def factory(commands, stopping=False):
        made.append(Endpoint(os.path.join(directory, f"{len(made)}.sock"), commands, stopping))
        return made[-1]
    yield factory
    for endpoint in made:
        endpoint.close()
    shutil.rmtree(directory, ignore_errors=True)


def request(command, correlation_id="c1", params=None):
    return wire.encode_control_request(command, params, correlation_id)


def decoded(replies):
    assert len(replies) == 1, f"expected exactly one reply, got {replies}"
    (payload,) = replies[0]          # a DEALER sees the payload alone
    return json.loads(payload)


def test_a_second_reply_to_one_request_is_dropped(make):
    def twice(parts, params, reply):
        reply.ok({"first": True})
        reply.ok({"second": True})
        reply.fail(ServiceError(errors.INTERNAL, "and a third"))
    endpoint = make({"twice": twice})
    reply = decoded(endpoint.ask(request("twice")))
    assert reply == {"correlation_id": "c1", "success": True, "data": {"first": True}}
    assert endpoint.durations.series["twice"][-1] > 0     # timed once the reply went out


def test_a_reply_kept_for_later_goes_out_once_with_its_correlation_id(make):
    def keep(parts, params, reply):
        parts.later.append(reply)
    endpoint = make({"keep": keep})
    assert endpoint.ask(request("keep", correlation_id=42)) == []
    (reply,) = endpoint.later
    reply.ok({"done": 1})
    reply.ok({"done": 2})
    assert decoded(endpoint.replies()) == {"correlation_id": 42, "success": True,
                                           "data": {"done": 1}}


def test_requests_still_waiting_are_answered_when_the_daemon_goes(make, caplog):
    """A restart answers what still waits (an unload-model waiting for its process) with the
    retryable shutting_down; requests answered already are left alone, and the handler's
    late answer is dropped without a complaint."""
    def keep(parts, params, reply):
        parts.later.append(reply)

    def at_once(parts, params, reply):
        reply.ok({"now": True})
    endpoint = make({"keep": keep, "at-once": at_once})
    assert endpoint.ask(request("keep", correlation_id="waits")) == []
    assert decoded(endpoint.ask(request("at-once", correlation_id="done")))["success"]
    endpoint.endpoint.answer_waiting(ServiceError(errors.SHUTTING_DOWN, "restarting"))
    assert decoded(endpoint.replies()) == {"correlation_id": "waits", "success": False,
                                           "code": "shutting_down", "error": "restarting"}
    caplog.set_level("DEBUG", logger="backend_mgmt.control")
    endpoint.later[0].ok({"too": "late"})
    endpoint.endpoint.answer_waiting(ServiceError(errors.SHUTTING_DOWN, "again"))
    assert endpoint.replies() == [] and caplog.records == []


def test_a_refusal_becomes_an_error_reply_with_its_code_and_data(make):
    def refuse(parts, params, reply):
        raise ServiceError(errors.UNKNOWN_MODEL, "no model x", data={"model": "x"})
    endpoint = make({"refuse": refuse})
    reply = decoded(endpoint.ask(request("refuse")))
    assert reply == {"correlation_id": "c1", "success": False, "error": "no model x",
                     "code": errors.UNKNOWN_MODEL, "data": {"model": "x"}}
    assert endpoint.requests == {"control": 1, "handshake": 0, "errors": 1}


def test_a_bug_in_a_command_becomes_an_internal_error_without_its_details(make):
    def broken(parts, params, reply):
        raise KeyError("secret detail")
    endpoint = make({"broken": broken})
    reply = decoded(endpoint.ask(request("broken")))
    assert (reply["success"], reply["code"], reply["correlation_id"]) == (
        False, errors.INTERNAL, "c1")
    assert "secret detail" not in json.dumps(reply)


def test_a_bug_after_the_reply_went_out_sends_no_second_one(make):
    def answers_then_breaks(parts, params, reply):
        reply.ok({})
        raise RuntimeError("after the reply")
    endpoint = make({"x": answers_then_breaks})
    assert decoded(endpoint.ask(request("x")))["success"] is True


def test_a_request_refused_while_parsed_echoes_its_id_and_nothing_internal(make):
    endpoint = make({})
    reply = decoded(endpoint.ask(b'{"command": "status", "params": [], "correlation_id": "c9"}'))
    assert reply == {"correlation_id": "c9", "success": False, "code": errors.BAD_REQUEST,
                     "error": "'params' must be a JSON object"}


def test_bad_frames_are_answered_on_the_envelope_they_came_with(make):
    endpoint = make({})
    (reply,) = endpoint.ask(b"one", b"two")          # two payload frames: not a request
    assert len(reply) == 1
    answer = json.loads(reply[0])
    assert (answer["code"], answer["correlation_id"]) == (errors.BAD_FRAMES, None)
    assert "data" not in answer                      # the envelope stays in the daemon


def test_unknown_commands_and_commands_while_stopping(make):
    endpoint = make({"status": lambda parts, params, reply: reply.ok("up")}, stopping=True)
    assert decoded(endpoint.ask(request("status")))["data"] == "up"
    refused = decoded(endpoint.ask(request("load-model")))
    assert refused["code"] == errors.SHUTTING_DOWN
    endpoint = make({"status": lambda parts, params, reply: reply.ok("up")})
    unknown = decoded(endpoint.ask(request("nope")))
    assert unknown["code"] == errors.UNKNOWN_COMMAND and "known: status" in unknown["error"]


def test_a_reply_that_cannot_go_out_is_dropped_never_raised(make, caplog):
    """The peer is gone (a ROUTER that must route says so with EHOSTUNREACH), or the socket
    closed before a late answer: the answer is dropped, and the loop never sees an error."""
    kept = []
    endpoint = make({"later": lambda parts, params, reply: kept.append(reply)})
    assert endpoint.ask(request("later")) == []
    endpoint.endpoint.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
    endpoint.client.close(linger=0)
    gone = time.monotonic() + 5                  # the ROUTER forgets the peer once it is gone
    while time.monotonic() < gone:
        try:
            endpoint.endpoint.socket.send_multipart([kept[0].envelope.frames[0], b"probe"],
                                                    zmq.NOBLOCK)
        except zmq.ZMQError:
            break
        time.sleep(0.02)
    with caplog.at_level("DEBUG", logger="backend_mgmt.router"):
        kept[0].ok({})                            # EHOSTUNREACH: dropped
    assert "control reply dropped" in caplog.text
    endpoint.endpoint.socket.close(linger=0)
    kept[0].sent = False
    kept[0].ok({})                                # closed: nothing sent, nothing raised


def test_a_wake_up_with_nothing_queued_reads_nothing_and_raises_nothing(make):
    """The loop calls on_readable when its poll found the socket readable; should another
    handler have read it meanwhile, or the socket be closed, there is nothing to do."""
    endpoint = make({"status": lambda parts, params, reply: reply.ok({})})
    endpoint.endpoint.on_readable()
    assert endpoint.requests["control"] == 0
    assert decoded(endpoint.ask(request("status")))["success"]
    endpoint.endpoint.socket.close(linger=0)
    endpoint.endpoint.on_readable()
