"""Backends as transient systemd units, started with systemd-run.

Each backend is its own unit (``backend-mgmt-<model>-<hash>.service``) in
``backend-mgmt.slice``, with ``--collect``, a SyslogIdentifier, the model's resources as unit
properties, and an ExecStopPost= that records how the run ended once every process of the
unit is gone (records.py: ``<runtime dir>/units/<unit>.<run>.exit``). The daemon learns of the
end through inotify on that directory: no polling of systemctl. Because the units are not the
daemon's children, they keep running when the daemon crashes or restarts; the unit record
``<unit>.json`` lets the next daemon adopt them (same PID, same endpoint, original start
time), or report that one ended while it was down.

A backend counts as gone only when its unit is: its main process may exit while systemd is
still stopping the rest of its control group (a worker slow to obey SIGTERM), and until that
is over the model stays ``unloading`` and keeps its GPU memory.
"""

import errno
import logging
import os
import re
import subprocess
import sys
from dataclasses import replace

from ..journal import MODEL_FIELD
from ..names import safe_name
from ..runtime import StartupError
from . import records, systemctl
from .base import ExitInfo, Launcher, Running
from ..loop import run_async
from .inotify import DirectoryWatch

log = logging.getLogger(__name__)

UNIT_PREFIX = "backend-mgmt-"
SLICE = "backend-mgmt.slice"       # every backend unit: `systemctl stop backend-mgmt.slice`
STATE_SUBDIR = "units"
SYSTEMD_RUN = "systemd-run"
SYSTEMCTL = systemctl.SYSTEMCTL
JOURNALCTL = "journalctl"
OUTPUT_LINES = 20                  # a failed run's last lines, read from its journal
ALREADY_EXISTS_RETRIES = 25        # a same-named unit still being collected: retry...
ALREADY_EXISTS_DELAY = 0.2         # ...this often (seconds)
KILL_GRACE = 5.0                   # past stop_timeout, SIGKILL whatever is left of the unit
GONE_POLL_FIRST = 0.025            # a run is ending: ask systemd whether its unit is gone,
GONE_POLL = 0.5                    # ...after this long, doubling up to this long
# ActiveState values while a unit (or what is left of it) still runs.
UNIT_RUNNING = frozenset({"active", "activating", "deactivating", "reloading"})


def unit_name(model_name):
    """A valid, unique unit name for any model name; nothing in it can inject options."""
    return f"{UNIT_PREFIX}{safe_name(model_name, 64)}.service"


