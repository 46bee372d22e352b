"""The handshake front: inference clients ask which endpoint serves a model.

A ready model is answered at once. An on-demand model that is not ready is loaded, and its
clients wait for it (within handshake_timeout, and within max_waiting_handshakes in all and
max_waiting_handshakes_per_model for one model: past those a client is told so at once).
"""

import logging

from . import errors, router, states, wire
from .errors import ServiceError

log = logging.getLogger(__name__)


class HandshakeFront:
    """``manager``: the current config, the registry, what is ready; ``scheduler``: loads and
    keep-alive; ``requests``: the daemon's request counters (the "handshake" count is kept
    here); ``waiting``: {model name: handshakes waiting for it}, kept here, shown by status;
    ``stopping()``: true once the service shuts down (then nothing loads on demand);
    ``restarting()``: true while it shuts down for a restart (then a client is told to
    come back, with the retryable shutting_down); ``heard(frame)``: told of each message's
    last frame as it arrives."""

    def __init__(self, loop, sock, manager, scheduler, requests, waiting, stopping,
                 restarting=lambda: False, heard=None):
        self.loop = loop
        self.socket = sock
        self.manager = manager
        self.scheduler = scheduler
        self._requests = requests
        self._stopping = stopping
        self._restarting = restarting
        self._heard = heard
        self.waiting = waiting

    def on_readable(self):
        router.drain(self.socket, self.handle, self._heard)

    def handle(self, frames, last_frame=None):
        """One handshake's frames: answer it (now, or once its model is ready)."""
        self._requests["handshake"] += 1
        try:
            envelope, payload = wire.split_envelope(frames)
        except wire.BadFrames as error:
            if error.envelope is not None:
                self._send(error.envelope.reply(
                    wire.encode_handshake_reply(error_message=error.message)))
            return
        config = self.manager.config
        try:
            name = wire.parse_handshake(payload) or config.default_model
            if not name:
                raise ServiceError(errors.MISSING_PARAM,
                                   "no model requested and no default_model configured")
            spec = self.manager.resolve(name)
            backend = self.manager.registry.get(spec.name)
            if backend is None or not backend.answers_clients:
                # On demand: a model not loaded, or on its way. A failed one stays failed
                # until load-model: clients should not turn a crash loop into a load loop.
                # A parked one was loaded: a handshake wakes it, on_demand or not.
                wakes = spec.on_demand or (backend is not None and
                                           backend.phase in states.PARK_TIER)
                if wakes and self._restarting():
                    raise ServiceError(errors.SHUTTING_DOWN, "the service is restarting; "
                                                             "load again once it is back")
                if wakes and not self._stopping() and (
                        backend is None or backend.state != states.FAILED):
                    self._load_for(envelope, spec)
                    return
                backend = self.manager.ready_backend(name)      # raises: says why not
            self.scheduler.touch(backend)
            answer = wire.encode_handshake_reply(endpoint=backend.endpoint,
                                                 protocols=backend.protocols)
        except ServiceError as error:
            answer = wire.encode_handshake_reply(error_message=error.message)
        self._send(envelope.reply(answer))

    def _load_for(self, envelope, spec):
        """Answer once the model is ready (or failed), within handshake_timeout. A client
        that gives up only loses its answer; the load goes on for the others."""
        config = self.manager.config
        name = spec.name
        waiting_here = self.waiting.get(name, 0)
        waiting = sum(self.waiting.values())
        if waiting_here >= config.max_waiting_handshakes_per_model or \
                waiting >= config.max_waiting_handshakes:
            limit = (f"{waiting_here} clients already wait for model {name} "
                     f"(max_waiting_handshakes_per_model "
                     f"{config.max_waiting_handshakes_per_model})"
                     if waiting_here >= config.max_waiting_handshakes_per_model else
                     f"{waiting} clients already wait for models to load "
                     f"(max_waiting_handshakes {config.max_waiting_handshakes})")
            self._send(envelope.reply(wire.encode_handshake_reply(
                error_message=f"model {name} is not ready and {limit}; try again later")))
            return
        self.waiting[name] = waiting_here + 1
        answered = []

        def answer(payload):
            if not answered:
                answered.append(True)
                timer.cancel()
                left = self.waiting.get(name, 1) - 1
                if left > 0:
                    self.waiting[name] = left
                else:
                    self.waiting.pop(name, None)
                self._send(envelope.reply(payload))

        def done(backend, error):
            if error is not None:
                answer(wire.encode_handshake_reply(error_message=error.message))
            else:
                answer(wire.encode_handshake_reply(endpoint=backend.endpoint,
                                                   protocols=backend.protocols))
        timeout = config.handshake_timeout
        timer = self.loop.call_later(timeout, lambda: answer(wire.encode_handshake_reply(
            error_message=f"model {spec.name} is not ready after {timeout:g} s "
                          f"(handshake_timeout); it is still loading")))
        try:
            self.scheduler.load(spec.name, done)
        except ServiceError as error:
            answer(wire.encode_handshake_reply(error_message=error.message))

    def _send(self, frames):
        router.reply(self.socket, frames, "handshake reply")
