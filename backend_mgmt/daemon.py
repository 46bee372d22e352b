"""The daemon: start-up, signals, sd_notify, the watchdog and shutdown around one event loop.

``Service`` wires the parts together once, in ``start()``: the control endpoint (control.py),
the handshake front (front.py), reloads (reloading.py) and status/metrics (reporting.py) over
the manager and the scheduler. Requests flow socket -> wire -> commands -> scheduler/manager ->
launcher, and events (backend output, exits, readiness) come back through the loop.
"""

import functools
import logging
import os
import shutil
import signal

import zmq

from . import __version__, commands, errors, metrics, runtime, wire
from . import fdlimit, listeners, parking, progress
from .errors import ServiceError
from .launchers import systemd as systemd_launcher
from .loop import EventLoop
from .manager import BackendManager
from .notify import Notifier
from .progress import ProgressListener
from .events import EventPublisher
from .connguard import ConnectionGuard
from .control import ControlEndpoint
from .front import HandshakeFront
from .reloading import Reloader
from .reporting import Reporter, usage_targets
from .scheduler import Scheduler
from .scrape import ScrapeTarget, Unavailable as ScrapeUnavailable
from .sidethread import SideThread
from .usage import UsageMonitor

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 5.0                # seconds past the longest stop_timeout before giving up
CLOSE_LINGER_MS = 200               # at exit, for replies libzmq has not written out yet
SETTLE_WAIT = 0.2                   # s for the side thread to tell the gate what it accepted


