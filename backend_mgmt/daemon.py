"""The daemon: sockets, signals, sd_notify and the watchdog around one event loop.

``Service`` wires the parts together; requests flow socket -> wire -> commands -> manager ->
launcher, and events (backend output, exits, readiness) come back through the loop.
"""

import json
import logging
import os
import shutil
import signal
import socket
import time

import zmq

from . import __version__, commands, config as config_module, errors, metrics, runtime, states
from . import fdlimit, files, isolation, peers, placement, wire
from .launchers.command import run_async
from .errors import ServiceError
from .launchers import systemd as systemd_launcher
from .launchers.child import ChildLauncher
from .loop import EventLoop
from .manager import BackendManager
from . import progress
from .notify import Notifier
from .progress import ProgressListener
from .events import EventPublisher
from .connguard import ConnectionGuard
from .registry import iso_time
from .reloads import ReloadQueue
from .scheduler import Scheduler
from .scrape import ScrapeTarget, Unavailable as ScrapeUnavailable
from .usage import UsageMonitor

log = logging.getLogger(__name__)

MAX_MESSAGES_PER_WAKE = 64          # then let other sockets and timers have a turn
SHUTDOWN_GRACE = 5.0                # seconds past the longest stop_timeout before giving up


class Reply:
    """Exactly one reply per request: later calls are ignored (and logged)."""

    __slots__ = ("service", "envelope", "correlation_id", "command", "sent", "received",
                 "_frame", "_requester")

    def __init__(self, service, envelope, correlation_id, command, frame=None):
        self.service = service
        self.envelope = envelope
        self.correlation_id = correlation_id
        self.command = command
        self.sent = False
        self.received = time.perf_counter()
        self._frame = frame             # the request's zmq.Frame, to tell who sent it
        self._requester = None

    @property
    def requester(self):
        """Who sent the request, as the kernel reports it (peers.py); asked only when a
        request changes something, so status pays nothing for it."""
        if self._requester is None:
            self._requester = peers.describe(self._frame) if self._frame is not None \
                else "an unknown peer"
        return self._requester

    def ok(self, data):
        self._send(lambda: wire.encode_success(self.correlation_id, data))

    def ok_json(self, data_json):
        self._send(lambda: wire.encode_success_json(self.correlation_id, data_json))

    def fail(self, error):
        data = {k: v for k, v in (error.data or {}).items() if k not in ("envelope",)}
        self._send(lambda: wire.encode_error(self.correlation_id, error.code, error.message,
                                             data))

    def _send(self, encode):
        if self.sent:
            log.error("second reply to %s request dropped", self.command)
            return
        try:
            payload = encode()
        except Exception:        # never leave a client without its one reply
            log.exception("cannot encode the reply to a %s request", self.command)
            payload = wire.encode_error(None, errors.INTERNAL,
                                        "internal error encoding the reply; see the service log")
        self.sent = True
        self.service.send_control(self.envelope.reply(payload))
        self.service.request_durations.observe(
            self.command if self.command in commands.COMMANDS else "(invalid)",
            time.perf_counter() - self.received)


