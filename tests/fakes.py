"""Stand-ins at the edges of the manager and the scheduler, for in-process tests.

The real loop polls sockets and reads the system clocks; the real launchers start processes
or units; the real probe and liveness check talk to a backend over a DEALER socket. None of
that is what the manager and the scheduler decide, so these fakes replace it: time moves only
when a test advances it, a backend exits when the test says so, and a probe answers or fails
on the test's word. The real things are tested against the real daemon (test_restarts.py,
test_on_demand.py, test_liveness_progress.py...).
"""

import heapq
import itertools

from backend_mgmt import config
from backend_mgmt.launchers.base import ExitInfo, LaunchError, Launcher, Running
from backend_mgmt.loop import Timer
from backend_mgmt.manager import BackendManager
from backend_mgmt.parking import Parker
from backend_mgmt.scheduler import Scheduler

WALL_START = 1_800_000_000.0      # the fake wall clock, at monotonic 0


class FakeLoop:
    """EventLoop's timers and clocks; timers run only in ``advance``."""

    def __init__(self):
        self.now = 0.0
        self._timers = []
        self._seq = itertools.count()

    def clock(self):
        return self.now

    def wall_clock(self):
        return WALL_START + self.now

    def call_at(self, deadline, callback):
        timer = Timer(deadline, callback)       # the real loop's timers, run by advance()
        heapq.heappush(self._timers, (deadline, next(self._seq), timer))
        return timer

    def call_later(self, delay, callback):
        return self.call_at(self.now + delay, callback)

    def pending(self):
        """Deadlines of the timers not cancelled, soonest first."""
        return sorted(t.deadline for _, _, t in self._timers if not t.cancelled)

    def advance(self, seconds=0.0):
        """Move time on by ``seconds``, running each timer due on the way at its deadline."""
        until = self.now + seconds
        while self._timers and self._timers[0][0] <= until:
            deadline, _, timer = heapq.heappop(self._timers)
            if timer.cancelled:
                continue
            self.now = max(self.now, deadline)
            timer.callback()
        self.now = until


class FakeRunning(Running):
    """A started backend: ``exit()`` ends it as the launcher would report it."""

    def __init__(self, launch, pid, on_output, on_exit, unit=None):
        self.launch = launch
        self.pid = pid
        self.unit = unit
        self.on_output = on_output
        self._on_exit = on_exit
        self.exited = False
        self.stops = []                 # the stop timeouts asked for
        self.readiness = []             # what note_ready was told, in order

    def note_ready(self, protocols):
        self.readiness.append(protocols)

    def stop(self, timeout):
        self.stops.append(timeout)

    def kill(self):
        self.stops.append(0)

    def say(self, line):
        self.on_output(line)

    def exit(self, info=None):
        """It ends (by default as SIGTERM would end it)."""
        assert not self.exited, "a process exits once"
        self.exited = True
        self._on_exit(info or ExitInfo(signal=15))

    def set_exit_callback(self, on_exit):   # an adopted unit's handle
        self._on_exit = on_exit


class FakeLauncher(Launcher):
    """Starts FakeRunning handles; ``refuse`` makes the next start fail as a launch error.
    What it does not fake (recover, restart_pending, close) is the interface's default."""

    name = "fake"

    def __init__(self, units=False, loop=None):   # loop: for restart_pending's answer
        super().__init__(loop)
        self.units = units
        self.started = []               # FakeRunning, in order
        self.refuse = None              # a message: the next start raises LaunchError
        self._pids = itertools.count(1000)

    def start(self, launch, on_output, on_exit):
        if self.refuse is not None:
            message, self.refuse = self.refuse, None
            raise LaunchError(message)
        pid = next(self._pids)
        running = FakeRunning(launch, pid, on_output, on_exit,
                              unit=f"backend-{launch.name}-{pid}.service" if self.units else None)
        self.started.append(running)
        return running

    @property
    def last(self):
        return self.started[-1]


