"""The event stream: every backend state change as one JSON message on a PUB socket.

    {"model": "demo", "state": "ready", "previous": "loading", "reason": "...",
     "time": "2026-11-28T05:00:00.123Z", "timestamp": 1796000000.123, "pid": 1234,
     "unit": null, "endpoint": "ipc://...", "restarts": 0}

``state`` is one of loading, ready, restarting, failed, unloading, unloaded, and evicted (sent
when the model budget or GPU room chooses a model to unload; unloading and unloaded follow).
Subscribe to everything (an empty prefix); each message is a single frame.
"""

import json
import logging
import time

import zmq

from .registry import iso_time

log = logging.getLogger(__name__)

EVICTED = "evicted"
SEND_HWM = 10000      # a slow subscriber loses events past this, never stalls the daemon
# What subscribers send a PUB socket are subscriptions (a frame with the prefix); everyone
# subscribes to everything, so a frame larger than this makes libzmq drop that subscriber
# rather than keep it in memory.
MAX_SUBSCRIPTION_BYTES = 256


class EventPublisher:
    def __init__(self, sock):
        self.socket = sock
        self.sent = 0

    @classmethod
    def bind(cls, context, endpoint, bind=None):
        """``bind(sock)``: how to bind it (default ``sock.bind(endpoint)``)."""
        sock = context.socket(zmq.PUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, SEND_HWM)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_SUBSCRIPTION_BYTES)
        try:
            (bind or (lambda s: s.bind(endpoint)))(sock)
        except zmq.ZMQError:
            sock.close(linger=0)
            raise
        return cls(sock)

    def publish(self, backend, state, previous=None, reason=""):
        now = time.time()
        message = {
            "model": backend.name, "state": state, "previous": previous, "reason": reason,
            "time": iso_time(now), "timestamp": round(now, 6), "pid": backend.pid,
            "unit": backend.unit, "restarts": backend.restarts,
            "endpoint": backend.endpoint if state == "ready" else None,
        }
        try:
            self.socket.send(json.dumps(message, separators=(",", ":")).encode(), zmq.NOBLOCK)
            self.sent += 1
        except zmq.ZMQError as exc:
            log.debug("event dropped: %s", exc)

    def on_transition(self, backend, old_state, new_state):
        """A registry listener."""
        self.publish(backend, new_state, old_state, backend.reason)

    def close(self):
        self.socket.close(linger=0)
