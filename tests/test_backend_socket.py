"""The DEALER the probe and the liveness check open to a backend, against a real ROUTER."""

import pytest
import zmq

from backend_mgmt import backend_socket
from backend_mgmt.messages import Request


@pytest.fixture
def context():
    context = zmq.Context()
    yield context
    context.term()          # hangs if a test left a socket open


def test_the_socket_is_set_up_once_for_every_user(context, tmp_path):
    endpoint = f"ipc://{tmp_path}/backend.sock"
    router = context.socket(zmq.ROUTER)
    router.bind(endpoint)
    sock = backend_socket.connect(context, endpoint, "probe", reconnect_ms=(5, 20))
    try:
        assert sock.getsockopt(zmq.LINGER) == 0
        assert sock.getsockopt(zmq.MAXMSGSIZE) == backend_socket.MAX_MESSAGE
        assert (sock.getsockopt(zmq.RECONNECT_IVL), sock.getsockopt(zmq.RECONNECT_IVL_MAX)) \
            == (5, 20)
        backend_socket.send_handshake(sock, "demo")
        assert router.poll(5000)
        identity, payload = router.recv_multipart()
        assert identity.startswith(b"probe-") and len(identity) == len("probe-") + 32
        assert Request.FromString(payload).requested_model == "demo"
    finally:
        sock.close()
        router.close(linger=0)


def test_default_reconnect_and_distinct_identities(context, tmp_path):
    endpoint = f"ipc://{tmp_path}/none.sock"        # nobody bound: connecting still works
    first = backend_socket.connect(context, endpoint, "liveness")
    second = backend_socket.connect(context, endpoint, "liveness")
    try:
        assert first.getsockopt(zmq.RECONNECT_IVL) == 100          # libzmq's default
        assert first.getsockopt(zmq.IDENTITY) != second.getsockopt(zmq.IDENTITY)
    finally:
        first.close()
        second.close()


def test_a_bad_endpoint_raises_and_leaves_nothing_open(context, monkeypatch):
    opened = []
    socket = context.socket
    monkeypatch.setattr(context, "socket", lambda kind: opened.append(socket(kind)) or opened[-1])
    with pytest.raises(zmq.ZMQError):
        backend_socket.connect(context, "nonsense://x", "probe")
    assert len(opened) == 1 and opened[0].closed