class FakeProbe:
    def __init__(self, loop, context, endpoint, model, on_ready, on_error):
        self.loop = loop
        self.context = context
        self.endpoint = endpoint
        self.model = model
        self.on_ready = on_ready
        self.on_error = on_error
        self.cancelled = False

    def answer(self, protocols=("inference",)):
        assert not self.cancelled, "a cancelled probe is not heard"
        self.on_ready(list(protocols))

    def fail(self, message="probe gave up"):
        assert not self.cancelled, "a cancelled probe is not heard"
        self.on_error(message)

    def cancel(self):
        self.cancelled = True


class FakeProbes:
    """The manager's probe_factory: every probe made, the last one at hand."""

    def __init__(self):
        self.made = []

    def __call__(self, loop, context, endpoint, model, on_ready, on_error=None):
        probe = FakeProbe(loop, context, endpoint, model, on_ready, on_error)
        self.made.append(probe)
        return probe

    @property
    def last(self):
        return self.made[-1]


class FakeLiveness:
    def __init__(self, loop, context, endpoint, model, protocols, settings, on_hung):
        self.asked = (loop, context, endpoint, model, protocols)
        self.settings = settings
        self.on_hung = on_hung
        self.stopped = False

    def hang(self, message="did not answer 3 pings"):
        self.on_hung(message)

    def stop(self):
        self.stopped = True


class FakeLivenessChecks:
    def __init__(self):
        self.made = []

    def __call__(self, loop, context, endpoint, model, protocols, settings, on_hung):
        check = FakeLiveness(loop, context, endpoint, model, protocols, settings, on_hung)
        self.made.append(check)
        return check

    @property
    def last(self):
        return self.made[-1]


class FakeParker(Parker):
    """Parks and wakes on the test's word: ``succeed()``, ``fail()``, ``time_out()`` finish the
    step in flight (its ``done`` runs from the loop, as parking.Parker promises). With
    ``seconds`` (step name -> seconds, or a callable(backend, step)), steps finish by
    themselves that long after they start, on the fake clock (the benchmark's way)."""

    def __init__(self, loop, backend, seconds=None):
        self.loop = loop
        self.backend = backend
        self.seconds = seconds
        self.calls = []                 # "park", "wake", "cancel", in order
        self.step = None                # (name, done) of the step in flight
        self._timer = None

    def park(self, done):
        self._begin("park", done)

    def wake(self, done):
        self._begin("wake", done)

    def cancel(self):
        self.calls.append("cancel")
        self.step = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _begin(self, name, done):
        assert self.step is None, "one step at a time"
        self.calls.append(name)
        self.step = (name, done)
        if self.seconds is not None:
            delay = self.seconds(self.backend, name) if callable(self.seconds) \
                else self.seconds[name]
            self._timer = self.loop.call_later(delay, lambda: self._finish(None))

    def _finish(self, error):
        self._timer = None
        _, done = self.step
        self.step = None
        done(error)

    def finish(self, error=None):
        assert self.step is not None, "no step in flight"
        if self._timer is not None:
            self._timer.cancel()
        self.loop.call_later(0, lambda: self._finish(error))
        self.loop.advance(0)

    def succeed(self):
        self.finish(None)

    def fail(self, message="the backend refused"):
        self.finish(message)

    def time_out(self):
        self.finish(f"no answer within {self.backend.spec.park.timeout:g} s")


class FakeParkers:
    """The manager's parker_factory: a FakeParker for each backend whose model has park:."""

    def __init__(self, loop, seconds=None):
        self.loop = loop
        self.seconds = seconds
        self.made = []

    def __call__(self, backend):
        if backend.spec.park is None:
            return None
        parker = FakeParker(self.loop, backend, self.seconds)
        self.made.append(parker)
        return parker

    def of(self, name):
        """The last parker made for model ``name``."""
        return [p for p in self.made if p.backend.name == name][-1]


