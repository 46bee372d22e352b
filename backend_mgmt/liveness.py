"""Liveness checks: ping a ready backend every ``interval`` seconds.

One DEALER per backend: a handshake first, then ``[index of "ping", Ping{n}]`` each interval,
answered by ``Pong{n}``. No answer within ``timeout`` is a miss; ``failures`` misses in a row
call ``on_hung``. A backend that does not speak "ping" is asked for a fresh handshake
instead, which every backend answers. A hung backend is found within
``interval x failures + timeout`` of the moment it stopped answering.
"""

import logging

import zmq

from . import backend_socket
from .messages import PING_PROTOCOL, Ping, Pong, Response

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 1.0


class LivenessCheck:
    def __init__(self, loop, context, endpoint, requested_model, protocols, settings, on_hung):
        self.loop = loop
        self.context = context
        self.endpoint = endpoint
        self.requested_model = requested_model
        self.ping_index = protocols.index(PING_PROTOCOL) if PING_PROTOCOL in protocols else None
        self.interval = settings.interval
        self.failures = settings.failures
        self.timeout = min(settings.timeout or DEFAULT_TIMEOUT, settings.interval)
        self.on_hung = on_hung
        self.misses = 0
        self.sequence = 0
        self.checks = 0
        self._socket = None
        self._greeted = False
        self._waiting_for = None        # what answer the current check expects
        self._timer = self.loop.call_later(self.interval, self._check)
        self._deadline = None
        self.stopped = False

    def _new_socket(self):
        self._close_socket()
        sock = backend_socket.connect(self.context, self.endpoint, "liveness")
        self.loop.add_reader(sock, self._on_readable)
        self._socket = sock
        self._greeted = False

    def _check(self):
        self._timer = None
        if self.stopped:
            return
        self.checks += 1
        if self._socket is None or self.ping_index is None:
            try:
                self._new_socket()
            except zmq.ZMQError as exc:
                # The daemon's trouble (out of file descriptors), not the backend's: no miss.
                log.warning("liveness check of %s skipped: %s", self.endpoint, exc.strerror)
                self._timer = self.loop.call_later(self.interval, self._check)
                return
        if not self._greeted:
            self._waiting_for = "handshake"
            backend_socket.send_handshake(self._socket, self.requested_model)
        else:
            self._send_ping()
        self._deadline = self.loop.call_later(self.timeout, self._missed)

    def _send_ping(self):
        self.sequence = (self.sequence + 1) % 2**32
        self._waiting_for = self.sequence
        self._socket.send_multipart([bytes([self.ping_index]), Ping(
            correlation_id=self.sequence, message="liveness").SerializeToString()], zmq.NOBLOCK)

    def _on_readable(self):
        while self._socket is not None and self._socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            frames = self._socket.recv_multipart(zmq.NOBLOCK)
            if self._waiting_for == "handshake" and len(frames) == 1:
                try:
                    Response.FromString(frames[0])
                except Exception:
                    continue
                self._greeted = True
                if self.ping_index is not None:
                    self._send_ping()          # same check: the handshake was only the start
                else:
                    self._answered()
            elif len(frames) == 2 and self._waiting_for not in (None, "handshake"):
                try:
                    pong = Pong.FromString(frames[1])
                except Exception:
                    continue
                if pong.correlation_id == self._waiting_for:
                    self._answered()

    def _answered(self):
        self._waiting_for = None
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self.misses = 0
        self._timer = self.loop.call_later(self.interval, self._check)

    def _missed(self):
        self._deadline = None
        if self.stopped:
            return
        self._waiting_for = None
        self.misses += 1
        # A fresh connection next time: a wedged one should not hide a recovered backend.
        self._close_socket()
        if self.misses >= self.failures:
            self.stop()
            self.on_hung(f"hung: no answer to {self.misses} liveness checks in a row "
                         f"({self.timeout:g} s each, every {self.interval:g} s)")
            return
        self._timer = self.loop.call_later(max(0.0, self.interval - self.timeout), self._check)

    def stop(self):
        self.stopped = True
        for timer in (self._timer, self._deadline):
            if timer is not None:
                timer.cancel()
        self._timer = self._deadline = None
        self._close_socket()

    def _close_socket(self):
        if self._socket is not None:
            self.loop.close_socket(self._socket)
            self._socket = None
