"""Asking a backend whether it is ready: send a handshake Request, wait for its Response.

One DEALER socket per attempt, polled by the daemon's loop. libzmq keeps reconnecting to an
endpoint that does not exist yet (every RECONNECT_IVL ms, with its own backoff up to
RECONNECT_IVL_MAX), and the queued Request goes out as soon as the backend binds, so readiness
is seen within a few milliseconds without the daemon itself polling. In case a Request is lost
(a backend that drops early messages), a fresh socket and Request follow with exponential
backoff.
"""

import logging

import zmq

from . import backend_socket
from .messages import Response

log = logging.getLogger(__name__)

RECONNECT_IVL_MS = 5
RECONNECT_IVL_MAX_MS = 20
RETRY_FIRST = 1.0     # seconds before a fresh socket and Request, doubling...
RETRY_MAX = 8.0       # ...up to this


class ReadinessProbe:
    """Calls ``on_ready(protocols)`` once the backend answers; ``cancel()`` stops it."""

    def __init__(self, loop, context, endpoint, requested_model, on_ready, on_error=None):
        self.loop = loop
        self.context = context
        self.endpoint = endpoint
        self.requested_model = requested_model
        self.on_ready = on_ready
        self.on_error = on_error
        self._socket = None
        self._retry_timer = None
        self._retry_delay = RETRY_FIRST
        self.done = False
        self._attempt()

    def _attempt(self):
        self._close_socket()
        sock = None
        try:
            sock = backend_socket.connect(self.context, self.endpoint, "probe",
                                          (RECONNECT_IVL_MS, RECONNECT_IVL_MAX_MS))
            backend_socket.send_handshake(sock, self.requested_model)
        except zmq.ZMQError as exc:        # EMFILE: the daemon is out of file descriptors
            if sock is not None:
                sock.close(linger=0)
            self._fail_soon(exc)
            return
        self._socket = sock
        self.loop.add_reader(sock, self._on_readable)
        self._retry_timer = self.loop.call_later(self._retry_delay, self._retry)
        self._retry_delay = min(self._retry_delay * 2, RETRY_MAX)

    def _fail_soon(self, exc):
        """Report from the loop, not from inside the caller's constructor call."""
        message = f"cannot probe the backend's endpoint: {exc.strerror}"
        self.loop.call_later(0, lambda: self._fail(message))

    def _retry(self):
        self._retry_timer = None
        if not self.done:
            log.debug("no handshake answer yet from %s; probing again", self.endpoint)
            self._attempt()

    def _on_readable(self):
        if self.done or self._socket is None:
            return
        try:
            frames = self._socket.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        payload = frames[-1]
        try:
            response = Response.FromString(payload)
        except Exception as exc:
            self._fail(f"backend answered the handshake with something that is not a "
                       f"Response: {exc}")
            return
        if response.error_message:
            self._fail(f"backend refused the handshake: {response.error_message}")
            return
        self.cancel()
        self.on_ready(list(response.protocols))

    def _fail(self, message):
        if self.done:
            return
        self.cancel()
        if self.on_error:
            self.on_error(message)

    def cancel(self):
        self.done = True
        if self._retry_timer is not None:
            self._retry_timer.cancel()
            self._retry_timer = None
        self._close_socket()

    def _close_socket(self):
        if self._socket is not None:
            self.loop.close_socket(self._socket)
            self._socket = None
