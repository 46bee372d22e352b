"""How a backend is parked (its GPU memory released, its process kept) and woken again.

The scheduler and the manager decide *when* (scheduler.py, manager.py); this module is *how*,
per model type (``park:`` in the config):

- ``protocol``: the backend advertised the ``sleep`` protocol in its handshake; the daemon
  sends it ``Sleep`` messages on the backend's own endpoint (handshake.proto);
- ``command``: argv templates the daemon runs to park and to wake, ``{pid}``, ``{endpoint}``
  and ``{unit}`` substituted (e.g. ``cuda-checkpoint --toggle --pid {pid}``).

A model without ``park:`` is unloaded as before.
"""

import random

import zmq

from . import backend_socket
from .loop import run_async
from .messages import SLEEP_PROTOCOL, Response, Sleep, SleepState
# The settings themselves (ParkSettings, the templates' rules) live in park_settings.py, so
# that config.py (and the CLI, and the validating child) need not import ZeroMQ and protobuf.
from .park_settings import COMMAND, PROTOCOL, substitute


MAX_DETAIL = 200                  # characters of a backend's or a command's message in a reason
MAX_IGNORED = 100                 # answers to other requests tolerated in one step
MAX_READS_PER_WAKEUP = 32


class Parker:
    """Parks and wakes one backend.

    ``park(done)`` and ``wake(done)`` start the step and return at once; ``done(None)`` is
    called when it succeeded, ``done("what went wrong")`` when it failed or took longer than
    the timeout: exactly once, later, from the loop (never from inside the call).
    ``cancel()`` abandons a step in flight: its ``done`` is then never called."""

    def park(self, done):
        raise NotImplementedError

    def wake(self, done):
        raise NotImplementedError

    def cancel(self):
        pass


def parker_for(loop, context, backend):
    """The Parker for ``backend`` (a registry.Backend) from its spec's ``park`` settings, or
    None when it cannot park: no ``park:``, or ``protocol`` and the backend did not
    advertise the sleep protocol."""
    settings = getattr(backend.spec, "park", None)   # (ModelSpec.park may not exist yet)
    if settings is None:
        return None
    if settings.method == COMMAND:
        return CommandParker(loop, backend, settings)
    if settings.method != PROTOCOL:
        return None
    protocols = list(backend.protocols or ())
    if SLEEP_PROTOCOL not in protocols or protocols.index(SLEEP_PROTOCOL) > 255:
        return None                                  # (the index travels as one byte)
    return ProtocolParker(loop, context, backend.endpoint, backend.spec.fullname,
                          protocols.index(SLEEP_PROTOCOL), settings.timeout)


# -- the ``protocol`` method ---------------------------------------------------------------

class ProtocolParker(Parker):
    """Parks and wakes a backend with ``Sleep`` messages on its own endpoint.

    Each step is one fresh DEALER: a handshake (the backend's contract wants one first from
    each identity), then ``[sleep_index, Sleep]``, answered by ``[sleep_index, SleepState]``.
    The backend's answers are hostile input: a wrong correlation id is ignored (up to
    MAX_IGNORED of them), anything undecodable or out of place fails the step, and nothing
    raises out of the loop's callback. A new step abandons the one in flight."""

    def __init__(self, loop, context, endpoint, requested_model, sleep_index, timeout):
        self.loop = loop
        self.context = context
        self.endpoint = endpoint
        self.requested_model = requested_model
        self.sleep_index = sleep_index
        self.timeout = timeout
        self._sequence = random.randrange(2**32)   # a stale answer is never taken for ours
        self._exchange = None

    def park(self, done):
        self._start(Sleep.SLEEP, _expecting(True, "park", done))

    def wake(self, done):
        self._start(Sleep.WAKE, _expecting(False, "wake", done))

    def ask_state(self, done):
        """Only ask: ``done(asleep, None)`` with a bool, or ``done(None, "what went wrong")``
        (e.g. for a backend adopted after a daemon restart)."""
        def answered(state, error):
            if error:
                done(None, error)
            else:
                done(state.asleep, None)
        self._start(Sleep.STATE, answered)

    def cancel(self):
        if self._exchange is not None:
            self._exchange.close()
            self._exchange = None

    def _start(self, action, on_answer):
        self.cancel()
        self._sequence = (self._sequence + 1) % 2**32
        self._exchange = _SleepExchange(self, action, self._sequence, on_answer)


def _expecting(asleep, step, done):
    """An on_answer for park or wake: a SleepState must say ``asleep`` as that step wants."""
    def answered(state, error):
        if error:
            done(error)
        elif state.asleep != asleep:
            done(f"{step}: the backend answered that it is "
                 f"{'asleep' if state.asleep else 'awake'}")
        else:
            done(None)
    return answered


