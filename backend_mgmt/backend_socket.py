"""The daemon's connection to a backend's endpoint: one DEALER, set up in one place.

The readiness probe (probe.py) and the liveness check (liveness.py) each talk to a backend
over one of these, and both open the conversation with a handshake Request.
"""

import os

import zmq

from .messages import Request

MAX_MESSAGE = 1024 * 1024      # a backend's answers are small; a larger frame is dropped


def connect(context, endpoint, purpose, reconnect_ms=None):
    """A DEALER connected to ``endpoint``: LINGER 0 (closing never waits on a backend), an
    identity ``<purpose>-<random>``, frames capped at MAX_MESSAGE. ``reconnect_ms`` =
    (first, max) reconnect interval in ms, for a socket that waits for a backend to bind.
    Raises zmq.ZMQError (e.g. out of file descriptors), having closed what it opened."""
    sock = context.socket(zmq.DEALER)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        # 128 random bits, as uuid4().hex was, without importing uuid (and platform, ctypes)
        # on the daemon's way to READY=1.
        sock.setsockopt(zmq.IDENTITY, f"{purpose}-{os.urandom(16).hex()}".encode())
        if reconnect_ms is not None:
            sock.setsockopt(zmq.RECONNECT_IVL, reconnect_ms[0])
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, reconnect_ms[1])
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE)
        sock.connect(endpoint)
    except zmq.ZMQError:
        sock.close(linger=0)
        raise
    return sock


def send_handshake(sock, requested_model):
    """Queue a handshake Request (libzmq sends it once the connection is up)."""
    sock.send(Request(requested_model=requested_model).SerializeToString(), zmq.NOBLOCK)
