"""The launcher interface: start a backend, learn about its output and exit, stop it.

A launcher owns everything that spawns or signals processes (or, for systemd, units). The
registry only sees ``Running`` handles and ``ExitInfo`` values.
"""

import dataclasses
import json
import signal
from dataclasses import dataclass

from ..names import long_digest

# Variables that say where a run was placed or whom it reports to, not what it is: a
# different GPU placement or progress socket does not make a different definition.
_PLACEMENT_VARIABLES = frozenset({"CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "NOTIFY_SOCKET",
                                  "BACKEND_MGMT_NOTIFY_SOCKET"})


@dataclass(frozen=True)
class LaunchSpec:
    name: str                 # the model name (for logs)
    argv: tuple
    env: dict                 # variables for this backend, on top of what a launcher gives
    endpoint: str
    resources: object = None  # config.Resources
    stop_timeout: float = 10.0
    started_at: float | None = None

    @property
    def definition(self):
        """A digest of what the backend is made of (command line, its environment, resources,
        stop timeout): a unit started from an equal one needs no restart to match it."""
        resources = self.resources
        if dataclasses.is_dataclass(resources):
            resources = dataclasses.asdict(resources)
        document = {
            "argv": list(self.argv),
            "env": {k: v for k, v in self.env.items() if k not in _PLACEMENT_VARIABLES},
            "resources": resources,
            "stop_timeout": self.stop_timeout,
        }
        return long_digest(json.dumps(document, sort_keys=True, default=str))


@dataclass(frozen=True)
class ExitInfo:
    """How a backend ended: an exit code or a signal (exactly one is set)."""
    code: int | None = None
    signal: int | None = None
    oom_killed: bool = False
    detail: str | None = None     # when neither is known, or the start itself failed
    output: tuple = ()            # its last lines, where the launcher reads them afterwards

    def describe(self):
        if self.oom_killed:
            return "killed by the out-of-memory killer"
        if self.detail and self.code is None and self.signal is None:
            return self.detail
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = f"signal {self.signal}"
            return f"killed by {name}"
        if self.code == 128 + signal.SIGKILL:
            # What a shell or wrapper reports for a SIGKILLed child: most often the OOM killer.
            return f"exited with code {self.code} (killed with SIGKILL, e.g. out of memory)"
        return f"exited with code {self.code}"

    def as_dict(self):
        return {"code": self.code, "signal": self.signal, "oom_killed": self.oom_killed,
                "description": self.describe()}

    @property
    def is_failure(self):
        return self.code != 0

    @classmethod
    def from_returncode(cls, returncode):
        """Popen style: negative means killed by that signal."""
        if returncode < 0:
            return cls(signal=-returncode)
        return cls(code=returncode)


class LaunchError(Exception):
    """The backend could not even be started (command not found, permission...)."""


class Running:
    """A started backend: what the manager may ask of every launcher's handle.

    ``exited`` turns True once the launcher has reported the end (``on_exit``); ``pid`` is
    set once the process exists; ``unit`` and ``control_group`` only for a systemd unit."""

    pid: int | None = None
    unit: str | None = None
    control_group: str | None = None   # its cgroup, whose processes may report progress
    exited: bool = False
    _on_exit = None

    def set_exit_callback(self, on_exit):
        """Who hears of the end: for a handle the manager did not start (adoption)."""
        self._on_exit = on_exit

    def note_ready(self, protocols):
        """The backend answered its handshake (``protocols``), or no longer counts as ready
        (None). A launcher whose backends outlive the daemon records it, so that the next
        daemon serves them at once; others need not."""

    def stop(self, timeout):
        """Ask it to stop (SIGTERM); kill it if still running after ``timeout`` seconds."""
        raise NotImplementedError

    def kill(self):
        raise NotImplementedError


class Launcher:
    """One way of running backends (child processes, systemd units). Subclasses implement
    ``start``; the rest has defaults for a launcher whose backends die with the daemon."""

    name = "launcher"

    def __init__(self, loop):
        self.loop = loop

    def start(self, spec, on_output, on_exit):
        """Launch ``spec``'s backend; return its ``Running`` at once. ``on_output(line)`` per
        line it prints (where the launcher reads them), ``on_exit(ExitInfo)`` once it is
        gone. Raises LaunchError when it cannot even be started."""
        raise NotImplementedError

    def recover(self):
        """Backends a previous daemon left running, as ``records.Adoption``s: none here."""
        return []

    def restart_pending(self, on_answer):
        """``on_answer(True)`` (later, from the loop) when the daemon is being restarted
        rather than stopped, so backends that outlive it may be left running."""
        self.loop.call_later(0, lambda: on_answer(False))

    def close(self):
        """Stop watching what the launcher watches (the daemon is exiting)."""
