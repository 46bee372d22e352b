"""The backends the daemon knows, and the one place their state changes.

Pure bookkeeping: no sockets, no processes. ``manager.BackendManager`` drives it.
"""

import collections
import functools
import logging
import time
from dataclasses import dataclass, field

from . import states
from .errors import InvalidTransition

log = logging.getLogger(__name__)

OUTPUT_TAIL_LINES = 20
FAILED_OUTPUT_LINES = 5            # of them, shown in a failed model's status entry

# Attributes not shown in status: setting them does not invalidate the cached status entry.
# ("running" is shown, as pid and unit_active. When its process exits, manager._on_exit sets
# last_exit in the same callback, so the cached entry sees the exit too.)
_NOT_IN_STATUS = frozenset({"_version", "status_json", "probe", "startup_timer", "liveness",
                            "restart_timer", "load_waiters", "unload_waiters",
                            "startup_deadline", "restart_times", "output",
                            "park_waiters"})

_changes = 0     # bumped with every backend's version: one number tells a cache all is as was


def backend_changes():
    """A number that changes whenever any backend's status entry may have (but its uptime):
    a field shown in status set, a backend added or gone, shown_elsewhere_changed()."""
    return _changes


@dataclass(eq=False)
class Backend:
    spec: object                       # config.ModelSpec
    endpoint: str
    phase: str | None = None           # its state in states.py's table (None: not yet in it)
    reason: str = ""                   # why it entered its state (shown in status)
    unit: str | None = None
    protocols: list = field(default_factory=list)
    started_at: float | None = None    # wall clock, for people
    started_mono: float | None = None  # monotonic, for uptime
    ready_at: float | None = None
    state_since: float = 0.0           # wall clock: when status last showed a new state
    restarts: int = 0
    last_exit: object = None           # launchers.base.ExitInfo
    last_exit_at: float | None = None
    error: str | None = None
    error_code: str | None = None
    last_error: str | None = None      # the error before the current start
    output: collections.deque = field(
        default_factory=lambda: collections.deque(maxlen=OUTPUT_TAIL_LINES))
    # Run-time attachments owned by the manager:
    running: object = None             # launchers.base.Running
    probe: object = None
    startup_timer: object = None
    startup_deadline: float = 0.0      # monotonic; a backend may push it out (progress.py)
    progress: str | None = None        # its last STATUS= while loading
    liveness: object = None            # liveness.LivenessCheck while ready
    gpu_devices: tuple | None = None   # GPUs it runs on (the scheduler's placement, or the
                                       # unit's, adopted); restarts keep them
    load_waiters: list = field(default_factory=list)    # callables(backend, error|None)
    unload_waiters: list = field(default_factory=list)  # callables(backend)
    stop_reason: str | None = None     # why it is being stopped for a failure (hung,
                                       # stalled restart): its exit is reported as this
    restart_times: collections.deque = field(
        default_factory=lambda: collections.deque(maxlen=64))   # monotonic, for the policy
    restart_timer: object = None
    next_restart_at: float | None = None
    parked_at: float | None = None     # wall clock: when it was last parked (while parked)
    park_waiters: list = field(default_factory=list)    # callables(error message | None)

    status_json: tuple | None = None   # (version key, encoded entry) cached by the daemon

    def __setattr__(self, name, value):
        # Every change of a field shown in status bumps the version, so the daemon can encode
        # a backend's status entry once per change instead of once per request.
        object.__setattr__(self, name, value)
        if name not in _NOT_IN_STATUS:
            self.shown_elsewhere_changed()

    @property
    def state(self):
        """The state status, events and metrics show (states.SHOWN_AS)."""
        return states.shown(self.phase)

    @property
    def answers_clients(self):
        """Ready and not being stopped: handshakes get its endpoint."""
        return self.phase == states.READY

    def shown_elsewhere_changed(self):
        """Something of its status entry kept outside it changed (the scheduler's idle clock,
        a keep_alive override): the cached entry is stale."""
        global _changes
        _changes += 1
        object.__setattr__(self, "_version", self.__dict__.get("_version", 0) + 1)

    @property
    def version(self):
        """Changes whenever anything in this backend's status entry but its uptime does."""
        return (self.__dict__.get("_version", 0), self.pid)

    def uptime(self, now_mono):
        if self.started_mono is None or self.phase not in states.ACTIVE:
            return 0.0
        return round(now_mono - self.started_mono, 3)

    @property
    def name(self):
        return self.spec.name

    @property
    def process_alive(self):
        return self.running is not None and not getattr(self.running, "exited", True)

    @property
    def pid(self):
        return self.running.pid if self.process_alive else None

    def as_status(self, now_wall=None, now_mono=None):
        """The model's entry in status.data.models (the original's fields first). The times
        come from the caller's clock; without ``now_mono`` the uptime is left at 0."""
        del now_wall                   # every time shown is the backend's own
        return {
            "name": self.spec.name,
            "type": self.spec.type,
            "endpoint": self.endpoint if self.answers_clients else None,
            "started_at": iso_time(self.started_at),
            "uptime": 0.0 if now_mono is None else self.uptime(now_mono),
            "fullname": self.spec.fullname,
            "state": self.state,
            "reason": self.reason,
            "progress": self.progress,
            "state_since": iso_time(self.state_since),
            "pid": self.pid,
            "unit": self.unit,
            "unit_active": self.process_alive if self.unit else None,
            "backend_endpoint": self.endpoint,
            "protocols": list(self.protocols),
            "gpus": list(self.gpu_devices) if self.gpu_devices is not None else (
                self.spec.resources.gpus.split(",") if self.spec.resources.gpus else []),
            "ready_at": iso_time(self.ready_at),
            "parked_at": iso_time(self.parked_at),
            "restarts": self.restarts,
            "next_restart_at": iso_time(self.next_restart_at),
            "restart_policy": self.spec.restart.policy,
            "last_exit": None if self.last_exit is None else {
                **self.last_exit.as_dict(), "time": iso_time(self.last_exit_at)},
            "error": self.error,
            "error_code": self.error_code,
            "last_error": self.last_error,
            # A failed model's last lines (its pipe's, or a unit's from its journal).
            "output": list(self.output)[-FAILED_OUTPUT_LINES:] if self.state == states.FAILED
            else [],
        }