class _SleepExchange:
    """One step's conversation: handshake, Sleep, SleepState; ``on_answer(state, error)``
    exactly once (from the loop), unless closed first."""

    def __init__(self, parker, action, correlation_id, on_answer):
        self.loop = parker.loop
        self.parker = parker
        self.action = action
        self.correlation_id = correlation_id
        self.on_answer = on_answer
        self.what = Sleep.Action.Name(action)
        self.index_byte = bytes([parker.sleep_index])
        self.greeted = False
        self.ignored = 0
        self.socket = None
        self.timer = self.loop.call_later(parker.timeout, self._timed_out)
        try:
            self.socket = backend_socket.connect(parker.context, parker.endpoint, "park")
            backend_socket.send_handshake(self.socket, parker.requested_model)
        except zmq.ZMQError as exc:       # the daemon's own trouble (out of file descriptors)
            self._close_socket()
            reason = f"{self.what}: {exc.strerror}"
            self.loop.call_later(0, lambda: self._finish(None, reason))
            return
        self.loop.add_reader(self.socket, self._on_readable)

    def _on_readable(self):
        for _ in range(MAX_READS_PER_WAKEUP):      # a flooding backend cannot hold the loop
            if self.socket is None or not self.socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                return
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.ZMQError:
                return
            self._take(frames)

    def _take(self, frames):
        if not self.greeted:
            self._take_handshake(frames)
        else:
            self._take_state(frames)

    def _take_handshake(self, frames):
        response = _decode(Response, frames[0]) if len(frames) == 1 else None
        if response is None:
            self._finish(None, f"{self.what}: the backend's handshake answer is not a Response")
        elif response.error_message:
            self._finish(None, f"{self.what}: the backend refused the handshake: "
                               f"{_printable(response.error_message)}")
        elif (len(response.protocols) <= self.parker.sleep_index
              or response.protocols[self.parker.sleep_index] != SLEEP_PROTOCOL):
            self._finish(None, f"{self.what}: the backend no longer advertises "
                               f"{SLEEP_PROTOCOL!r} at index {self.parker.sleep_index}")
        else:
            self.greeted = True
            request = Sleep(correlation_id=self.correlation_id, action=self.action)
            try:
                self.socket.send_multipart([self.index_byte, request.SerializeToString()],
                                           zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                self._finish(None, f"{self.what}: cannot send: {exc.strerror}")

    def _take_state(self, frames):
        state = None
        if len(frames) == 2 and frames[0] == self.index_byte:
            state = _decode(SleepState, frames[1])
        if state is None:
            self._finish(None, f"{self.what}: the backend's answer is not a SleepState")
        elif state.correlation_id != self.correlation_id:
            self.ignored += 1                      # an old answer, or a confused backend
            if self.ignored > MAX_IGNORED:
                self._finish(None, f"{self.what}: more than {MAX_IGNORED} answers "
                                   "to other requests")
        elif state.error_message:
            self._finish(None, f"{self.what} failed: {_printable(state.error_message)}")
        else:
            self._finish(state, None)

    def _timed_out(self):
        self.timer = None
        self._finish(None, f"{self.what}: no answer within {self.parker.timeout:g} s")

    def _finish(self, state, error):
        if self.on_answer is None:
            return
        on_answer, self.on_answer = self.on_answer, None
        self.close()
        if self.parker._exchange is self:
            self.parker._exchange = None
        on_answer(state, error)

    def close(self):
        """Stop: no answer is given any more."""
        self.on_answer = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._close_socket()

    def _close_socket(self):
        if self.socket is not None:
            self.loop.close_socket(self.socket)
            self.socket = None


def _decode(message_class, data):
    """The message, or None if ``data`` is not one (protobuf raises various errors)."""
    try:
        return message_class.FromString(data)
    except Exception:
        return None


def _printable(text, limit=MAX_DETAIL):
    """``text`` from a backend or a command, fit for a reason: one bounded line, no control
    characters."""
    text = "".join(c if c.isprintable() else "?" for c in text[:limit + 1])
    return text if len(text) <= limit else text[:limit - 3] + "..."


# -- the ``command`` method ----------------------------------------------------------------

def placeholder_values(backend):
    """The values of PLACEHOLDERS for ``backend``; None where there is none (no unit for a
    child-process backend, no pid before it started)."""
    running = backend.running
    pid = getattr(running, "pid", None)
    return {"{pid}": None if pid is None else str(pid),
            "{endpoint}": backend.endpoint or None,
            "{unit}": getattr(running, "unit", None) or None}


class CommandParker(Parker):
    """Parks and wakes a backend by running ``settings.park_command`` or ``wake_command``
    (argv, no shell, a clean environment, killed after ``settings.timeout``). Exit status 0
    is success. A cancelled step's command is killed (its backend is going, or gone) and its
    ``done`` dropped."""

    def __init__(self, loop, backend, settings):
        self.loop = loop
        self.backend = backend
        self.settings = settings
        self._step = None       # a token of the step in flight; cancel() forgets it
        self._command = None    # the step's RunningCommand, while it runs

    def park(self, done):
        self._run("park", self.settings.park_command, done)

    def wake(self, done):
        self._run("wake", self.settings.wake_command, done)

    def cancel(self):
        self._step = None
        if self._command is not None:
            self._command.kill()
            self._command = None

    def _run(self, step, template, done):
        token = self._step = object()

        def finish(reason):
            if self._step is token:
                self._step = self._command = None
                done(reason)

        argv, problem = substitute(template, placeholder_values(self.backend))
        if problem:
            self.loop.call_later(0, lambda: finish(f"cannot {step}: {problem}"))
            return
        self._command = run_async(self.loop, argv,
                                  lambda result: finish(_command_failure(step, result)),
                                  timeout=self.settings.timeout)


def _command_failure(step, result):
    """None if the command succeeded, else why not: its exit status and the last line of its
    stderr, bounded."""
    if result.timed_out:
        return f"{step}: {result.argv[0]} did not finish within its timeout; killed"
    if result.returncode == 0:
        return None
    status = (f"was killed by signal {-result.returncode}" if result.returncode < 0
              else f"exited with status {result.returncode}")
    lines = [line for line in (result.stderr or "").splitlines() if line.strip()]
    last = f": {_printable(lines[-1].strip())}" if lines else ""
    return f"{step}: {_printable(result.argv[0])} {status}{last}"
