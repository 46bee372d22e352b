"""The reference backend on its own, as a client of a backend would see it."""

import signal
import time

import pytest
import zmq

from backend_mgmt.messages import Ping, Pong, Request, Response, Sleep, SleepState
from harness import ping_backend


def test_handshake_then_ping(reference_backend):
    process, endpoint = reference_backend()
    context = zmq.Context()
    try:
        pong = ping_backend(context, endpoint, "x" * 1000, 2**32 - 1)
        assert pong.message == "x" * 1000 and pong.correlation_id == 2**32 - 1
    finally:
        context.destroy(linger=0)


def test_handshake_naming_another_model_is_refused(reference_backend):
    process, endpoint = reference_backend()
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.connect(endpoint)
    try:
        sock.send(Request(requested_model="other").SerializeToString())
        assert sock.poll(5000)
        assert "serves org/model, not other" in Response.FromString(sock.recv()).error_message
    finally:
        sock.close(linger=0)
        context.destroy(linger=0)


def test_sigterm_stops_it_with_code_0(reference_backend):
    process, endpoint = reference_backend()
    process.send_signal(signal.SIGTERM)
    assert process.wait(15) == 0          # 5 s was once too short on a loaded machine
    assert "stopped by SIGTERM" in process.stdout.read()


def test_fail_at_start(reference_backend):
    process, endpoint = reference_backend("--fail-at-start", "9")
    assert process.wait(5) == 9


# -- the sleep protocol ------------------------------------------------------------------------

class Client:
    """A DEALER that has shaken hands with a backend; its protocols by name."""

    def __init__(self, context, endpoint):
        self.sock = context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.sock.send(Request().SerializeToString())
        assert self.sock.poll(5000), "no handshake answer"
        self.protocols = list(Response.FromString(self.sock.recv()).protocols)

    def send(self, protocol, message):
        self.sock.send_multipart([bytes([self.protocols.index(protocol)]),
                                  message.SerializeToString()])

    def receive(self, timeout=5.0):
        """(protocol name, payload) of the next answer."""
        assert self.sock.poll(int(timeout * 1000)), "no answer"
        index, payload = self.sock.recv_multipart()
        return self.protocols[index[0]], payload

    def sleep_request(self, action, correlation_id=1):
        self.send("sleep", Sleep(correlation_id=correlation_id, action=action))
        protocol, payload = self.receive()
        assert protocol == "sleep"
        return SleepState.FromString(payload)


@pytest.fixture
def client(reference_backend):
    context = zmq.Context()
    clients = []

    def connect(*options):
        _, endpoint = reference_backend(*options)
        clients.append(Client(context, endpoint))
        return clients[-1]
    yield connect
    for made in clients:
        made.sock.close(linger=0)
    context.destroy(linger=0)


def test_sleep_wake_and_state_while_pings_go_on(client):
    backend = client()
    assert backend.protocols == ["ping", "sleep"]
    assert not backend.sleep_request(Sleep.STATE, 1).asleep
    state = backend.sleep_request(Sleep.SLEEP, 2)
    assert (state.correlation_id, state.asleep, state.error_message) == (2, True, "")
    assert backend.sleep_request(Sleep.STATE, 3).asleep
    backend.send("ping", Ping(correlation_id=4, message="asleep?"))
    assert backend.receive() == ("ping", Pong(correlation_id=4,
                                              message="asleep?").SerializeToString())
    state = backend.sleep_request(Sleep.WAKE, 5)
    assert (state.correlation_id, state.asleep, state.error_message) == (5, False, "")


def test_a_slow_sleep_does_not_hold_up_pings(client):
    backend = client("--sleep-delay", "1.5")
    started = time.monotonic()
    backend.send("sleep", Sleep(correlation_id=9, action=Sleep.SLEEP))
    backend.send("ping", Ping(correlation_id=10))
    assert backend.receive()[0] == "ping" and time.monotonic() - started < 1.0
    protocol, payload = backend.receive()
    assert protocol == "sleep" and SleepState.FromString(payload).asleep
    assert time.monotonic() - started >= 1.5


def test_failing_sleep_and_wake_answer_with_an_error(client):
    backend = client("--sleep-fail")
    state = backend.sleep_request(Sleep.SLEEP)
    assert "sleep failed" in state.error_message and not state.asleep
    backend = client("--wake-fail")
    assert backend.sleep_request(Sleep.SLEEP).asleep
    state = backend.sleep_request(Sleep.WAKE)
    assert "wake failed" in state.error_message and state.asleep


def test_no_sleep_lists_only_ping(client):
    assert client("--no-sleep").protocols == ["ping"]
    assert client("--no-ping").protocols == []