class Service:
    def __init__(self, cfg, environ=None, launcher=None, backend_path=None):
        self.config = cfg
        self.backend_path = backend_path
        self._config_bytes = self._read_config_bytes()
        self._reloads = ReloadQueue()   # the reload under way and those waiting for it
        self.environ = os.environ if environ is None else environ
        self.notifier = Notifier.from_environment(self.environ)
        self.runtime_dir = runtime.runtime_dir(cfg, self.environ)
        default_control, default_handshake = runtime.default_endpoints(self.runtime_dir)
        self.control_endpoint = cfg.cli_management or default_control
        self.handshake_endpoint = cfg.client_handshake or default_handshake
        self.events_endpoint = cfg.events or runtime.default_events_endpoint(self.runtime_dir)
        self.loop = EventLoop()
        self.context = zmq.Context()
        self.launcher = launcher          # chosen in start(), once the runtime dir exists
        self.manager = BackendManager(self.loop, self.context, cfg, launcher, self.runtime_dir)
        self.manager.registry.listeners.append(self._on_transition)
        self.events = None
        self.scheduler = Scheduler(self.loop, self.manager, self._publish_event)
        self.lock = runtime.InstanceLock(self.runtime_dir)
        self.control = self.handshake = None
        self.guard = ConnectionGuard(self.loop, self.context)
        self.progress = None
        self.hostname = socket.gethostname()
        self.started_at = time.time()
        self.started_mono = time.monotonic()
        self.shutting_down = False
        self.exit_code = 0
        self.requests = {"control": 0, "handshake": 0, "errors": 0}
        self._waiting_handshakes = {}   # model name -> on-demand handshakes waiting for it
        self.request_durations = metrics.Histogram()
        self.load_durations = metrics.Histogram(metrics.LOAD_BUCKETS)
        self.evictions = {}               # model name -> times evicted
        self.scrape = None                # scrape.ScrapeTarget with metrics.listen
        # Found on the daemon's own PATH (systemd's fixed one under the unit); it then runs
        # with a clean environment, like every helper (isolation.py).
        self.usage = UsageMonitor(self.loop, self._usage_targets, shutil.which("nvidia-smi"))
        self._signal_pipe = None
        self._bound = []

    # -- start-up -------------------------------------------------------------------
    def start(self):
        """Bind everything; raises runtime.StartupError with a clear message."""
        fdlimit.raise_to_hard()
        runtime.prepare_directory(self.runtime_dir, self.config.access.group)
        self.lock.acquire()
        try:
            if self.launcher is None:
                self.launcher = self._choose_launcher()
            self.manager.launcher = self.launcher
            self.progress = ProgressListener(
                self.loop, progress.listener_name(self.runtime_dir), self.manager.on_progress)
            self.manager.notify_address = self.progress.address
            if hasattr(self.launcher, "recover"):
                self.manager.adopt(self.launcher.recover())
            # Operators reach the control socket, inference clients the handshake socket.
            self.control = self._bind(self.control_endpoint, self.config.access.control_mode,
                                      self.config.access.group, self._on_control)
            self.handshake = self._bind(self.handshake_endpoint,
                                        self.config.access.handshake_mode,
                                        self.config.access.client_group, self._on_handshake)
            self.events = self._bind_events()
            self.guard.start()
            self._serve_metrics()
        except BaseException:
            self.close()
            raise
        self._install_signals()
        log.info("backend-mgmt %s serving: control %s, handshake %s, %d models configured, "
                 "launcher %s", __version__, self.control_endpoint, self.handshake_endpoint,
                 len(self.config.models), self.launcher.name)
        self.notifier.ready(self.status_line())
        if self.notifier.watchdog_interval:
            self._schedule_watchdog()
        self._preload()

    def _bind(self, endpoint, mode, group, handler):
        runtime.claim_ipc_endpoint(endpoint)
        sock = self.context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, wire.HARD_FRAME_LIMIT)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise runtime.StartupError(f"cannot bind {endpoint}: {exc}") from None
        self._bound.append((sock, endpoint))
        runtime.restrict_socket_file(endpoint, mode, group)
        self.guard.watch(sock, endpoint, lambda: runtime.restrict_socket_file(
            endpoint, mode, group))
        self.loop.add_reader(sock, handler)
        return sock

    def _bind_events(self):
        runtime.claim_ipc_endpoint(self.events_endpoint)
        try:
            publisher = EventPublisher.bind(self.context, self.events_endpoint)
        except zmq.ZMQError as exc:
            raise runtime.StartupError(f"cannot bind {self.events_endpoint}: {exc}") from None
        self._bound.append((publisher.socket, self.events_endpoint))
        runtime.restrict_socket_file(self.events_endpoint, self.config.access.events_mode,
                                     self.config.access.group)
        self.guard.watch(publisher.socket, self.events_endpoint,
                         lambda: runtime.restrict_socket_file(
                             self.events_endpoint, self.config.access.events_mode,
                             self.config.access.group))
        self.manager.registry.listeners.append(publisher.on_transition)
        return publisher

    def _serve_metrics(self):
        if self.config.metrics_listen is None:
            return
        host, port = self.config.metrics_listen
        target = ScrapeTarget(self.loop, self.metrics_text, host, port)
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

    def _publish_event(self, backend, state, reason):
        if state == "evicted":
            self.evictions[backend.name] = self.evictions.get(backend.name, 0) + 1
        if self.events is not None:
            self.events.publish(backend, state, backend.state, reason)

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
            return systemd_launcher.SystemdLauncher(self.loop, self.runtime_dir)
        return ChildLauncher(self.loop, self.environ)

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
                if self.shutting_down:
                    log.warning("%s during shutdown: killing the remaining backends now", name)
                    for backend in self.manager.registry.backends.values():
                        if backend.running is not None:
                            backend.running.kill()
                elif signum == signal.SIGTERM and hasattr(self.launcher, "restart_pending"):
                    # Backends in their own units can outlive a restart of the service
                    # (systemctl restart, a package upgrade); only a stop stops them.
                    self.launcher.restart_pending(
                        lambda restarting, n=name: self.begin_detach(n) if restarting
                        else self.begin_shutdown(n))
                else:
                    self.begin_shutdown(name)
            elif signum == signal.SIGHUP and not self.shutting_down:
                self.reload(None, "SIGHUP")

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

    # -- control socket -------------------------------------------------------------
    def _on_control(self):
        self._drain(self.control, "control", self._handle_control, keep_frames=True)

    def _drain(self, sock, kind, handle, keep_frames=False):
        """Handle what is queued on ``sock``, up to a fair share per wake-up. Asking EVENTS
        first avoids a zmq.Again exception per wake-up, which costs more than the check.
        ``keep_frames``: also pass the last zmq.Frame, which knows who sent the message."""
        for _ in range(MAX_MESSAGES_PER_WAKE):
            if sock.closed or not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                return
            self.requests[kind] += 1
            if keep_frames:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                handle([frame.bytes for frame in frames], frames[-1])
            else:
                handle(sock.recv_multipart(zmq.NOBLOCK))

    def _handle_control(self, frames, last_frame=None):
        try:
            envelope, payload = wire.split_envelope(frames)
        except ServiceError as error:
            self.requests["errors"] += 1
            envelope = error.data["envelope"]
            if envelope is not None:
                self.send_control(envelope.reply(wire.encode_error(None, error.code,
                                                                   error.message)))
            return
        reply = Reply(self, envelope, None, "?", last_frame)
        try:
            request = wire.parse_control(payload)
            reply.correlation_id = request.correlation_id
            reply.command = request.command
            if request.command in commands.CHANGING:
                name = request.params.get("model_name") if isinstance(request.params,
                                                                     dict) else None
                log.info("%s%s requested by %s", request.command,
                         f" {name}" if isinstance(name, str) else "", reply.requester)
            if self.shutting_down and request.command != "status":
                raise ServiceError(errors.SHUTTING_DOWN, "the service is shutting down")
            handler = commands.COMMANDS.get(request.command)
            if handler is None:
                raise ServiceError(errors.UNKNOWN_COMMAND,
                                   f"unknown command {request.command!r}; known: "
                                   f"{', '.join(sorted(commands.COMMANDS))}")
            handler(self, request.params, reply)
        except ServiceError as error:
            self.requests["errors"] += 1
            if error.data and "correlation_id" in error.data:   # parsed far enough to know it
                reply.correlation_id = error.data.pop("correlation_id")
            reply.fail(error)
        except Exception:
            self.requests["errors"] += 1
            log.exception("internal error handling a control request")
            if not reply.sent:
                reply.fail(ServiceError(errors.INTERNAL, "internal error; see the service log"))

    def send_control(self, frames):
        if self.control is None:
            return
        try:
            self.control.send_multipart(frames, zmq.NOBLOCK)
        except zmq.ZMQError as exc:   # peer gone or its queue full: drop, never block
            log.debug("control reply dropped: %s", exc)

    # -- handshake socket -----------------------------------------------------------
    def _on_handshake(self):
        self._drain(self.handshake, "handshake", self._handle_handshake)

    def _handle_handshake(self, frames):
        try:
            envelope, payload = wire.split_envelope(frames)
        except ServiceError as error:
            if error.data["envelope"] is not None:
                self._send_handshake(error.data["envelope"].reply(
                    wire.encode_handshake_reply(error_message=error.message)))
            return
        try:
            name = wire.parse_handshake(payload) or self.config.default_model
            if not name:
                raise ServiceError(errors.MISSING_PARAM,
                                   "no model requested and no default_model configured")
            spec = self.manager.resolve(name)
            backend = self.manager.registry.get(spec.name)
            if backend is None or not backend.answers_clients:
                # On demand: a model not loaded, or on its way. A failed one stays failed
                # until load-model: clients should not turn a crash loop into a load loop.
                if spec.on_demand and not self.shutting_down and (
                        backend is None or backend.state != states.FAILED):
                    self._load_for_handshake(envelope, spec)
                    return
                backend = self.manager.ready_backend(name)      # raises: says why not
            self.scheduler.touch(backend)
            answer = wire.encode_handshake_reply(endpoint=backend.endpoint,
                                                 protocols=backend.protocols)
        except ServiceError as error:
            answer = wire.encode_handshake_reply(error_message=error.message)
        self._send_handshake(envelope.reply(answer))

    def _load_for_handshake(self, envelope, spec):
        """On-demand: answer once the model is ready (or failed), within handshake_timeout.
        A client that gives up only loses its answer; the load goes on for the others.
        At most max_waiting_handshakes wait in all, max_waiting_handshakes_per_model for
        one model: a client past that is told so at once."""
        name = spec.name
        waiting_here = self._waiting_handshakes.get(name, 0)
        waiting = sum(self._waiting_handshakes.values())
        if waiting_here >= self.config.max_waiting_handshakes_per_model or \
                waiting >= self.config.max_waiting_handshakes:
            limit = (f"{waiting_here} clients already wait for model {name} "
                     f"(max_waiting_handshakes_per_model "
                     f"{self.config.max_waiting_handshakes_per_model})"
                     if waiting_here >= self.config.max_waiting_handshakes_per_model else
                     f"{waiting} clients already wait for models to load "
                     f"(max_waiting_handshakes {self.config.max_waiting_handshakes})")
            self._send_handshake(envelope.reply(wire.encode_handshake_reply(
                error_message=f"model {name} is not ready and {limit}; try again later")))
            return
        self._waiting_handshakes[name] = waiting_here + 1
        answered = []

        def answer(payload):
            if not answered:
                answered.append(True)
                timer.cancel()
                left = self._waiting_handshakes.get(name, 1) - 1
                if left > 0:
                    self._waiting_handshakes[name] = left
                else:
                    self._waiting_handshakes.pop(name, None)
                self._send_handshake(envelope.reply(payload))

        def done(backend, error):
            if error is not None:
                answer(wire.encode_handshake_reply(error_message=error.message))
            else:
                answer(wire.encode_handshake_reply(endpoint=backend.endpoint,
                                                   protocols=backend.protocols))
        timeout = self.config.handshake_timeout
        timer = self.loop.call_later(timeout, lambda: answer(wire.encode_handshake_reply(
            error_message=f"model {spec.name} is not ready after {timeout:g} s "
                          f"(handshake_timeout); it is still loading")))
        try:
            self.scheduler.load(spec.name, done)
        except ServiceError as error:
            answer(wire.encode_handshake_reply(error_message=error.message))

    def _send_handshake(self, frames):
        try:
            self.handshake.send_multipart(frames, zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.debug("handshake reply dropped: %s", exc)

    # -- reloading the configuration ------------------------------------------------
    def _read_config_bytes(self):
        try:
            with open(self.config.path, "rb") as stream:
                return stream.read()
        except OSError:
            return None

    def reload(self, done, why):
        """Re-read and validate the config (in a child process, so the loop keeps serving),
        then apply it if valid. ``done(ConfigChange or ServiceError)``; None to just log.

        The answer is for the file as it is now: a request joins a validation of the same
        bytes, else waits for one of its own (reloads.py)."""
        data = self._read_config_bytes()
        log.info("reload of the configuration from %s asked for (%s)", self.config.path, why)
        self._reloads.add(data, done)
        self._next_reload()

    def _next_reload(self):
        entry = self._reloads.start_next()
        if entry is None:
            return
        try:
            self.notifier.reloading(time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)
            if entry.data is not None and entry.data == self._config_bytes:
                # Same bytes, same validated result: nothing to validate or change.
                self.loop.call_later(0, lambda: self._reload_done(config_module.ConfigChange()))
                return
            args = [isolation.absolute(self.config.path)]
            if entry.data is not None:
                args.append(self._write_snapshot(entry.data))
            run_async(self.loop, isolation.python_argv("backend_mgmt.validate", *args),
                      self._validated, timeout=60)
        except Exception as exc:     # e.g. out of file descriptors: answer, never jam
            log.exception("cannot start validating the configuration")
            self._reload_done(ServiceError(
                errors.INTERNAL, f"configuration not reloaded: {exc}; the running "
                                 f"configuration is unchanged"))

    def _snapshot_path(self):
        return os.path.join(self.runtime_dir, "config-reload.snapshot")

    def _write_snapshot(self, data):
        """The bytes a reload is for, where the validating child reads them (0600: a config
        may hold secrets in env)."""
        path = self._snapshot_path()
        files.write_atomic(path, data, mode=0o600)
        return path

    def _validated(self, result):
        try:
            new = config_module.from_validation_output(
                result.stdout, self.config.path, self.backend_path,
                detail="" if result.ok else result.describe())
        except config_module.ConfigError as exc:
            problems = exc.problems
            for problem in problems:
                log.error("%s", problem)
            log.error("configuration not reloaded (%d problem(s)); the running configuration "
                      "is unchanged", len(problems))
            self._reload_done(ServiceError(
                errors.CONFIG_INVALID, f"configuration not reloaded, {len(problems)} "
                f"problem(s): {problems[0]}; the running configuration is unchanged",
                data={"problems": problems}))
            return
        except Exception as exc:
            log.exception("reading the validated configuration failed")
            self._reload_done(ServiceError(errors.INTERNAL, f"configuration not reloaded: "
                                                            f"{exc}; see the service log"))
            return
        old = self.config
        try:
            change = config_module.diff(old, new)
            self._apply(new, change)
        except Exception as exc:
            # What was started (unloads) goes on; the old config stays the reference, so the
            # next reload of this file finds the same differences and finishes the job.
            self.config = self.manager.config = old
            log.exception("applying the reloaded configuration failed")
            self._reload_done(ServiceError(errors.INTERNAL, f"configuration reload failed while "
                                                            f"applying it: {exc}; see the "
                                                            f"service log"))
            return
        self._config_bytes = self._reloads.running.data
        self._reload_done(change)

    def _apply(self, new, change):
        self.config = new
        self.manager.config = new
        if "log_level" in change.settings:
            logging.getLogger().setLevel(getattr(logging, new.log_level, logging.INFO))
        for name in change.removed:
            backend = self.manager.registry.get(name)
            if backend is not None:
                self.manager.unload_backend(backend, lambda b: None,
                                            "removed from the configuration")
        for name in change.changed:
            backend = self.manager.registry.get(name)
            if backend is not None:
                self.manager.reload_backend(backend, new.models[name])
        for key in change.need_restart:
            log.warning("configuration key %s changed: restart the service to apply it", key)
        log.info("configuration reloaded: %s", config_module.describe_change(change.as_dict()))

    def _reload_done(self, outcome):
        """Whatever happened: READY=1 for systemd, every request answered, the next reload
        started."""
        entry = self._reloads.finish()
        try:
            os.unlink(self._snapshot_path())
        except OSError:
            pass
        try:
            self.notifier.ready(self.status_line())
        except Exception:
            log.exception("cannot tell systemd the reload is over")
        for done in entry.waiters if entry is not None else ():
            if done is None:
                continue
            try:
                done(outcome)
            except Exception:
                log.exception("answering a reload request failed")
        self._next_reload()

    # -- status ---------------------------------------------------------------------
    def status_line(self):
        prefix = "stopping; " if self.shutting_down else ""
        return prefix + self.manager.registry.summary()

    def _on_transition(self, backend, old_state, new_state):
        self.notifier.status(self.status_line())
        if new_state == states.READY and old_state == states.LOADING and \
                backend.ready_at is not None and backend.started_at is not None:
            self.load_durations.observe(backend.name, backend.ready_at - backend.started_at)

    def metrics_text(self):
        return metrics.render(self.status_data(), self.request_durations,
                              [s for s in sorted(states.VISIBLE)], self.load_durations,
                              self.evictions)

    def _usage_targets(self):
        """{name: (pid, unit)} of every backend whose process runs, for usage.py."""
        return {b.name: (b.pid, b.unit) for b in self.manager.registry.backends.values()
                if b.process_alive}

    def _measure_gpus(self):
        """Real free memory from nvidia-smi where there is one: usage.py's last reading,
        refreshed in the background so status never waits for it."""
        if not self.config.gpus:
            return None
        return self.usage.devices

    def model_status(self, backend, now_wall=None, now_mono=None):
        entry = backend.as_status(now_wall, now_mono)
        entry["unload_at"] = iso_time(self.scheduler.unload_at(backend))
        entry["keep_alive"] = self.scheduler.keep_alive(backend)
        entry["pinned"] = backend.spec.pinned
        entry["usage"] = self.usage.entry(backend.name, backend.pid)   # the cached reading
        return entry

    def status_json(self):
        """status.data as JSON text. Each model's entry is encoded once per change of the
        backend (Backend.version) or of the usage reading, and only its uptime is added per
        request, so status stays cheap with hundreds of models loaded."""
        now_mono = time.monotonic()
        data = self.status_data(with_models=False)
        reading = self.usage.refreshes
        entries = []
        for backend in self.manager.registry.backends.values():
            if backend.state not in states.VISIBLE:
                continue
            cached = backend.status_json
            key = (backend.version, reading)
            if cached is None or cached[0] != key:
                entry = self.model_status(backend)
                del entry["uptime"]
                cached = (key, json.dumps(entry, separators=(",", ":"), default=str)[:-1])
                backend.status_json = cached
            entries.append(f'{cached[1]},"uptime":{backend.uptime(now_mono)}}}')
        head = json.dumps(data, separators=(",", ":"), default=str)[:-1]
        return f'{head},"models":[{",".join(entries)}]}}'

    def status_data(self, with_models=True):
        now_wall, now_mono = time.time(), time.monotonic()
        counts = self.manager.registry.count_by_state()
        self.usage.current()             # a refresh in the background when it is stale
        models = [self.model_status(backend, now_wall, now_mono)
                  for backend in self.manager.registry.backends.values()
                  if backend.state in states.VISIBLE] if with_models else None
        data = {
            "service_status": "stopping" if self.shutting_down else "running",
            "client_endpoint": self.handshake_endpoint,
            "cli_endpoint": self.control_endpoint,
            "events_endpoint": self.events_endpoint,
            "max_loaded_models": self.config.max_loaded_models,
            "queued": [name for name, _, _ in self.scheduler.queue],
            "waiting_handshakes": dict(self._waiting_handshakes),
            "gpus": placement.device_status(self.config.gpus, self.scheduler.assignments,
                                            self._measure_gpus()),
            "version": __version__,
            "pid": os.getpid(),
            "hostname": self.hostname,
            "started_at": iso_time(self.started_at),
            "uptime": round(now_mono - self.started_mono, 3),
            "launcher": self.launcher.name,
            "config_path": self.config.path,
            "runtime_dir": self.runtime_dir,
            "default_model": self.config.default_model,
            "summary": self.manager.registry.summary(counts),
            "counts": counts,
            "requests": dict(self.requests),
            "connections": {"open": self.guard.connections, "budget": self.guard.budget,
                            "resets": self.guard.resets},
            "loads": dict(self.manager.stats),
            "metrics_url": self.metrics_url(),
        }
        if with_models:
            data["models"] = models
        return data

    # -- shutdown -------------------------------------------------------------------
    def begin_shutdown(self, why):
        if self.shutting_down:
            return
        self.shutting_down = True
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
        self.shutting_down = True
        count = len(self.manager.registry.backends)
        log.info("service restarting (%s): leaving %d backends running for the next daemon",
                 why, count)
        self.notifier.stopping(f"restarting; {count} backends keep running")
        self.manager.detach_all()
        self.loop.stop()

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
        if self.scrape is not None:
            self.scrape.close()
            self.scrape = None
        self.usage.close()
        if self.launcher is not None and hasattr(self.launcher, "close"):
            self.launcher.close()
        if self.progress is not None:
            self.progress.close()
            self.progress = None
        self.guard.close()
        for sock, endpoint in self._bound:
            self.loop.remove_reader(sock)
            sock.close(linger=0)
            runtime.remove_socket_file(endpoint)
        self._bound = []
        self.control = self.handshake = None
        if self._signal_pipe is not None:
            signal.set_wakeup_fd(-1)
            for fd in self._signal_pipe:
                os.close(fd)
            self._signal_pipe = None
        self.context.destroy(linger=0)   # closes any probe socket a timeout left open
        self.loop.close()
        self.lock.release()
        self.notifier.close()

