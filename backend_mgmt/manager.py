"""Loading and unloading backends: the launcher, the readiness probe and the registry together.

Everything here runs on the event loop and returns at once; results arrive through callbacks
(``done(backend, error)`` for loads, ``done(backend)`` for unloads), so many loads run at the
same time and never hold up other requests.
"""

import json
import logging
import os

from . import access, errors, fdlimit, files, placement, policy, runtime, states
from .errors import ServiceError
from . import progress
from .launchers.base import LaunchError, LaunchSpec
from .liveness import LivenessCheck
from .names import safe_name, short_digest
from .probe import ReadinessProbe
from .registry import Backend, Registry

log = logging.getLogger(__name__)
backend_log = logging.getLogger("backend_mgmt.backend")

IPC_PATH_MAX = 107          # sun_path is 108 bytes, with the trailing NUL
FAILURE_TAIL_LINES = 5      # lines of a backend's output quoted in a failure message
# EXTEND_TIMEOUT_USEC never moves a start-up deadline further than this many seconds after the
# backend started (a day), however large the value sent: a backend cannot hold a load forever.
EXTEND_TIMEOUT_CEILING = 24 * 3600
# In the runtime dir: which backends are parked, so that the next daemon adopts them as parked
# (a parked backend must not be served as ready: its GPU memory is gone).
PARKED_FILE = "parked.json"


def endpoint_for(model_name, runtime_dir):
    """A backend endpoint in the model's own directory under the runtime dir (see
    access.py), safe for any model name."""
    path = os.path.join(access.model_directory(runtime_dir, safe_name(model_name, 40)),
                        access.SOCKET_NAME)
    if len(path.encode()) > IPC_PATH_MAX:
        path = os.path.join(access.model_directory(runtime_dir, short_digest(model_name)),
                            access.SOCKET_NAME)
    return "ipc://" + path


def extend_seconds(value):
    """EXTEND_TIMEOUT_USEC's value in seconds, or None unless it is plain decimal digits
    (no sign, no blanks, at most 20 of them: anything else is ignored, never an overflow)."""
    if not (value.isascii() and value.isdigit()) or len(value) > 20:
        return None
    return min(int(value) / 1e6, float(EXTEND_TIMEOUT_CEILING))