@functools.lru_cache(maxsize=4096)   # status repeats the same few timestamps
def iso_time(timestamp):
    if timestamp is None:
        return None
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(timestamp)) + \
            f".{int(timestamp * 1000) % 1000:03d}Z"
    except (OverflowError, OSError, ValueError):   # not a time a year can hold: no crash
        return None


class Registry:
    def __init__(self, wall_clock):
        self.wall_clock = wall_clock     # the loop's, for state_since
        self.backends = {}               # name -> Backend, for every state but UNLOADED
        # callables(backend, old_state, new_state), with the states users see: called when
        # that changes (a move between states shown alike is the registry's and the log's)
        self.listeners = []

    def get(self, name):
        return self.backends.get(name)

    def add(self, backend):
        if backend.name in self.backends:
            raise InvalidTransition(f"{backend.name} is already registered")
        self.backends[backend.name] = backend

    def transition(self, backend, new_phase, reason=""):
        """Move ``backend`` to state ``new_phase`` if the table allows it; log the edge."""
        old_phase = backend.phase
        if not states.allowed(old_phase, new_phase):
            raise InvalidTransition(
                f"{backend.name}: {old_phase} -> {new_phase} is not allowed ({reason})")
        old_state, new_state = states.shown(old_phase), states.shown(new_phase)
        backend.phase = new_phase
        backend.reason = reason
        if new_state != old_state:
            backend.state_since = self.wall_clock()
        level = logging.WARNING if new_state == states.FAILED != old_state else logging.INFO
        # The names users see, and the states themselves where they differ.
        inner = f" [{old_phase or '(new)'} -> {new_phase}]" if (
            old_phase != old_state or new_phase != new_state) else ""
        log.log(level, "model %s: %s -> %s%s%s", backend.name, old_state or "(new)", new_state,
                f" ({reason})" if reason else "", inner)
        if new_phase == states.UNLOADED:
            self.backends.pop(backend.name, None)
        if new_state == old_state:
            return
        for listener in list(self.listeners):
            listener(backend, old_state, new_state)

    def count_by_state(self):
        counts = collections.Counter(b.state for b in self.backends.values())   # as shown
        return dict(counts)

    def summary(self, counts=None):
        """One line for sd_notify STATUS= and the status command."""
        counts = self.count_by_state() if counts is None else counts
        if not counts:
            return "no models loaded"
        order = [states.READY, states.LOADING, states.RESTARTING, states.UNLOADING, states.FAILED,
                 states.PARKING, states.PARKED, states.WAKING]
        parts = [f"{counts[s]} {s}" for s in order if counts.get(s)]
        return "models: " + ", ".join(parts)