def _quote(word):
    """Quote one word for a unit file command line (ExecStopPost=)."""
    if re.fullmatch(r"[A-Za-z0-9_./:=+-]+", word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"').replace("$", "$$") + '"'


ENV = "/usr/bin/env"


def exit_record_command(python, state_dir, unit, run):
    """The ExecStopPost= command line (without the '+' prefix) that records how a run of a
    unit ended.

    It may run as root in a unit whose backend runs as another user, so it takes nothing from
    that unit: ``env -i`` clears the environment (no PYTHONPATH, HOME, LD_LIBRARY_PATH, ...),
    ``--chdir=/`` leaves the unit's working directory, and ``python -I`` ignores PYTHON*
    variables and the user's site-packages and keeps the current directory off sys.path. No
    ``$`` in it: how the unit ended is asked of systemd (unit_exit.py says why)."""
    return " ".join(_quote(w) for w in (ENV, "-i", "--chdir=/", python, "-I", "-m",
                                        "backend_mgmt.unit_exit", state_dir, unit, run))


def systemd_run_argv(spec, unit, state_dir, stop_timeout, run, python=sys.executable):
    """The systemd-run command line for one backend (pure; tested on its own). ``run``: the
    id of this start, which names its exit record."""
    record_exit = exit_record_command(python, state_dir, unit, run)
    resources = spec.resources
    # With User= the helper needs '+' (full privileges) to write into the root-owned state
    # dir. Only then: systemd 252 stores a '+' command as ExecStopPostEx= in the transient
    # unit file and cannot read that back after a daemon-reload, losing the record.
    privileged = "+" if resources is not None and resources.user else ""
    argv = [SYSTEMD_RUN, "--quiet", "--collect", "--service-type=exec",
            f"--unit={unit}", f"--slice={SLICE}",
            f"--description=backend-mgmt model {spec.name}",
            f"--property=SyslogIdentifier={unit[:-len('.service')]}",
            # Every line of the unit carries the model's name (journal.py); accounting on,
            # so status can show the unit's memory and CPU (usage.py) on cgroup v1 too.
            *([f"--property=LogExtraFields={MODEL_FIELD}={spec.name}"]
              if spec.name.isprintable() else []),
            "--property=MemoryAccounting=yes", "--property=CPUAccounting=yes",
            f"--property=TimeoutStopSec={stop_timeout:g}s",
            f"--property=ExecStopPost={privileged}{record_exit}"]
    if resources is not None:
        if resources.memory_max:
            argv.append(f"--property=MemoryMax={resources.memory_max}")
        if resources.cpu_quota:
            argv.append(f"--property=CPUQuota={resources.cpu_quota}")
        if resources.user:
            argv.append(f"--property=User={resources.user}")
        for name, value in resources.properties:
            argv.append(f"--property={name}={value}")
    for key, value in sorted(spec.env.items()):
        argv.append(f"--setenv={key}={value}")
    argv.append("--")
    argv.extend(spec.argv)
    return argv


def running_under_systemd(environ=os.environ):
    """True when this process is a systemd service (so launcher 'auto' means systemd)."""
    return bool(environ.get("INVOCATION_ID")) and os.path.isdir("/run/systemd/system")


def own_unit(cgroup_file="/proc/self/cgroup"):
    """The unit this process runs in, from its cgroup (None outside a service)."""
    path = service_cgroup(cgroup_file)
    return path.rsplit("/", 1)[-1] if path else None


def service_cgroup(cgroup_file):
    """The control group path (as systemd's ControlGroup shows it) of the service a process
    runs in, from its /proc/<pid>/cgroup; None outside a service or when it is gone."""
    try:
        with open(cgroup_file) as stream:
            for line in stream:
                path = line.rstrip("\n").split(":", 2)[-1]
                if path.rsplit("/", 1)[-1].endswith(".service"):
                    return path
    except OSError:
        pass
    return None


# What adoption asks of systemd about each recorded unit.
ADOPTION_PROPERTIES = ("ActiveState", "MainPID", "InvocationID", "ControlGroup")


class UnitListing:
    """`systemctl list-units` of every backend unit, begun before adoption needs it: at
    start-up the daemon asks while it still imports and reads its config, so systemctl and
    systemd answer on the other core instead of on the way to READY=1 (cli.cmd_serve)."""

    def __init__(self, process, failure=None):
        self.process = process
        self.failure = failure          # why systemctl could not be run

    @classmethod
    def start(cls):
        try:
            return cls(subprocess.Popen(systemctl.list_units_argv(UNIT_PREFIX + "*"),
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True))
        except OSError as exc:
            return cls(None, str(exc))

    def result(self, timeout=10):
        """The finished command (subprocess.CompletedProcess), or None if it could not run
        or did not answer in ``timeout`` seconds (logged)."""
        if self.process is None:
            log.warning("systemctl list-units failed: %s", self.failure)
            return None
        try:
            stdout, stderr = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            self.close()
            log.warning("systemctl list-units failed: %s", exc)
            return None
        return subprocess.CompletedProcess(self.process.args, self.process.returncode,
                                           stdout, stderr)

    def close(self):
        """Not needed after all (another launcher, start-up failed): end and reap it."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


class SystemdLauncher(Launcher):
    name = "systemd"

    def __init__(self, loop, runtime_dir, listing=None):
        super().__init__(loop)
        self.listing = listing             # a UnitListing begun early, for recover()
        self.state_dir = os.path.join(runtime_dir, STATE_SUBDIR)
        os.makedirs(self.state_dir, mode=0o750, exist_ok=True)
        self.units = {}                    # unit name -> TransientUnit
        self.watch = DirectoryWatch(self.state_dir)
        loop.add_reader(self.watch.fd, self._on_records)

    # -- starting --------------------------------------------------------------------
    def start(self, spec, on_output, on_exit):
        """Start the backend unit. Its output goes to the journal, so ``on_output`` is unused.
        The record written here is what a later daemon adopts it by."""
        unit = unit_name(spec.name)
        record = records.UnitRecord(
            model=spec.name, unit=unit, endpoint=spec.endpoint, started_at=spec.started_at,
            stop_timeout=spec.stop_timeout, gpus=spec.env.get("CUDA_VISIBLE_DEVICES"),
            run=records.new_run_id(), definition=spec.definition)
        handle = TransientUnit(self, record, spec, on_exit)
        self.units[unit] = handle
        records.write_record(self.state_dir, record)
        handle.launch()
        return handle

    def update_record(self, handle):
        """The unit's record, now with what systemd told about the run (pid, invocation)."""
        current = self._read_record(handle.unit)
        if current is not None and current.run == handle.record.run:
            records.write_record(self.state_dir, handle.record)

    def _read_record(self, unit):
        try:
            return records.read_record(self.state_dir, unit)
        except records.BadRecord as exc:
            log.warning("ignoring unit record: %s", exc)
            return None

    # -- exits -----------------------------------------------------------------------
    def _on_records(self):
        for name in self.watch.names():
            parsed = records.parse_exit_name(name)
            if parsed is None:
                continue
            unit, run = parsed
            handle = self.units.get(unit)
            if handle is not None and handle.record.run == run:
                handle.exit_recorded()

    def read_exit(self, record):
        """(ExitInfo, invocation) recorded for ``record``'s run, or None."""
        return records.read_exit(self.state_dir, record.unit, record.run)

    def forget(self, record):
        """A run is over: drop its exit record, and its unit record unless a newer run of the
        same unit has written its own meanwhile."""
        if self.units.get(record.unit) is not None and \
                self.units[record.unit].record.run == record.run:
            del self.units[record.unit]
        current = self._read_record(record.unit)
        if current is None or current.run == record.run:
            records.remove(self.state_dir, records.record_name(record.unit))
        records.remove(self.state_dir, records.exit_name(record.unit, record.run))

    # -- adoption after a daemon restart -------------------------------------------
    def recover(self):
        """Units a previous daemon started, as records.Adoption.

        A unit still running the recorded run is adopted (its handle is returned, and whether
        it was ready); one that ended while no daemon watched is returned with its ExitInfo,
        and forgotten. This runs before the daemon answers anyone, so systemd is asked once
        about all of them (_unit_states).
        """
        found = []
        recorded = []
        for name in sorted(os.listdir(self.state_dir)):
            if not name.endswith(records.RECORD_SUFFIX) or name.startswith("."):
                continue
            unit = name[:-len(records.RECORD_SUFFIX)]
            if not records.UNIT_NAME.fullmatch(unit):
                log.warning("ignoring %s in %s: not a backend unit's record", name,
                            self.state_dir)
                continue
            record = self._read_record(unit)
            if record is not None:
                recorded.append((record, self.read_exit(record)))
        shown = self._unit_states([record for record, ended in recorded if ended is None])
        for record, ended in recorded:
            state = shown.get(record.unit, {})
            info = ended[0] if ended else self._not_running(record, state)
            if info is not None:
                found.append(records.Adoption(record, ended=info))
                self.forget(record)
                continue
            handle = TransientUnit.adopt(self, record, int(state["MainPID"]),
                                         state.get("InvocationID") or None)
            handle.control_group = state.get("ControlGroup") or None
            self.units[record.unit] = handle
            # Ready before, and its unit not being stopped: it is served from the start.
            was_ready = record.ready_at is not None and state.get("ActiveState") == "active"
            # Still running but being stopped (systemd sends SIGKILL after TimeoutStopSec).
            stopping = state.get("ActiveState") == "deactivating"
            found.append(records.Adoption(record, running=handle, was_ready=was_ready,
                                          stopping=stopping))
        return found

    @staticmethod
    def _not_running(record, state):
        """Why ``record``'s run is not there to adopt (an ExitInfo), or None if it is."""
        unit = record.unit
        if state.get("ActiveState") not in UNIT_RUNNING:
            return ExitInfo(detail=f"unit {unit} is {state.get('ActiveState') or 'gone'}")
        try:
            pid = int(state.get("MainPID") or 0)
        except ValueError:
            pid = 0
        invocation = state.get("InvocationID") or None
        if pid <= 1 or (record.pid and record.pid != pid) or (
                record.invocation and invocation and record.invocation != invocation):
            return ExitInfo(detail=f"unit {unit} runs another process than the one "
                                   f"recorded (pid {record.pid}, now {pid or None})")
        return None

    def _unit_states(self, recorded):
        """{unit: ActiveState, MainPID, InvocationID, ControlGroup} for the recorded units.

        One `systemctl list-units` says which are still active; a recorded main pid that
        still runs in its unit's control group (the kernel says so: /proc/<pid>/cgroup) is
        that unit's, with the recorded invocation, since a process never changes units.
        Only the units this does not settle (no pid recorded, another process) are asked of
        systemd with `systemctl show` (one for all), which costs systemd a call per unit."""
        listing, self.listing = self.listing or UnitListing.start(), None
        listed = listing.result()
        if listed is None or listed.returncode != 0:
            return self._show_all([record.unit for record in recorded])
        active = systemctl.parse_list_units(listed.stdout)
        states, unsettled = {}, []
        for record in recorded:
            state = active.get(record.unit)
            if state not in UNIT_RUNNING:
                states[record.unit] = {"ActiveState": state or "gone"}
                continue
            cgroup = service_cgroup(f"/proc/{record.pid}/cgroup") if record.pid else None
            if cgroup is None or cgroup.rsplit("/", 1)[-1] != record.unit:
                unsettled.append(record.unit)
                continue
            states[record.unit] = {"ActiveState": state, "MainPID": str(record.pid),
                                   "InvocationID": record.invocation or "",
                                   "ControlGroup": cgroup}
        states.update(self._show_all(unsettled))
        return states

    def _show_all(self, units):
        """{unit: properties} from systemctl show, synchronously (only at start-up, before
        serving): one command for up to UNITS_PER_SHOW units. systemd answers for every unit,
        even one it never heard of (inactive); when it cannot answer, the daemon does not
        start: a unit counted as gone would be forgotten while it may still run and hold its
        GPU, so it is better to fail now and let the service manager try again."""
        shown = {}
        for first in range(0, len(units), systemctl.UNITS_PER_SHOW):
            batch = units[first:first + systemctl.UNITS_PER_SHOW]
            try:
                result = subprocess.run(systemctl.show_argv(batch, ADOPTION_PROPERTIES),
                                        capture_output=True, text=True, timeout=10)
                why = f"it exited with code {result.returncode}"
                answered = systemctl.parse_show_many(result.stdout, batch)
            except (OSError, subprocess.TimeoutExpired) as exc:
                why, answered = str(exc), {}
            unanswered = [unit for unit in batch if unit not in answered]
            if unanswered:
                raise StartupError(
                    f"systemctl show could not tell how {len(unanswered)} backend units a "
                    f"previous daemon started are ({why}): {', '.join(unanswered[:3])}; not "
                    f"starting without them, so that none runs unwatched")
            shown.update(answered)
        return shown

    def restart_pending(self, on_answer):
        """Ask systemd whether it is restarting our own unit (restart, upgrade) rather than
        stopping it; ``on_answer(bool)``. Backends stay loaded across a restart."""
        unit = own_unit()
        if unit is None:
            self.loop.call_later(0, lambda: on_answer(False))
            return

        def done(result):
            restarting = False
            for line in result.stdout.splitlines():
                fields = line.split()
                if len(fields) >= 3 and fields[1] == unit:
                    restarting = fields[2] in ("restart", "try-restart", "reload-or-restart")
            on_answer(restarting)
        run_async(self.loop, [SYSTEMCTL, "list-jobs", "--no-legend", "--no-pager", "--full"],
                  done, timeout=5)

    def close(self):
        if self.listing is not None:
            self.listing.close()
        self.loop.remove_reader(self.watch.fd)
        self.watch.close()


class TransientUnit(Running):
    """One run of a backend unit: started with systemd-run, stopped with systemctl, over when
    its exit record comes (or systemd says the unit is gone)."""

    def __init__(self, launcher, record, spec, on_exit, pid=None):
        self.launcher = launcher
        self.loop = launcher.loop
        self.record = record
        self.unit = record.unit
        self.spec = spec
        self.pid = pid
        self._on_exit = on_exit
        self.exited = False
        self.started = pid is not None     # systemd-run has succeeded
        self._stop_requested = False
        self._attempts = 0
        self._pidfd = None
        self._main_gone = False
        self._asking = False               # a systemctl show about the unit's end under way
        self._ending = False               # gone; reading its last lines before saying so
        self._poll_delay = GONE_POLL_FIRST
        self._poll_timer = None
        self._kill_timer = None
        self.control_group = None          # from systemctl show, once started

    @classmethod
    def adopt(cls, launcher, record, pid, invocation):
        handle = cls(launcher, replace(record, pid=pid, invocation=invocation or
                                       record.invocation), None, None, pid=pid)
        handle._watch_pid()
        return handle

    def note_ready(self, protocols):
        """Recorded, so that the next daemon serves this backend from its first moment."""
        updated = records.ready(self.record, protocols)
        if self.exited or updated is self.record:
            return
        self.record = updated
        self.launcher.update_record(self)

    # -- start -----------------------------------------------------------------------
    def launch(self):
        self._attempts += 1
        argv = systemd_run_argv(self.spec, self.unit, self.launcher.state_dir,
                                self.record.stop_timeout, self.record.run)
        run_async(self.loop, argv, self._launched, timeout=60)

    def _launched(self, result):
        if result.ok:
            self.started = True
            run_async(self.loop, systemctl.show_argv(
                self.unit, ("MainPID", "InvocationID", "ControlGroup")), self._got_pid,
                timeout=10)
            if self._stop_requested:
                self._systemctl_stop()
            return
        text = result.stderr + result.stdout
        if ("already exists" in text or "already loaded" in text) and \
                self._attempts < ALREADY_EXISTS_RETRIES and not self._stop_requested:
            self.loop.call_later(ALREADY_EXISTS_DELAY, self.launch)   # the old one is going
            return
        if result.timed_out:
            # systemd may have started the unit all the same: leave no unit nobody tracks.
            self._systemctl_stop()
        self._finish(ExitInfo(code=result.returncode if result.returncode > 0 else None,
                              detail=f"systemd-run failed: {result.describe()}"))

    def _got_pid(self, result):
        shown = systemctl.parse_show(result.stdout)
        try:
            pid = int(shown.get("MainPID") or 0)
        except ValueError:
            pid = 0
        # The unit's control group as systemd reports it: progress datagrams count only from
        # processes in it (a user's own unit of the same name lives elsewhere).
        self.control_group = shown.get("ControlGroup") or None
        if self.exited:
            return
        self.record = replace(self.record, invocation=shown.get("InvocationID") or None)
        if pid <= 1:
            # Already gone again (or systemctl failed): the exit record, or systemd, says how.
            self._main_process_gone()
            return
        self.pid = pid
        self.record = replace(self.record, pid=pid)
        self.launcher.update_record(self)
        self._watch_pid()

    def _watch_pid(self):
        """A pidfd on the main process: its end starts the watch for the unit's end."""
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                # Out of file descriptors, not gone: the exit record still tells of its end.
                log.warning("%s: cannot watch pid %d (%s); relying on its exit record",
                            self.unit, self.pid, exc.strerror)
                return
            self._main_process_gone()
            return
        self.loop.add_reader(self._pidfd, self._main_process_gone)

    def _main_process_gone(self):
        """The main process has ended. systemd now runs ExecStopPost= (the exit record) and
        then stops whatever is left in the unit's control group (a worker slow to obey
        SIGTERM): the run is over only once the unit is no longer active. Kill what is left
        should that overrun stop_timeout."""
        self._close_pidfd()
        if self.exited or self._main_gone:
            return
        self._main_gone = True
        if self._kill_timer is None:
            self._kill_timer = self.loop.call_later(self.record.stop_timeout + KILL_GRACE,
                                                    self.kill)
        self._watch_until_gone()

    def exit_recorded(self):
        """The exit record of this run has appeared (inotify)."""
        self._watch_until_gone()

    def _watch_until_gone(self):
        """Ask systemd whether the unit is gone: at once, then at growing intervals up to
        GONE_POLL, until it is. Only while a run is ending; usually the first answer or
        the next says it is gone."""
        if self.exited or self._asking or self._ending:
            return
        self._asking = True
        run_async(self.loop, systemctl.show_argv(self.unit, ("ActiveState", "InvocationID")),
                  self._answered_if_gone, timeout=10)

    def _answered_if_gone(self, result):
        self._asking = False
        if self.exited:
            return
        shown = systemctl.parse_show(result.stdout) if result.ok else {}
        now = shown.get("InvocationID") or None
        gone = result.ok and (shown.get("ActiveState") not in UNIT_RUNNING or (
            self.record.invocation is not None and now != self.record.invocation))
        if gone:
            self._ending = True
            self._finish_with_output(self._recorded_exit() or ExitInfo(
                detail="unit gone; exit status unknown (no exit record)"))
            return
        self._poll_delay = min(GONE_POLL, self._poll_delay * 2)
        if self._poll_timer is None:
            self._poll_timer = self.loop.call_later(self._poll_delay, self._poll_again)

    def _poll_again(self):
        self._poll_timer = None
        self._watch_until_gone()

    def _finish_with_output(self, info):
        """A run that ended by itself and badly: read its last lines from the journal first
        (its output goes there, not to the daemon), for the failure report."""
        if self._stop_requested or not info.is_failure:
            self._finish(info)
            return
        match = ([f"_SYSTEMD_INVOCATION_ID={self.record.invocation}"] if self.record.invocation
                 else ["-u", self.unit])
        run_async(self.loop, [JOURNALCTL, "--no-pager", "-q", "-o", "cat", "-n",
                              str(OUTPUT_LINES), *match],
                  lambda result: self._finish(replace(info, output=tuple(
                      result.stdout.splitlines()[-OUTPUT_LINES:]) if result.ok else ())),
                  timeout=5)

    def _recorded_exit(self):
        ended = self.launcher.read_exit(self.record)
        if ended is None:
            return None
        info, invocation = ended
        if invocation and self.record.invocation and invocation != self.record.invocation:
            log.warning("%s: exit record of invocation %s is not this run's (%s); ignored",
                        self.unit, invocation, self.record.invocation)
            return None
        return info

    def _finish(self, info):
        if self.exited:
            return
        self.exited = True
        self._close_pidfd()
        for timer in (self._poll_timer, self._kill_timer):
            if timer is not None:
                timer.cancel()
        self.launcher.forget(self.record)
        if self._on_exit is not None:
            self._on_exit(info)

    def _close_pidfd(self):
        if self._pidfd is not None:
            self.loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None

    # -- stop ------------------------------------------------------------------------
    def stop(self, timeout):
        """systemd sends SIGTERM, then SIGKILL after TimeoutStopSec (the stop_timeout)."""
        if self.exited:
            return
        self._stop_requested = True
        if self.started:
            self._systemctl_stop()
        if self._kill_timer is None:
            # Backstop: should systemd not have stopped it by then, kill it ourselves.
            self._kill_timer = self.loop.call_later(timeout + KILL_GRACE, self.kill)

    def _systemctl_stop(self):
        run_async(self.loop, [SYSTEMCTL, "stop", "--no-block", self.unit], self._log_failure,
                  timeout=30)

    def kill(self):
        self._kill_timer = None
        if self.exited or not self.started:
            return
        run_async(self.loop, [SYSTEMCTL, "kill", "--signal=SIGKILL", self.unit],
                  self._log_failure, timeout=30)

    def _log_failure(self, result):
        if not result.ok:
            log.warning("%s: %s", self.unit, result.describe())
