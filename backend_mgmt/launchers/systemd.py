"""Backends as transient systemd units, started with systemd-run.

Each backend is its own unit (``backend-mgmt-<model>-<hash>.service``) with ``--collect``, a
SyslogIdentifier, the model's resources as unit properties, and an ExecStopPost= that records
how it ended in ``<runtime dir>/units/<unit>.exit``. The daemon learns of the end through
inotify on that directory: no polling of systemctl. Because the units are not the daemon's
children, they keep running when the daemon crashes or restarts; a record
``<unit>.json`` beside the exit file lets the next daemon adopt them (same PID, same endpoint,
original start time), or report that one ended while it was down.
"""

import json
import logging
import os
import re
import signal
import subprocess
import sys

from ..names import safe_name
from .base import ExitInfo, Running
from .command import run_async
from .inotify import DirectoryWatch

log = logging.getLogger(__name__)

UNIT_PREFIX = "backend-mgmt-"
STATE_SUBDIR = "units"
SYSTEMD_RUN = "systemd-run"
SYSTEMCTL = "systemctl"
ALREADY_EXISTS_RETRIES = 25        # a same-named unit still being collected: retry...
ALREADY_EXISTS_DELAY = 0.2         # ...this often (seconds)
EXIT_RECORD_GRACE = 5.0            # main process gone but no exit record yet: wait this long


def unit_name(model_name):
    """A valid, unique unit name for any model name; nothing in it can inject options."""
    return f"{UNIT_PREFIX}{safe_name(model_name, 64)}.service"