class Service:
    def __init__(self, cfg, environ=None, launcher=None, backend_path=None, validated=None,
                 unit_listing=None):
        self.config = cfg                 # as started; reloads change manager.config
        # validated.ValidatedBytes: the bytes cfg came from (None: read the file again).
        self.validated = validated
        self.backend_path = backend_path
        self.environ = os.environ if environ is None else environ
        self.notifier = Notifier.from_environment(self.environ)
        # Listening sockets systemd kept for us across a restart (LISTEN_FDS), if any.
        self.listeners = listeners.Listeners.from_environment(self.environ, self.notifier)
        self.gate = None                  # listeners.HandshakeGate, made in start()
        self.runtime_dir = runtime.runtime_dir(cfg, self.environ)
        default_control, default_handshake = runtime.default_endpoints(self.runtime_dir)
        self.control_endpoint = cfg.cli_management or default_control
        self.handshake_endpoint = cfg.client_handshake or default_handshake
        self.events_endpoint = cfg.events or runtime.default_events_endpoint(self.runtime_dir)
        self.loop = EventLoop()
        self.context = zmq.Context()
        self.launcher = launcher          # chosen in start(), once the runtime dir exists
        # systemd_launcher.UnitListing begun early, for the systemd launcher's adoption.
        self.unit_listing = unit_listing
        self.lock = runtime.InstanceLock(self.runtime_dir)
        # Connection bookkeeping (the handshake gate, the guard's counts) off the loop.
        self.side = SideThread()
        self.guard = ConnectionGuard(self.loop, self.context, self.side)
        self.requests = {"control": 0, "handshake": 0, "errors": 0}
        self.request_durations = metrics.Histogram()
        self.shutting_down = False
        self.detaching = False            # shutting down for a restart: backends stay
        self.exit_code = 0
        # Built in start(), in this order, each given what it needs:
        self.progress = self.manager = self.scheduler = self.usage = None
        self.reporter = self.reloader = self.control = self.front = None
        self.waiting_handshakes = None
        self.events = None
        self.scrape = None                # scrape.ScrapeTarget with metrics.listen
        self._signal_pipe = None
        self._bound = []

    # -- start-up -------------------------------------------------------------------
    def start(self):
        """Build the parts and bind everything; raises runtime.StartupError with a clear
        message."""
        fdlimit.raise_to_hard()
        runtime.prepare_directory(self.runtime_dir, self.config.access.group)
        self.lock.acquire()
        try:
            if self.launcher is None:
                self.launcher = self._choose_launcher()
            # Backends report progress only once the manager launches them, so the listener
            # can be bound first and hand its address to the manager.
            self.progress = ProgressListener(
                self.loop, progress.listener_name(self.runtime_dir),
                lambda pid, fields: self.manager.on_progress(pid, fields))
            self._build(self.progress.address)
            self.manager.adopt(self.launcher.recover())
            # Operators reach the control socket, inference clients the handshake socket.
            self.gate = listeners.HandshakeGate(self.loop.clock, self.context)
            self.control = ControlEndpoint(
                self._bind("control", self.control_endpoint, self.config.access.control_mode,
                           self.config.access.group),
                commands.COMMANDS, commands.Parts(
                    manager=self.manager, scheduler=self.scheduler, reporter=self.reporter,
                    reloader=self.reloader, stop=self.begin_shutdown),
                self.requests, self.request_durations, self._stopping, commands.CHANGING,
                restarting=self._restarting, heard=self.gate.seen)
            self.loop.add_reader(self.control.socket, self.control.on_readable)
            self.front = HandshakeFront(
                self.loop, self._bind("handshake", self.handshake_endpoint,
                                      self.config.access.handshake_mode,
                                      self.config.access.client_group),
                self.manager, self.scheduler, self.requests, self.waiting_handshakes,
                self._stopping, restarting=self._restarting, heard=self.gate.seen)
            self.loop.add_reader(self.front.socket, self.front.on_readable)
            self.events = self._bind_events()
            self.listeners.forget_unclaimed()
            self.guard.start()
            self.side.start()
            self._serve_metrics()
        except BaseException:
            self.close()
            raise
        self._install_signals()
        log.info("backend-mgmt %s serving: control %s, handshake %s, %d models configured, "
                 "launcher %s", __version__, self.control_endpoint, self.handshake_endpoint,
                 len(self.config.models), self.launcher.name)
        self.notifier.ready(self.reporter.status_line())
        if self.validated is not None:
            self.validated.record()     # for the next start; after READY=1, off the clients' path
        if self.notifier.watchdog_interval:
            self._schedule_watchdog()
        self._preload()

    def _build(self, notify_address):
        """The parts that need no socket of their own, each given what it needs."""
        self.manager = BackendManager(
            self.loop, self.context, self.config, self.launcher, self.runtime_dir,
            notify_address=notify_address,
            parker_factory=lambda backend: parking.parker_for(self.loop, self.context, backend))
        self.manager.registry.listeners.append(self._on_transition)   # before the scheduler's
        self.scheduler = Scheduler(self.loop, self.manager, self._on_scheduler_event)
        # Found on the daemon's own PATH (systemd's fixed one under the unit); it then runs
        # with a clean environment, like every helper (isolation.py).
        self.usage = UsageMonitor(self.loop, functools.partial(usage_targets,
                                                               self.manager.registry),
                                  shutil.which("nvidia-smi"))
        self.waiting_handshakes = {}      # model -> handshakes waiting: the front's, shown
        self.reporter = Reporter(
            self.loop, self.manager, self.scheduler, self.usage, self.guard,
            {"client": self.handshake_endpoint, "cli": self.control_endpoint,
             "events": self.events_endpoint},
            self.requests, self.request_durations, self.launcher.name, self.runtime_dir,
            self.metrics_url, self._stopping, self.waiting_handshakes)
        self.reloader = Reloader(self.loop, self.manager, self.notifier, self.runtime_dir,
                                 self.reporter.status_line, self.backend_path, self.validated)

    def _bind(self, role, endpoint, mode, group):
        """A listening ROUTER socket on ``endpoint``, its file given ``mode`` and ``group``,
        its connections counted by the guard. An ipc:// one listens on a socket the daemon
        binds itself (or got back from systemd's fd store: listeners.py)."""
        listening = self.listeners.open(role, endpoint, mode, group)   # None: not ipc://
        sock = self.context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, wire.HARD_FRAME_LIMIT)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        listeners.HandshakeGate.guard(sock)
        bind = listening.attach if listening is not None else (lambda s: s.bind(endpoint))
        try:
            if listening is None:
                runtime.claim_ipc_endpoint(endpoint)
            bind(sock)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise runtime.StartupError(f"cannot bind {endpoint}: {exc}") from None
        self._bound.append((sock, endpoint))
        runtime.restrict_socket_file(endpoint, mode, group)
        self.guard.watch(sock, endpoint, lambda: runtime.restrict_socket_file(
            endpoint, mode, group), rebind=lambda: bind(sock), arrivals=self.gate)
        return sock

    def _bind_events(self):
        listening = self.listeners.open("events", self.events_endpoint,
                                        self.config.access.events_mode, self.config.access.group)
        if listening is None:
            runtime.claim_ipc_endpoint(self.events_endpoint)
        bind = listening.attach if listening is not None else None
        try:
            publisher = EventPublisher.bind(self.context, self.events_endpoint, bind)
        except zmq.ZMQError as exc:
            raise runtime.StartupError(f"cannot bind {self.events_endpoint}: {exc}") from None
        self._bound.append((publisher.socket, self.events_endpoint))
        runtime.restrict_socket_file(self.events_endpoint, self.config.access.events_mode,
                                     self.config.access.group)
        self.guard.watch(publisher.socket, self.events_endpoint,
                         lambda: runtime.restrict_socket_file(
                             self.events_endpoint, self.config.access.events_mode,
                             self.config.access.group),
                         rebind=(lambda: bind(publisher.socket)) if bind else None)
        self.manager.registry.listeners.append(publisher.on_transition)
        return publisher

    def _serve_metrics(self):
        if self.config.metrics_listen is None:
            return
        host, port = self.config.metrics_listen
        target = ScrapeTarget(self.loop, self.reporter.metrics_text, host, port)
        try:
            target.start()
        except ScrapeUnavailable as exc:
            # The models matter more than their metrics: serve them, and say why not these.
            log.error("metrics.listen: not serving metrics: %s", exc)
            return
        self.scrape = target
        log.info("serving metrics at %s", self.metrics_url())

    def metrics_url(self):
        if self.scrape is None:
            return None
        host = f"[{self.scrape.host}]" if ":" in self.scrape.host else self.scrape.host
        return f"http://{host}:{self.scrape.port}/metrics"

    def _on_scheduler_event(self, backend, state, reason):
        self.reporter.on_scheduler_event(backend, state)
        if self.events is not None:
            self.events.publish(backend, state, backend.state, reason)

    def _on_transition(self, backend, old_state, new_state):
        self.reporter.on_transition(backend, old_state, new_state)
        self.notifier.status(self.reporter.status_line())

    def _stopping(self):
        return self.shutting_down

    def _restarting(self):
        return self.detaching

    def _preload(self):
        for name in self.config.preload:
            def done(backend, error, name=name):
                if error is not None:
                    log.error("preload of %s failed: %s", name, error.message)
            try:
                self.scheduler.load(name, done)
            except ServiceError as error:
                log.error("preload of %s refused: %s", name, error.message)

    def _choose_launcher(self):
        kind = self.config.launcher
        if kind == "auto":
            kind = "systemd" if systemd_launcher.running_under_systemd(self.environ) else "process"
        if kind == "systemd":
            listing, self.unit_listing = self.unit_listing, None
            return systemd_launcher.SystemdLauncher(self.loop, self.runtime_dir, listing)
        self.close_unit_listing()
        # Imported only when chosen: under systemd the daemon never loads it.
        from .launchers.child import ChildLauncher
        return ChildLauncher(self.loop, self.environ)

    def close_unit_listing(self):
        """The early listing of units was for a launcher that is not used: end it."""
        if self.unit_listing is not None:
            self.unit_listing.close()
            self.unit_listing = None

    def _install_signals(self):
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._signal_pipe = (read_end, write_end)
        signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            # The Python-level handler does nothing: the wakeup fd carries the signal number
            # into the loop, where it is handled like any other event.
            signal.signal(signum, lambda *_: None)
        self.loop.add_reader(read_end, self._on_signal)

    def _on_signal(self):
        try:
            data = os.read(self._signal_pipe[0], 64)
        except BlockingIOError:
            return
        for signum in data:
            if signum in (signal.SIGTERM, signal.SIGINT):
                name = signal.Signals(signum).name
                if self.shutting_down and self.detaching:
                    log.info("%s while restarting: already on the way out", name)
                elif self.shutting_down:
                    log.warning("%s during shutdown: killing the remaining backends now", name)
                    for backend in self.manager.registry.backends.values():
                        if backend.running is not None:
                            backend.running.kill()
                elif signum == signal.SIGTERM:
                    # Backends in their own units can outlive a restart of the service
                    # (systemctl restart, a package upgrade); only a stop stops them.
                    self.launcher.restart_pending(
                        lambda restarting, n=name: self.begin_detach(n) if restarting
                        else self.begin_shutdown(n))
                else:
                    self.begin_shutdown(name)
            elif signum == signal.SIGHUP and not self.shutting_down:
                self.reloader.reload(None, "SIGHUP")

    def _schedule_watchdog(self):
        # Pinged from the loop itself, so a stuck loop stops the pings and systemd acts.
        self.notifier.watchdog()
        self.loop.call_later(self.notifier.watchdog_interval, self._schedule_watchdog)

    # -- running --------------------------------------------------------------------
    def run(self):
        self.loop.run()
        return self.exit_code

    def serve(self):
        """start(), run until shut down, clean up; the process exit code."""
        self.start()
        try:
            return self.run()
        finally:
            self.close()

    # -- shutdown -------------------------------------------------------------------
    def begin_shutdown(self, why):
        if self.shutting_down:
            return
        self.shutting_down = True
        if self.validated is not None:
            self.validated.forget()
        count = len(self.manager.registry.backends)
        log.info("shutting down (%s): stopping %d backends", why, count)
        self.notifier.stopping(f"stopping {count} backends")
        longest = max((b.spec.stop_timeout for b in self.manager.registry.backends.values()),
                      default=0.0)
        self.loop.call_later(longest + SHUTDOWN_GRACE, self._shutdown_overdue)
        self.scheduler.cancel_queued(ServiceError(errors.SHUTTING_DOWN,
                                                  "the service is shutting down"))
        self.manager.unload_all(self._all_stopped, reason=f"shutdown ({why})")

    def begin_detach(self, why):
        """Exit, leaving the backend units running for the next daemon to adopt."""
        if self.shutting_down:
            return
        self.shutting_down = self.detaching = True
        count = len(self.manager.registry.backends)
        log.info("service restarting (%s): leaving %d backends running for the next daemon",
                 why, count)
        self.notifier.stopping(f"restarting; {count} backends keep running")
        # Lose no request: new connections wait (the gate holds their handshakes; systemd
        # keeps the listening sockets for the next daemon), loads in progress are answered
        # with the retryable shutting_down, and what the open connections bring is answered
        # until every connection let in lately has been heard and they fall quiet.
        self.gate.close(settle=lambda: self.side.call_and_wait(lambda: None, SETTLE_WAIT))
        restarting = ServiceError(errors.SHUTTING_DOWN,
                                  "the service is restarting; load again once it is back")
        self.scheduler.cancel_queued(restarting)
        self.manager.detach_all()
        # Whatever else waits (unload-model, park-model) is answered too; the client asks
        # the next daemon, which finishes an unload (it adopts a unit being stopped as
        # unloading) and stops a model caught mid-park.
        self.control.answer_waiting(ServiceError(
            errors.SHUTTING_DOWN, "the service is restarting; ask again once it is back"))
        listeners.stop_when_quiet(
            self.loop, lambda: self.requests["control"] + self.requests["handshake"],
            self.loop.stop, self.gate.unheard)

    def _all_stopped(self):
        log.info("all backends stopped")
        self.loop.stop()

    def _shutdown_overdue(self):
        left = list(self.manager.registry.backends)
        log.error("backends still not gone after their stop timeouts: %s; exiting anyway",
                  ", ".join(left))
        self.exit_code = 1
        self.loop.stop()

    def close(self):
        self.close_unit_listing()
        if self.scrape is not None:
            self.scrape.close()
            self.scrape = None
        if self.usage is not None:
            self.usage.close()
        if self.launcher is not None:
            self.launcher.close()
        if self.progress is not None:
            self.progress.close()
            self.progress = None
        self.side.stop()           # then its sockets are ours to close
        self.guard.close()
        kept = self.listeners.stored       # systemd keeps them: the path must stay
        for sock, endpoint in self._bound:
            self.loop.remove_reader(sock)
            sock.close(linger=CLOSE_LINGER_MS)    # replies already sent still go out
            if not kept:
                runtime.remove_socket_file(endpoint)
        self._bound = []          # a late reply finds its socket closed and is dropped
        self.listeners.close(unlink=False)
        if self.gate is not None:
            self.gate.shut()
        if self._signal_pipe is not None:
            signal.set_wakeup_fd(-1)
            for fd in self._signal_pipe:
                os.close(fd)
            self._signal_pipe = None
        self.context.destroy(linger=0)   # closes any probe socket a timeout left open
        self.loop.close()
        self.lock.release()
        self.notifier.close()

