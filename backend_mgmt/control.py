"""The control endpoint: the operators' ROUTER socket, one command per request, one reply each.

Frames come in, the command table (commands.py) does the work, and exactly one reply goes out
(``Reply``). Refusals (``ServiceError``) and bugs in a command become error replies here and
nowhere else; nothing past this module sees a frame.
"""

import logging
import time

from . import errors, peers, router, wire
from .errors import ServiceError

log = logging.getLogger(__name__)


class Reply:
    """Exactly one reply per request: later calls are ignored (and logged)."""

    __slots__ = ("_endpoint", "envelope", "correlation_id", "command", "sent", "received",
                 "_frame", "_requester", "_cut_short")

    def __init__(self, endpoint, envelope, correlation_id=None, command="?", frame=None):
        self._endpoint = endpoint
        self.envelope = envelope
        self.correlation_id = correlation_id
        self.command = command
        self.sent = False
        self.received = time.perf_counter()
        self._frame = frame             # the request's zmq.Frame, to tell who sent it
        self._requester = None
        self._cut_short = False         # answered by answer_waiting: a late answer is moot

    @property
    def requester(self):
        """Who sent the request, as the kernel reports it (peers.py); asked only when a
        request changes something, so status pays nothing for it."""
        if self._requester is None:
            self._requester = peers.describe(self._frame) if self._frame is not None \
                else "an unknown peer"
        return self._requester

    def cut_short(self, error):
        """Answer now with ``error`` (the daemon is going); what the handler says later is
        dropped without a complaint."""
        self._cut_short = True
        self.fail(error)

    def ok(self, data):
        self._send(lambda: wire.encode_success(self.correlation_id, data))

    def ok_json(self, data_json):
        self._send(lambda: wire.encode_success_json(self.correlation_id, data_json))

    def fail(self, error):
        self._send(lambda: wire.encode_error(self.correlation_id, error.code, error.message,
                                             error.data))

    def _send(self, encode):
        if self.sent:
            if not self._cut_short:
                log.error("second reply to %s request dropped", self.command)
            return
        try:
            payload = encode()
        except Exception:        # never leave a client without its one reply
            log.exception("cannot encode the reply to a %s request", self.command)
            payload = wire.encode_error(None, errors.INTERNAL,
                                        "internal error encoding the reply; see the service log")
        self.sent = True
        self._endpoint.sent(self, payload)


class ControlEndpoint:
    """``commands``: name -> handler(parts, params, reply) (commands.COMMANDS); ``parts``:
    what the handlers work with; ``requests``: the daemon's request counters (its "control"
    and "errors" counts are kept here); ``durations``: a metrics.Histogram of receipt to
    reply by command; ``stopping()``: true once the service shuts down (then only status is
    served); ``changing``: commands logged with who asked; ``restarting()``: true while the
    service shuts down for a restart (then what only reads is still served); ``heard(frame)``:
    told of each message's last frame as it arrives."""

    def __init__(self, sock, commands, parts, requests, durations, stopping,
                 changing=frozenset(), restarting=lambda: False, heard=None):
        self.socket = sock
        self._commands = commands
        self._parts = parts
        self._requests = requests
        self._durations = durations
        self._stopping = stopping
        self._changing = changing
        self._restarting = restarting
        self._heard = heard
        self._waiting = set()           # Replies their handler has not given yet

    def on_readable(self):
        router.drain(self.socket, self.handle, self._heard)

    def handle(self, frames, last_frame=None):
        """One request's frames: answer it (now, or later through its Reply). ``last_frame``:
        the zmq.Frame that tells who sent it."""
        self._requests["control"] += 1
        try:
            envelope, payload = wire.split_envelope(frames)
        except wire.BadFrames as error:
            self._requests["errors"] += 1
            if error.envelope is not None:
                self._send(error.envelope.reply(wire.encode_error(None, error.code,
                                                                  error.message)))
            return
        reply = Reply(self, envelope, frame=last_frame)
        try:
            request = wire.parse_control(payload)
            reply.correlation_id = request.correlation_id
            reply.command = request.command
            if request.command in self._changing:
                name = request.params.get("model_name")
                log.info("%s%s requested by %s", request.command,
                         f" {name}" if isinstance(name, str) else "", reply.requester)
            if request.command != "status" and self._stopping() and (
                    not self._restarting() or request.command in self._changing):
                raise ServiceError(errors.SHUTTING_DOWN, "the service is shutting down")
            handler = self._commands.get(request.command)
            if handler is None:
                raise ServiceError(errors.UNKNOWN_COMMAND,
                                   f"unknown command {request.command!r}; known: "
                                   f"{', '.join(sorted(self._commands))}")
            handler(self._parts, request.params, reply)
            if not reply.sent:
                self._waiting.add(reply)
        except ServiceError as error:
            self._requests["errors"] += 1
            if isinstance(error, wire.BadRequest):      # parsed far enough to know it?
                reply.correlation_id = error.correlation_id
            reply.fail(error)
        except Exception:
            self._requests["errors"] += 1
            log.exception("internal error handling a control request")
            if not reply.sent:
                reply.fail(ServiceError(errors.INTERNAL, "internal error; see the service log"))

    def answer_waiting(self, error):
        """Answer every request still waiting for its handler (an unload-model waiting for
        the process to end, a park-model) with ``error``: the daemon is going, and a request
        it read must not go unanswered. What the handler says later is dropped."""
        for reply in list(self._waiting):
            reply.cut_short(error)

    def sent(self, reply, payload):
        """A Reply's one payload: send it and time the request."""
        self._waiting.discard(reply)
        self._send(reply.envelope.reply(payload))
        self._durations.observe(reply.command if reply.command in self._commands
                                else "(invalid)", time.perf_counter() - reply.received)

    def _send(self, frames):
        router.reply(self.socket, frames, "control reply")