def make_config(models, **settings):
    """A Config from the README's document form: ``models`` maps name -> model overrides."""
    document = {
        "model_backends": {"t": {"command": ["backend"]}},
        # A TCP endpoint of its own: nothing for the manager to create or secure on disk
        # (``"endpoint": None``: none, the manager picks one).
        "supported_models": [{key: value for key, value in {
            "name": name, "type": "t", "endpoint": f"tcp://127.0.0.1:{20000 + number}",
            **extra}.items() if value is not None}
            for number, (name, extra) in enumerate(models.items())],
        **settings,
    }
    return config.from_document(document)


class Core:
    """A manager and a scheduler over the fakes, as the daemon assembles them."""

    def __init__(self, models, runtime_dir, units=False, scheduler_class=Scheduler,
                 **settings):
        self.loop = FakeLoop()
        self.launcher = FakeLauncher(units=units, loop=self.loop)
        self.probes = FakeProbes()
        self.liveness = FakeLivenessChecks()
        self.context = object()         # the zmq context the probes would use
        self.events = []                # (model, shown old state, shown new state)
        self.reasons = []               # (model, shown new state, reason) of the same
        self.evicted = []               # (model, reason)
        self.parkers = FakeParkers(self.loop)
        self.manager = BackendManager(
            self.loop, self.context, make_config(models, **settings), self.launcher,
            str(runtime_dir),
            notify_address="@progress", probe_factory=self.probes,
            liveness_factory=self.liveness, parker_factory=self.parkers)
        self.manager.registry.listeners.append(
            lambda backend, old, new: self.events.append((backend.name, old, new)))
        self.manager.registry.listeners.append(
            lambda backend, old, new: self.reasons.append((backend.name, new, backend.reason)))
        self.published = []             # the states of events the scheduler published
        self.scheduler = scheduler_class(self.loop, self.manager, self._publish)
        self.runtime_dir = runtime_dir
        self.parks = []                 # what park callbacks were told (None: parked)
        self.answers = []               # (name, backend, error) of loads asked through load()
        self.unloaded = []              # names whose unload-model was answered

    def _publish(self, backend, state, reason):
        self.published.append(state)
        self.evicted.append((backend.name, reason))

    @property
    def registry(self):
        return self.manager.registry

    def get(self, name):
        return self.registry.get(name)

    def load(self, name, keep_alive=None):
        """Load through the scheduler (load-model, an on-demand handshake, preload)."""
        self.scheduler.load(name, lambda backend, error: self.answers.append(
            (name, backend, error)), keep_alive=keep_alive)
        self.loop.advance(0)

    def unload(self, name):
        self.manager.unload(name, lambda backend: self.unloaded.append(backend.name))
        self.loop.advance(0)

    def running(self, name):
        """The last process started for ``name``."""
        return [r for r in self.launcher.started if r.launch.name == name][-1]

    def ready(self, name, protocols=("inference",)):
        """``name``'s last probe is answered."""
        [probe] = [p for p in self.probes.made if p.model == name and not p.cancelled]
        probe.answer(protocols)
        self.loop.advance(0)

    def exit(self, name, info=None):
        self.running(name).exit(info)
        self.loop.advance(0)

    def load_ready(self, name, keep_alive=None):
        self.load(name, keep_alive)
        self.ready(name)

    def phase(self, name):
        backend = self.get(name)
        return backend.phase if backend is not None else None


# -- shared by the in-process parking tests ------------------------------------------------
PARK = {"protocol": True, "timeout": 5}        # a model type's park: (the FakeParkers park it)


def big(**extra):
    """A model that takes 60 GiB of one 80 GiB GPU: two never fit on one device."""
    return {"resources": {"gpus": 1, "gpu_memory": "60GiB"}, **extra}


def parker(core, name):
    """The FakeParker of ``name``'s current process."""
    return core.parkers.of(name)