class BackendManager:
    def __init__(self, loop, context, config, launcher, runtime_dir, notify_address=None,
                 probe_factory=ReadinessProbe, liveness_factory=LivenessCheck,
                 parker_factory=lambda backend: None):
        """``probe_factory`` and ``liveness_factory`` make the DEALER sockets that ask a
        backend whether it is ready and alive (probe.py, liveness.py); tests pass fakes.
        ``parker_factory(backend)``: its parking.Parker, or None when it cannot park (the
        default: nothing parks, every idle or evicted model is unloaded)."""
        self.loop = loop                # its clock() and wall_clock() are the only time read
        self.context = context
        self.config = config
        self.launcher = launcher
        self.runtime_dir = runtime_dir
        self.notify_address = notify_address   # the progress socket (progress.py), if bound
        self.probe_factory = probe_factory
        self.liveness_factory = liveness_factory
        self.parker_factory = parker_factory
        self._parkers = {}               # Backend -> (its Running, its Parker or None)
        self.registry = Registry(loop.wall_clock)
        self.registry.listeners.append(self._note_readiness)
        self.registry.listeners.append(self._note_parked)
        self.stats = {"loads": 0, "load_failures": 0, "restarts": 0, "exits": 0}

    # -- loading ----------------------------------------------------------------------
    def resolve(self, name):
        try:
            return self.config.resolve_model(name)
        except LookupError as exc:
            raise ServiceError(errors.UNKNOWN_MODEL, str(exc)) from None

    def load(self, name, done, devices=None):
        """Load model ``name``; call ``done(backend, error)`` when ready or failed.

        Joins a load already under way; answers at once for a ready model. ``devices``: the
        GPUs the scheduler placed it on (for CUDA_VISIBLE_DEVICES), if any.
        """
        spec = self.resolve(name)
        backend = self.registry.get(spec.name)
        if backend is None:
            backend = Backend(spec=spec, endpoint=spec.endpoint or endpoint_for(
                spec.name, self.runtime_dir), state_since=self.loop.wall_clock())
            self.registry.add(backend)
        phase = backend.phase
        if phase == states.STOPPING_HUNG:
            raise ServiceError(errors.NOT_LOADED, f"model {spec.name} is being stopped: "
                                                  f"{backend.stop_reason}")
        if phase == states.READY:
            done(backend, None)
            return
        if phase == states.UNLOADING:
            raise ServiceError(errors.BAD_REQUEST,
                               f"model {spec.name} is being unloaded; load it again once "
                               f"unload-model has returned")
        if phase == states.PARKING:
            raise ServiceError(errors.BAD_REQUEST,
                               f"model {spec.name} is being parked; load it again once it is "
                               f"parked")
        backend.load_waiters.append(done)
        if states.shown(phase) in (states.LOADING, states.WAKING):
            return                                   # join the load or the wake under way
        if phase == states.PARKED:
            self._wake(backend)                      # on the GPUs it had: the caller made room
            return
        if phase in states.FAILED_AND_STOPPING:      # failed, but its process is still dying
            if phase != states.FAILED_STOPPING_THEN_LOAD:
                self.registry.transition(backend, states.FAILED_STOPPING_THEN_LOAD,
                                         backend.reason)
            return
        if phase == states.RESTARTING:               # asked for now: skip the rest of the backoff
            self._cancel_restart(backend)
        if phase == states.FAILED:                   # a new load-model starts a fresh history
            backend.restart_times.clear()
        if devices is not None:
            backend.gpu_devices = tuple(devices)
        self._start(backend)

    def _start(self, backend, restart=False):
        """Start the backend process: for load-model (LOADING: a failure to start is reported
        and final), or for the restart policy (RESTART_LOADING: a failure counts as a crash)."""
        spec = backend.spec
        backend.stop_reason = None
        backend.next_restart_at = None
        if backend.error:
            backend.last_error = backend.error           # kept for status after a restart
        backend.error = backend.error_code = None
        backend.protocols = []
        backend.ready_at = None
        backend.output.clear()
        started_at = self.loop.wall_clock()
        launch = self._launch_spec(spec, backend.endpoint, backend.gpu_devices, started_at)
        self.stats["loads"] += 1
        running_ref = []
        try:
            self._prepare_endpoint(backend)
            running = self.launcher.start(
                launch,
                on_output=lambda line: self._on_output(backend, line),
                on_exit=lambda info: self._on_exit(backend, running_ref[0], info))
        except (LaunchError, access.AccessError) as exc:
            if not restart:                          # RESTARTING -> FAILED directly
                self.registry.transition(backend, states.LOADING, "load requested")
            self._fail(backend, errors.LOAD_FAILED, str(exc))
            return
        running_ref.append(running)
        backend.running = running
        backend.unit = running.unit
        backend.started_at = started_at
        backend.started_mono = self.loop.clock()
        verb = "restarting" if restart else "starting"
        self.registry.transition(backend, states.RESTART_LOADING if restart else states.LOADING,
                                 f"{verb} unit {running.unit}" if running.unit else verb)
        self._watch_startup(backend)

    def _watch_startup(self, backend):
        spec = backend.spec
        # The deadline first: whatever fails after it (the probe cannot get a socket when the
        # daemon is out of file descriptors...), the load cannot stay `loading` for ever.
        backend.startup_deadline = self.loop.clock() + spec.startup_timeout
        backend.startup_timer = self.loop.call_at(
            backend.startup_deadline, lambda: self._on_startup_timeout(backend))
        backend.probe = self.probe_factory(
            self.loop, self.context, backend.endpoint, spec.fullname,
            on_ready=lambda protocols: self._on_ready(backend, protocols),
            on_error=lambda message: self._on_probe_error(backend, message))

    def _launch_spec(self, spec, endpoint, gpu_devices=None, started_at=None):
        """How to start ``spec``'s backend on ``endpoint`` (and placed GPUs, if any)."""
        return LaunchSpec(
            name=spec.name,
            argv=tuple(spec.command) + ("--ipc-endpoint", endpoint,
                                        "--model-name", spec.fullname),
            env=self._environment(spec, endpoint, gpu_devices),
            endpoint=endpoint,
            resources=spec.resources,
            stop_timeout=spec.stop_timeout,
            started_at=started_at)

    def _environment(self, spec, endpoint, gpu_devices):
        """The backend's own variables; the launcher adds what every backend inherits."""
        env = {"PYTHONUNBUFFERED": "1"}   # so a Python backend's lines arrive as written
        if gpu_devices is not None:
            env.update(placement.cuda_environment(gpu_devices))
        elif spec.resources.gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = spec.resources.gpus
        env.update(dict(spec.env))
        if self.notify_address:
            env["NOTIFY_SOCKET"] = env["BACKEND_MGMT_NOTIFY_SOCKET"] = self.notify_address
        env.update({
            "BACKEND_MGMT_ENDPOINT": endpoint,
            "BACKEND_MGMT_MODEL": spec.name,
            "BACKEND_MGMT_MODEL_NAME": spec.fullname,
        })
        return env

    def _on_output(self, backend, line):
        backend.output.append(line)
        backend_log.info("[%s] %s", backend.name, line)

    def _owner(self, backend):
        return access.backend_owner(backend.spec.resources.user,
                                    self.config.access.client_group)

    def _prepare_endpoint(self, backend):
        """The model's own directory, for an endpoint the daemon chose (access.py)."""
        path = runtime.ipc_path(backend.endpoint)
        if path is not None and not backend.spec.endpoint:
            access.prepare_model_directory(os.path.dirname(path), self._owner(backend))

    def _on_ready(self, backend, protocols):
        if backend.phase not in states.STARTING:
            return
        path = runtime.ipc_path(backend.endpoint)
        if path is not None:
            # Before anyone is told the endpoint: its socket is the clients' group's, 0660.
            try:
                access.secure_socket(path, self._owner(backend))
            except access.AccessError as exc:
                self._give_up_on_start(backend, errors.LOAD_FAILED,
                                       f"model {backend.name}: {exc}")
                return
        self._stop_watching_startup(backend)
        backend.protocols = protocols
        backend.ready_at = self.loop.wall_clock()
        backend.progress = None
        if backend.phase == states.ADOPTING:
            how = "adopted unit answered the handshake"
        else:
            how = (f"answered the handshake after "
                   f"{self.loop.clock() - backend.started_mono:.3f} s")
        self.registry.transition(backend, states.READY, how)
        self._watch_liveness(backend)
        self._answer_loads(backend, None)

    def _watch_liveness(self, backend):
        if backend.spec.liveness is not None:
            backend.liveness = self.liveness_factory(
                self.loop, self.context, backend.endpoint, backend.spec.fullname,
                backend.protocols, backend.spec.liveness,
                on_hung=lambda message: self.mark_hung(backend, message))

    def _on_probe_error(self, backend, message):
        if backend.phase in states.STARTING:
            self._give_up_on_start(backend, errors.LOAD_FAILED, message)

    def _on_startup_timeout(self, backend):
        backend.startup_timer = None
        if backend.phase in states.STARTING:
            waited = self.loop.clock() - backend.started_mono
            extended = (f" (extended by the backend to {waited:.0f} s)"
                        if waited > backend.spec.startup_timeout + 1 else "")
            self._give_up_on_start(
                backend, errors.STARTUP_TIMEOUT,
                f"model {backend.name} did not answer its handshake within "
                f"{backend.spec.startup_timeout:g} s{extended}{self._tail(backend)}"
                f"{fdlimit.shortage_hint()}")

    def _give_up_on_start(self, backend, code, message):
        """The process runs but will not become ready: stop it. After a load-model that is
        final; after a restart the exit is handled like a crash (the policy decides)."""
        if backend.phase == states.RESTART_LOADING:
            self._stop_watching_startup(backend)
            backend.stop_reason = message
            self.registry.transition(backend, states.STOPPING_STALLED, backend.reason)
            self._answer_loads(backend, ServiceError(code, message, data={"model": backend.name}))
        else:
            self._fail(backend, code, message, stopping=True)
        backend.running.stop(backend.spec.stop_timeout)

    def _stop_watching_startup(self, backend):
        if backend.liveness is not None:
            backend.liveness.stop()
            backend.liveness = None
        if backend.probe is not None:
            backend.probe.cancel()
            backend.probe = None
        if backend.startup_timer is not None:
            backend.startup_timer.cancel()
            backend.startup_timer = None

    def _fail(self, backend, code, message, stopping=False):
        """Failed; ``stopping``: its process is still running, and is being stopped."""
        self._stop_watching_startup(backend)
        backend.error = message
        backend.error_code = code
        self.stats["load_failures"] += 1
        self.registry.transition(backend, states.FAILED_STOPPING if stopping else states.FAILED,
                                 message)
        self._answer_loads(backend, ServiceError(code, message, data={
            "model": backend.name,
            "last_exit": backend.last_exit.as_dict() if backend.last_exit else None,
            "output": list(backend.output)[-FAILURE_TAIL_LINES:]}))

    def _answer_loads(self, backend, error):
        waiters, backend.load_waiters = backend.load_waiters, []
        for done in waiters:
            try:
                done(backend, error)
            except Exception:     # one waiter's failure must not cost the others their answer
                log.exception("model %s: answering a waiting load failed", backend.name)

    def _tail(self, backend):
        """Its last line of output, for a one-line message (data.output has more)."""
        if backend.output:
            return f"; last output: {backend.output[-1]}"
        if backend.unit:
            return f"; its output: journalctl -u {backend.unit}"
        return "; it printed nothing"

    # -- exits ------------------------------------------------------------------------
    def _on_exit(self, backend, running, info):
        if running is not backend.running:
            return                                   # an older process of this model
        backend.last_exit = info
        backend.last_exit_at = self.loop.wall_clock()
        if info.output and not backend.output:
            backend.output.extend(info.output)       # a unit's last lines, from its journal
        self._remove_socket_file(backend)
        self.stats["exits"] += 1
        self._cancel_park_step(backend)
        self._parkers.pop(backend, None)
        phase = backend.phase
        log.log(logging.INFO if phase in (states.UNLOADING, *states.FAILED_AND_STOPPING)
                else logging.WARNING,
                "model %s: backend pid %s %s", backend.name, running.pid, info.describe())
        if phase in (states.LOADING, states.ADOPTING):
            self._fail(backend, errors.LOAD_FAILED,
                       f"model {backend.name} backend {info.describe()} during start-up"
                       f"{self._tail(backend)}")
        elif phase in (states.RESTART_LOADING, states.READY, states.WAKING,
                       *states.STOPPING_FOR_FAILURE):
            self._ended_unasked(backend, info)
        elif phase in (states.PARKING, states.PARKED):
            self._parked_ended(backend, info)
        elif phase == states.UNLOADING:
            self.registry.transition(backend, states.UNLOADED, info.describe())
            self._answer_unloads(backend)
        elif phase == states.FAILED_STOPPING:
            self.registry.transition(backend, states.FAILED, backend.reason)
        elif phase == states.FAILED_STOPPING_THEN_FORGET:
            self.registry.transition(backend, states.UNLOADED, "unloaded after failure")
            self._answer_unloads(backend)
        elif phase == states.FAILED_STOPPING_THEN_LOAD:
            self._answer_unloads(backend)            # an unload-model overtaken by this load
            backend.restart_times.clear()            # a new load-model: a fresh history
            self._start(backend)

    # -- progress reports from loading backends ---------------------------------------
    def on_progress(self, pid, fields):
        """A datagram on the progress socket (see progress.py) from process ``pid``."""
        backend = self._backend_of(pid)
        if backend is None:
            log.debug("progress message from pid %d, which is no backend of ours", pid)
            return
        if "STATUS" in fields:
            backend.progress = fields["STATUS"][:200]
        extend = fields.get("EXTEND_TIMEOUT_USEC")
        if extend is not None and backend.phase in states.STARTING and backend.startup_timer:
            seconds = extend_seconds(extend)
            if seconds is None:
                log.debug("model %s: ignoring EXTEND_TIMEOUT_USEC=%.40s", backend.name, extend)
                return
            ceiling = backend.started_mono + EXTEND_TIMEOUT_CEILING
            deadline = min(self.loop.clock() + seconds, ceiling)
            if deadline > backend.startup_deadline:      # extends, never shortens
                backend.startup_timer.cancel()
                backend.startup_deadline = deadline
                backend.startup_timer = self.loop.call_at(
                    deadline, lambda: self._on_startup_timeout(backend))
                log.info("model %s: start-up deadline extended by the backend to %.0f s from "
                         "now%s", backend.name, seconds,
                         f" ({backend.progress})" if backend.progress else "")

    def _backend_of(self, pid):
        for backend in self.registry.backends.values():
            if not backend.process_alive:
                continue
            if backend.unit:
                control_group = getattr(backend.running, "control_group", None)
                if progress.process_in_cgroup(pid, control_group):
                    return backend
            elif backend.pid and progress.process_descends_from(pid, backend.pid):
                return backend
        return None

    # -- restarts ---------------------------------------------------------------------
    def _ended_unasked(self, backend, info):
        """A ready backend (or one being restarted) ended without being asked to, or one we
        stopped for a failure (hung, a stalled restart) ended: a crash for the policy."""
        when = ("during a restart" if backend.state == states.LOADING
                else "while waking" if backend.phase == states.WAKING else "while ready")
        stopped_for = backend.stop_reason if backend.phase in states.STOPPING_FOR_FAILURE \
            else None
        what = stopped_for or f"backend {info.describe()} {when}"
        failed = stopped_for is not None or info.is_failure
        rules = backend.spec.restart
        if not policy.wants_restart(rules, failed):
            self._fail(backend, errors.LOAD_FAILED, f"{what}{self._tail(backend)}")
            return
        delay = policy.next_delay(rules, backend.restart_times, self.loop.clock())
        if delay is None:
            self._fail(backend, errors.FLAPPING,
                       f"{what}; gave up after {rules.max_restarts} restarts within "
                       f"{rules.window:g} s (restart.max_restarts)")
            return
        self._stop_watching_startup(backend)
        backend.error = f"{what}{self._tail(backend)}"
        backend.error_code = errors.LOAD_FAILED
        backend.next_restart_at = self.loop.wall_clock() + delay
        self.registry.transition(backend, states.RESTARTING,
                                 f"{what}; restarting in {delay:g} s")
        self._answer_loads(backend, ServiceError(
            errors.LOAD_FAILED, f"{what}; restarting in {delay:g} s",
            data={"model": backend.name}))
        backend.restart_timer = self.loop.call_later(delay, lambda: self._restart(backend))

    def _restart(self, backend):
        backend.restart_timer = None
        if backend.phase != states.RESTARTING:        # unloaded or loaded by hand meanwhile
            return
        backend.restart_times.append(self.loop.clock())
        backend.restarts += 1
        self.stats["restarts"] += 1
        self._start(backend, restart=True)

    def _cancel_restart(self, backend):
        if backend.restart_timer is not None:
            backend.restart_timer.cancel()
            backend.restart_timer = None
        backend.next_restart_at = None

    def mark_hung(self, backend, message):
        """Liveness: a ready backend stopped answering. Stop it; the exit is a failure."""
        if backend.phase != states.READY:
            return
        log.warning("model %s: %s; stopping it", backend.name, message)
        backend.stop_reason = message
        # Shown as ready, with this reason, until the exit moves it on.
        self.registry.transition(backend, states.STOPPING_HUNG, message + "; stopping it")
        backend.running.stop(backend.spec.stop_timeout)

    def _remove_socket_file(self, backend):
        """A killed backend leaves its ipc socket file behind; remove it if it is ours
        (an endpoint the config names is left alone)."""
        if not backend.spec.endpoint:
            runtime.remove_socket_file(backend.endpoint)
            access.remove_model_directory(runtime.ipc_path(backend.endpoint))

    # -- unloading --------------------------------------------------------------------
    def unload(self, name, done, reason="unload-model"):
        """Stop model ``name``'s backend; ``done(backend)`` once its process is gone."""
        spec = self.resolve(name)
        backend = self.registry.get(spec.name)
        if backend is None:
            raise ServiceError(errors.NOT_LOADED, f"model {spec.name} is not loaded")
        self._unload(backend, done, reason)

    def unload_backend(self, backend, done, reason):
        """Unload a backend found in the registry (its model may be gone from the config)."""
        self._unload(backend, done, reason)

    def reload_backend(self, backend, spec):
        """Its definition changed: a running backend is restarted on the new one."""
        if backend.phase == states.FAILED:
            backend.spec = spec                      # used by the next load-model
            return
        if backend.phase == states.UNLOADING:
            return                                   # going anyway; the next load uses `spec`
        def reload_when_gone(_):
            try:
                self.load(spec.name, lambda b, error: error and log.warning(
                    "model %s: reload with its new definition failed: %s", spec.name,
                    error.message))
            except ServiceError as error:
                log.warning("model %s: not reloaded: %s", spec.name, error.message)
        self._unload(backend, reload_when_gone, "definition changed in the configuration")

    def _unload(self, backend, done, reason):
        phase = backend.phase
        if phase == states.UNLOADING:
            backend.unload_waiters.append(done)
            return
        if phase in states.ACTIVE:                   # a process runs: stop it, wait for it
            self._stop_watching_startup(backend)
            self._cancel_park_step(backend)          # a park or wake in flight is abandoned
            self._answer_parks(backend, f"cancelled by {reason}")
            self._answer_loads(backend, ServiceError(
                errors.CANCELLED, f"load of {backend.name} cancelled by {reason}"))
            backend.unload_waiters.append(done)
            self.registry.transition(backend, states.UNLOADING, reason)
            backend.running.stop(backend.spec.stop_timeout)
            return
        if phase in states.FAILED_AND_STOPPING:
            # Failed, and its process is still being stopped: forget it once it is gone.
            if phase != states.FAILED_STOPPING_THEN_FORGET:
                self._answer_loads(backend, ServiceError(
                    errors.CANCELLED, f"load of {backend.name} cancelled by {reason}"))
                self.registry.transition(backend, states.FAILED_STOPPING_THEN_FORGET,
                                         backend.reason)
            backend.unload_waiters.append(done)
            backend.running.stop(backend.spec.stop_timeout)
            return
        # FAILED or RESTARTING with no process: nothing to stop, and no restart to come.
        self._cancel_restart(backend)
        self.registry.transition(backend, states.UNLOADED, reason)
        done(backend)

    def _answer_unloads(self, backend):
        waiters, backend.unload_waiters = backend.unload_waiters, []
        for done in waiters:
            done(backend)

    def unload_all(self, done, reason="shutdown"):
        """Stop every backend; ``done()`` once none is left."""
        pending = list(self.registry.backends.values())
        if not pending:
            done()
            return
        remaining = {backend.name for backend in pending}

        def one_gone(backend):
            remaining.discard(backend.name)
            if not remaining:
                done()
        for backend in pending:
            self._unload(backend, one_gone, reason)

    # -- adoption -----------------------------------------------------------------------
    def adopt(self, found):
        """Take over units a previous daemon started (``launcher.recover()``'s Adoptions).

        A running one keeps its process and its original start time. One that was ready is
        ready at once, and confirmed by a handshake in the background (one that fails it is
        hung: stopped, and restarted by its policy); any other is probed like a new load. One
        that ended while no daemon watched is shown as failed. One whose unit is being stopped
        (an unload the previous daemon began, or an operator's ``systemctl stop``) is unloaded:
        watched until it is gone, then forgotten, never restarted. One whose model's definition
        changed since it was started (command, environment, resources, stop timeout: what its
        unit is made of) is restarted on the new one, as a reload would; one started by a
        daemon that recorded no definition is kept.
        """
        parked = self._read_parked() if found else {}
        for adoption in found:
            record, handle, info = adoption.record, adoption.running, adoption.ended
            spec = self.config.models.get(record.model)
            if spec is None:
                log.warning("unit %s runs model %r, which is no longer configured; stopping it",
                            record.unit, record.model)
                if handle is not None:
                    handle.stop(record.stop_timeout)
                continue
            now_wall, now_mono = self.loop.wall_clock(), self.loop.clock()
            backend = Backend(spec=spec, endpoint=record.endpoint or endpoint_for(
                spec.name, self.runtime_dir), state_since=now_wall)
            backend.unit = record.unit
            backend.started_at = record.started_at or now_wall
            if record.gpus and spec.resources.need.devices:
                # Placed by the previous daemon: the scheduler takes the devices back.
                backend.gpu_devices = tuple(int(d) if d.isdigit() else d
                                            for d in record.gpus.split(","))
            backend.started_mono = now_mono - max(0.0, now_wall - backend.started_at)
            self.registry.add(backend)
            if handle is None:
                backend.last_exit = info
                backend.last_exit_at = now_wall
                backend.error = (f"unit {backend.unit} {info.describe()} while the daemon "
                                 f"was not running")
                backend.error_code = errors.LOAD_FAILED
                self.registry.transition(backend, states.FAILED, backend.error)
                continue
            backend.running = handle
            handle.set_exit_callback(lambda exit_info, b=backend, h=handle:
                                     self._on_exit(b, h, exit_info))
            changed = self._definition_changed(record, spec)
            self.registry.transition(backend, states.ADOPTING,
                                     f"adopting unit {handle.unit} (pid {handle.pid}) from "
                                     f"a previous daemon")
            if adoption.stopping:
                self.unload_backend(backend, lambda b: None, (
                    f"unit {handle.unit} was being stopped when the previous daemon exited"))
                continue
            entry = parked.get(spec.name)
            if entry is not None and handle.unit is not None and \
                    (entry["pid"], entry["unit"]) == (handle.pid, handle.unit):
                if entry.get("in_doubt"):
                    self.unload_backend(backend, lambda b: None, (
                        f"the previous daemon restarted while it was "
                        f"{entry['in_doubt']}: whether it holds its GPU memory is unknown"))
                    continue
                self._adopt_parked(backend, handle, entry)
            elif adoption.was_ready and not changed:
                self._serve_adopted(backend, record)
            else:
                handle.note_ready(None)      # probed afresh: not ready until it answers
                self._watch_startup(backend)
            if changed:
                log.info("model %s: unit %s was started from an earlier definition of the "
                         "model; restarting it on the current one", spec.name, record.unit)
                self.reload_backend(backend, spec)

    def _definition_changed(self, record, spec):
        if record.definition is None:
            log.info("model %s: unit %s records no definition (an older daemon started it); "
                     "kept as it runs", spec.name, record.unit)
            return False
        fresh = self._launch_spec(spec, spec.endpoint or endpoint_for(spec.name,
                                                                      self.runtime_dir))
        return fresh.definition != record.definition

    def _serve_adopted(self, backend, record):
        """An adopted backend that was ready is ready now: clients get it from the daemon's
        first moment. A handshake confirms it in the background, within its startup_timeout;
        should it fail, the backend is hung (mark_hung: stopped, then its restart policy)."""
        backend.protocols = list(record.protocols)
        backend.ready_at = record.ready_at
        self.registry.transition(backend, states.READY,
                                 "adopted unit was ready; confirming it with a handshake")

        def confirmed(protocols):
            self._stop_watching_startup(backend)
            if backend.phase != states.READY:
                return
            backend.protocols = protocols
            log.info("model %s: adopted unit %s answered the handshake", backend.name,
                     backend.unit)
            if backend.spec.liveness is not None:
                backend.liveness = self.liveness_factory(
                    self.loop, self.context, backend.endpoint, backend.spec.fullname,
                    protocols, backend.spec.liveness,
                    on_hung=lambda message: self.mark_hung(backend, message))

        def failed(message):
            self._stop_watching_startup(backend)
            self.mark_hung(backend, f"adopted backend failed its handshake: {message}")

        timeout = backend.spec.startup_timeout
        backend.startup_timer = self.loop.call_later(timeout, lambda: failed(
            f"no answer within {timeout:g} s (startup_timeout)"))
        backend.probe = self.probe_factory(self.loop, self.context, backend.endpoint,
                                           backend.spec.fullname, on_ready=confirmed,
                                           on_error=failed)

    def _note_readiness(self, backend, old_state, new_state):
        """Readiness goes into the launcher's record of the run (which a later daemon adopts
        by): set on entering READY, cleared on leaving it."""
        if backend.running is None or backend.running.exited:
            return
        if new_state == states.READY:
            backend.running.note_ready(backend.protocols)
        elif old_state == states.READY:
            backend.running.note_ready(None)

    def detach_all(self):
        """Leave every backend running for the next daemon (a restart of the service). A
        parked one stays parked (PARKED_FILE tells the next daemon). One parking or waking
        finishes its step unwatched, so nobody knows whether it holds its GPU memory: it is
        noted as in doubt, and the next daemon stops it rather than serve a sleeping backend
        or give memory it holds to another."""
        self._write_parked(in_doubt=[b for b in self.registry.backends.values()
                                     if b.phase in (states.PARKING, states.WAKING)])
        for backend in list(self.registry.backends.values()):
            self._stop_watching_startup(backend)
            self._answer_loads(backend, ServiceError(
                errors.SHUTTING_DOWN, "the service is restarting; load again once it is back"))

    # -- parking (issue 13: park instead of evict) --------------------------------------
    def parker(self, backend):
        """The Parker for ``backend``'s current process, or None: it cannot park (one per
        process, so a restarted backend is asked again: its protocols may differ)."""
        running = backend.running
        if running is None or running.exited:
            return None
        made = self._parkers.get(backend)
        if made is None or made[0] is not running:
            made = self._parkers[backend] = (running, self.parker_factory(backend))
        return made[1]

    def can_park(self, backend):
        """Ready, and a Parker for it: park_backend would park it."""
        return backend.phase == states.READY and self.parker(backend) is not None

    def park_backend(self, backend, done, reason):
        """Park a ready backend: its process keeps running, its GPU memory is released.
        ``done(None)`` once it is parked, ``done("why not")`` when it was not (the park
        failed or timed out, and it is being unloaded instead; or an unload overtook it).
        Raises ServiceError if it is not ready or cannot park."""
        if backend.phase == states.PARKING:
            backend.park_waiters.append(done)
            return
        if backend.phase == states.PARKED:
            done(None)
            return
        if not self.can_park(backend):
            why = "it is not ready" if backend.phase != states.READY else "it has no park:"
            raise ServiceError(errors.BAD_REQUEST,
                               f"model {backend.name} cannot be parked: {why}")
        parker = self.parker(backend)
        self._stop_watching_startup(backend)         # no liveness pings while parked
        backend.park_waiters.append(done)
        self.registry.transition(backend, states.PARKING, reason)
        started = self.loop.clock()
        parker.park(lambda error: self._park_done(backend, parker, started, error))

    def _step_is_current(self, backend, phase, parker):
        """A park or wake step's answer still counts: ``backend`` is still in ``phase`` with
        the same Parker, not overtaken by an unload, an exit or a newer step."""
        return backend.phase == phase and \
            self._parkers.get(backend, (None, None))[1] is parker

    def _park_done(self, backend, parker, started, error):
        if not self._step_is_current(backend, states.PARKING, parker):
            return
        if error is not None:
            message = f"park failed: {error}; unloading it"
            log.warning("model %s: %s", backend.name, message)
            backend.error = message
            self._answer_parks(backend, message)
            self._unload(backend, lambda b: None, message)
            return
        backend.parked_at = self.loop.wall_clock()
        self.registry.transition(backend, states.PARKED,
                                 f"parked in {self.loop.clock() - started:.1f} s "
                                 f"({backend.reason})")
        self._answer_parks(backend, None)

    def _answer_parks(self, backend, error):
        waiters, backend.park_waiters = backend.park_waiters, []
        for done in waiters:
            done(error)

    def _wake(self, backend):
        """Wake a parked backend for its waiting loads (on the GPUs it had)."""
        parker = self.parker(backend)
        self.registry.transition(backend, states.WAKING, "woken for a load")
        if parker is None:                           # adopted, and cannot park any more
            self._wake_failed(backend, "no way to wake it (park: gone from its model?)")
            return
        started = self.loop.clock()
        parker.wake(lambda error: self._wake_done(backend, parker, started, error))

    def _wake_done(self, backend, parker, started, error):
        if not self._step_is_current(backend, states.WAKING, parker):
            return
        if error is not None:
            self._wake_failed(backend, error)
            return
        backend.parked_at = None
        self.registry.transition(backend, states.READY,
                                 f"woke in {self.loop.clock() - started:.1f} s")
        self._watch_liveness(backend)
        self._answer_loads(backend, None)

    def _wake_failed(self, backend, error):
        """Stop it; its exit counts as a crash, so the restart policy starts it cold."""
        message = f"wake failed: {error}; stopping it to restart it cold"
        log.warning("model %s: %s", backend.name, message)
        backend.stop_reason = f"wake failed: {error}"
        backend.parked_at = None
        self.registry.transition(backend, states.STOPPING_STALLED, message)
        self._answer_loads(backend, ServiceError(errors.LOAD_FAILED, message,
                                                 data={"model": backend.name}))
        backend.running.stop(backend.spec.stop_timeout)

    def _cancel_park_step(self, backend):
        if backend.phase in (states.PARKING, states.WAKING):
            made = self._parkers.get(backend)
            if made is not None and made[1] is not None:
                made[1].cancel()

    def _parked_ended(self, backend, info):
        """A parking or parked backend's process ended: reported, and unloaded (a cold load
        starts it again when it is next wanted)."""
        what = f"backend {info.describe()} while {backend.state}"
        backend.error = f"{what}{self._tail(backend)}"
        backend.error_code = errors.LOAD_FAILED
        self._answer_parks(backend, what)
        self._answer_loads(backend, ServiceError(errors.LOAD_FAILED, what,
                                                 data={"model": backend.name}))
        self.registry.transition(backend, states.UNLOADED, f"{what}; unloaded")
        self._answer_unloads(backend)

    # -- which backends are parked, for the next daemon ---------------------------------
    @property
    def parked_file(self):
        return os.path.join(self.runtime_dir, PARKED_FILE)

    def _note_parked(self, backend, old_state, new_state):
        """Parked backends go into PARKED_FILE as they enter or leave that state."""
        if states.PARKED in (old_state, new_state):
            self._write_parked()

    def _write_parked(self, in_doubt=()):
        parked = {b.name: {"pid": b.pid, "unit": b.unit, "protocols": list(b.protocols)}
                  for b in self.registry.backends.values() if b.phase == states.PARKED}
        for backend in in_doubt:
            parked[backend.name] = {"pid": backend.pid, "unit": backend.unit,
                                    "in_doubt": backend.phase}
        try:
            files.write_atomic(self.parked_file, json.dumps(parked, sort_keys=True), 0o600)
        except OSError as exc:
            log.warning("cannot record the parked models (%s): a daemon restart would probe "
                        "them afresh", exc)

    def _read_parked(self):
        """PARKED_FILE's entries that are well formed; anything else is ignored (it is in a
        directory others could have written to: only an entry that matches an adopted
        unit's pid and unit counts, see adopt)."""
        try:
            with open(files.open_nofollow(self.parked_file, os.O_RDONLY), "rb") as source:
                document = json.loads(source.read(1 << 20))
        except (OSError, ValueError):
            return {}
        if not isinstance(document, dict):
            return {}
        return {name: entry for name, entry in document.items()
                if isinstance(entry, dict) and isinstance(entry.get("pid"), int)
                and isinstance(entry.get("unit"), str)}

    def _adopt_parked(self, backend, handle, entry):
        """A unit the previous daemon had parked: parked again, not probed (a handshake would
        find it without its GPU memory)."""
        protocols = entry.get("protocols")
        if isinstance(protocols, list) and all(isinstance(p, str) for p in protocols):
            backend.protocols = protocols
        backend.parked_at = self.loop.wall_clock()
        self.registry.transition(backend, states.PARKED,
                                 f"adopted unit {handle.unit} (pid {handle.pid}) the previous "
                                 f"daemon had parked")

    # -- queries ----------------------------------------------------------------------
    def ready_backend(self, name):
        """The ready Backend for a handshake, or a ServiceError saying why not."""
        spec = self.resolve(name)
        backend = self.registry.get(spec.name)
        if backend is not None and backend.phase in states.STOPPING_FOR_FAILURE:
            raise ServiceError(errors.NOT_LOADED, f"model {spec.name} is being stopped: "
                                                  f"{backend.stop_reason}")
        if backend is None or not backend.answers_clients:
            state = backend.state if backend else "not loaded"
            why = f": {backend.error}" if backend is not None and backend.error else ""
            raise ServiceError(errors.NOT_LOADED, f"model {spec.name} is {state}{why}")
        return backend