def _quote(word):
    """Quote one word for a unit file command line (ExecStopPost=)."""
    if re.fullmatch(r"[A-Za-z0-9_./:=+-]+", word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"').replace("$", "$$") + '"'


def systemd_run_argv(spec, unit, state_dir, stop_timeout, python=sys.executable):
    """The systemd-run command line for one backend (pure; tested on its own)."""
    record_exit = " ".join(_quote(w) for w in (python, "-m", "backend_mgmt.unit_exit",
                                                state_dir, unit))
    resources = spec.resources
    # With User= the helper needs '+' (full privileges) to write into the root-owned state
    # dir. Only then: systemd 252 stores a '+' command as ExecStopPostEx= in the transient
    # unit file and cannot read that back after a daemon-reload, losing the record.
    privileged = "+" if resources is not None and resources.user else ""
    argv = [SYSTEMD_RUN, "--quiet", "--collect", "--service-type=exec",
            f"--unit={unit}", f"--description=backend-mgmt model {spec.name}",
            f"--property=SyslogIdentifier={unit[:-len('.service')]}",
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


def exit_info_from_record(record):
    """ExitInfo from what unit_exit.py wrote (systemd's SERVICE_RESULT/EXIT_CODE/EXIT_STATUS)."""
    result = record.get("result", "")
    code, status = record.get("exit_code", ""), record.get("exit_status", "")
    if result == "oom-kill":
        return ExitInfo(signal=signal.SIGKILL, oom_killed=True)
    if code == "exited":
        try:
            return ExitInfo(code=int(status))
        except ValueError:
            pass
    if code in ("killed", "dumped"):
        try:
            return ExitInfo(signal=int(signal.Signals["SIG" + status]))
        except KeyError:
            try:
                return ExitInfo(signal=int(status))
            except ValueError:
                pass
    if result == "timeout":
        return ExitInfo(signal=signal.SIGKILL, detail="stop timed out")
    return ExitInfo(detail=f"unit ended with result {result or 'unknown'}")


def running_under_systemd(environ=os.environ):
    """True when this process is a systemd service (so launcher 'auto' means systemd)."""
    return bool(environ.get("INVOCATION_ID")) and os.path.isdir("/run/systemd/system")


def own_unit(cgroup_file="/proc/self/cgroup"):
    """The unit this process runs in, from its cgroup (None outside a service)."""
    try:
        with open(cgroup_file) as stream:
            for line in stream:
                path = line.rstrip("\n").split(":", 2)[-1]
                name = path.rsplit("/", 1)[-1]
                if name.endswith(".service"):
                    return name
    except OSError:
        pass
    return None


class SystemdLauncher:
    name = "systemd"

    def __init__(self, loop, runtime_dir):
        self.loop = loop
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
        self._remove(unit + ".exit")       # a record from an earlier run of this model
        handle = TransientUnit(self, unit, spec, on_exit, spec.stop_timeout)
        self.units[unit] = handle
        self._write_record(unit, {"model": spec.name, "unit": unit, "endpoint": spec.endpoint,
                                  "started_at": spec.started_at,
                                  "stop_timeout": spec.stop_timeout,
                                  "gpus": spec.env.get("CUDA_VISIBLE_DEVICES")})
        handle.launch()
        return handle

    def _write_record(self, unit, record):
        path = os.path.join(self.state_dir, unit + ".json")
        with open(path + ".tmp", "w") as stream:
            json.dump(record, stream)
        os.rename(path + ".tmp", path)

    def update_record(self, unit, **fields):
        path = os.path.join(self.state_dir, unit + ".json")
        try:
            with open(path) as stream:
                record = json.load(stream)
        except (OSError, ValueError):
            return
        record.update(fields)
        self._write_record(unit, record)

    def _remove(self, name):
        try:
            os.unlink(os.path.join(self.state_dir, name))
        except FileNotFoundError:
            pass

    # -- exits -----------------------------------------------------------------------
    def _on_records(self):
        for name in self.watch.names():
            if name.endswith(".exit"):
                unit = name[:-len(".exit")]
                handle = self.units.get(unit)
                if handle is not None:
                    handle.exit_recorded()

    def read_exit(self, unit):
        """The ExitInfo recorded for ``unit`` and its time, or (None, None)."""
        try:
            with open(os.path.join(self.state_dir, unit + ".exit")) as stream:
                record = json.load(stream)
        except (OSError, ValueError):
            return None, None
        return exit_info_from_record(record), record.get("time")

    def forget(self, unit):
        self.units.pop(unit, None)
        self._remove(unit + ".json")
        self._remove(unit + ".exit")

    # -- adoption after a daemon restart -------------------------------------------
    def recover(self):
        """Units a previous daemon started: [(record, TransientUnit or None, ExitInfo)].

        A unit still running is adopted (its handle is returned); one that ended while no
        daemon watched is returned with its ExitInfo, and forgotten.
        """
        found = []
        for name in sorted(os.listdir(self.state_dir)):
            if not name.endswith(".json"):
                continue
            try:
                with open(os.path.join(self.state_dir, name)) as stream:
                    record = json.load(stream)
            except (OSError, ValueError) as exc:
                log.warning("ignoring unreadable unit record %s: %s", name, exc)
                continue
            unit = record.get("unit", name[:-len(".json")])
            info, _ = self.read_exit(unit)
            pid = None
            if info is None:
                state = self._show(unit, "ActiveState", "SubState", "MainPID")
                if state.get("ActiveState") in ("active", "activating", "reloading"):
                    pid = int(state.get("MainPID") or 0) or None
                else:
                    info = ExitInfo(detail=f"unit {unit} is {state.get('ActiveState') or 'gone'}")
            if pid is None or (record.get("pid") and record["pid"] != pid):
                if info is None:
                    info = ExitInfo(detail=f"unit {unit} has another main process now")
                found.append((record, None, info))
                self.forget(unit)
                continue
            handle = TransientUnit.adopt(self, unit, record, pid)
            self.units[unit] = handle
            found.append((record, handle, None))
        return found

    def _show(self, unit, *properties):
        """systemctl show, synchronously: only used at start-up, before serving."""
        try:
            result = subprocess.run(
                [SYSTEMCTL, "show", unit, *(f"--property={p}" for p in properties)],
                capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("systemctl show %s failed: %s", unit, exc)
            return {}
        return dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)

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
        self.loop.remove_reader(self.watch.fd)
        self.watch.close()


class TransientUnit(Running):
    """One backend unit: started with systemd-run, stopped with systemctl."""

    def __init__(self, launcher, unit, spec, on_exit, stop_timeout, pid=None):
        self.launcher = launcher
        self.loop = launcher.loop
        self.unit = unit
        self.spec = spec
        self.pid = pid
        self._on_exit = on_exit
        self.stop_timeout = stop_timeout
        self.exited = False
        self.started = pid is not None     # systemd-run has succeeded
        self._stop_requested = False
        self._attempts = 0
        self._pidfd = None
        self._grace_timer = None
        self._kill_timer = None

    @classmethod
    def adopt(cls, launcher, unit, record, pid):
        handle = cls(launcher, unit, None, None, float(record.get("stop_timeout", 10.0)),
                     pid=pid)
        handle._watch_pid()
        return handle

    def set_exit_callback(self, on_exit):
        self._on_exit = on_exit

    # -- start -----------------------------------------------------------------------
    def launch(self):
        self._attempts += 1
        argv = systemd_run_argv(self.spec, self.unit, self.launcher.state_dir,
                                self.stop_timeout)
        run_async(self.loop, argv, self._launched, timeout=60)

    def _launched(self, result):
        if result.ok:
            self.started = True
            run_async(self.loop, [SYSTEMCTL, "show", self.unit, "--property=MainPID",
                                  "--value"], self._got_pid, timeout=10)
            if self._stop_requested:
                self._systemctl_stop()
            return
        text = result.stderr + result.stdout
        if ("already exists" in text or "already loaded" in text) and \
                self._attempts < ALREADY_EXISTS_RETRIES and not self._stop_requested:
            self.loop.call_later(ALREADY_EXISTS_DELAY, self.launch)   # the old one is going
            return
        self._finish(ExitInfo(code=result.returncode if result.returncode > 0 else None,
                              detail=f"systemd-run failed: {result.describe()}"))

    def _got_pid(self, result):
        try:
            pid = int(result.stdout.strip() or 0)
        except ValueError:
            pid = 0
        if pid and not self.exited:
            self.pid = pid
            self.launcher.update_record(self.unit, pid=pid)
            self._watch_pid()

    def _watch_pid(self):
        """A pidfd on the main process: a backstop in case the exit record never comes."""
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except OSError:
            self._main_process_gone()
            return
        self.loop.add_reader(self._pidfd, self._main_process_gone)

    def _main_process_gone(self):
        self._close_pidfd()
        if not self.exited and self._grace_timer is None:
            self._grace_timer = self.loop.call_later(EXIT_RECORD_GRACE, self._no_exit_record)

    def _no_exit_record(self):
        info, _ = self.launcher.read_exit(self.unit)
        self._finish(info or ExitInfo(detail="main process gone; exit status unknown"))

    def exit_recorded(self):
        info, _ = self.launcher.read_exit(self.unit)
        if info is not None:
            self._finish(info)

    def _finish(self, info):
        if self.exited:
            return
        self.exited = True
        self._close_pidfd()
        for timer in (self._grace_timer, self._kill_timer):
            if timer is not None:
                timer.cancel()
        self.launcher.forget(self.unit)
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
            self._kill_timer = self.loop.call_later(timeout + EXIT_RECORD_GRACE, self.kill)

    def _systemctl_stop(self):
        run_async(self.loop, [SYSTEMCTL, "stop", "--no-block", self.unit], self._log_failure,
                  timeout=30)

    def kill(self):
        if self.exited or not self.started:
            return
        run_async(self.loop, [SYSTEMCTL, "kill", "--signal=SIGKILL", self.unit],
                  self._log_failure, timeout=30)

    def _log_failure(self, result):
        if not result.ok:
            log.warning("%s: %s", self.unit, result.describe())
