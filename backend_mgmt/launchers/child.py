"""Backends as child processes of the daemon.

Each backend runs in its own process group (so a stop reaches its helpers too) with
PR_SET_PDEATHSIG, so it is killed if the daemon dies without stopping it. Exit is seen through
a pidfd in the event loop, output through a pipe: no polling and no SIGCHLD handler.

fork+exec of a Python backend takes a few milliseconds, and Popen waits for the exec; a
spawner thread does it so that ten loads at once do not hold up the event loop.
"""

import ctypes
import errno
import logging
import os
import pwd
import queue
import signal
import subprocess
import threading

from .. import access, fdlimit
from . import oom
from .base import ExitInfo, LaunchError, Launcher, Running

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)
OUTPUT_CHUNK = 65536


def _die_with_parent(parent_pid):
    """Runs in the child between fork and exec.

    PDEATHSIG fires when the *thread* that forked the child ends; the spawner thread lives as
    long as the daemon, so that is the daemon's death."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    fdlimit.restore_inherited()      # the daemon's own raised limit is not for backends
    if os.getppid() != parent_pid:   # the daemon died before prctl took effect
        os._exit(1)


def unenforced_resources(resources):
    """The resources set for a model that child processes do not get (only units do)."""
    if resources is None:
        return []
    return [name for name, value in (("memory_max", resources.memory_max),
                                     ("cpu_quota", resources.cpu_quota),
                                     ("properties", resources.properties)) if value]


class ChildLauncher(Launcher):
    """Backends die with the daemon (PR_SET_PDEATHSIG): nothing to recover or keep."""
    name = "process"

    def __init__(self, loop, environ=None):
        super().__init__(loop)
        # What every backend inherits (the daemon's environment less NOTIFY_SOCKET & co.).
        self.environ = dict(os.environ if environ is None else environ)
        self._spawn_requests = queue.SimpleQueue()
        self._spawner = None

    def start(self, spec, on_output, on_exit):
        """Start the backend; ``on_output(line)`` per output line, ``on_exit(ExitInfo)`` once.

        Returns at once; the handle's pid is set when the process exists."""
        identity = self._identity(spec)
        unenforced = unenforced_resources(spec.resources)
        if unenforced:
            log.warning("model %s: resources %s not enforced by the process launcher (only "
                        "transient units apply them: launcher systemd)", spec.name,
                        ", ".join(unenforced))
        handle = ChildProcess(self.loop, spec.name, on_output, on_exit)
        if self._spawner is None:
            self._spawner = threading.Thread(target=self._spawn_forever, name="spawner",
                                             daemon=True)
            self._spawner.start()
        env = {**self.environ, **spec.env}
        if identity:
            entry = pwd.getpwuid(identity["user"])
            env.update(HOME=entry.pw_dir, USER=entry.pw_name, LOGNAME=entry.pw_name)
        self._spawn_requests.put((list(spec.argv), env, identity, handle))
        return handle

    @staticmethod
    def _identity(spec, euid=None):
        """Popen's user/group/extra_groups for ``resources.user``; {} to stay who we are.
        Raises LaunchError when the daemon cannot switch to that user."""
        user = spec.resources.user if spec.resources is not None else None
        if not user:
            return {}
        euid = os.geteuid() if euid is None else euid
        try:
            owner = access.backend_owner(user, None, euid=euid)
        except access.AccessError as exc:
            raise LaunchError(str(exc)) from None
        if euid != 0:
            if owner.uid == euid:
                return {}
            raise LaunchError(f"model {spec.name}: resources.user {user!r} needs the daemon to "
                              f"run as root (it runs as uid {euid}); refusing to start the "
                              f"backend as the daemon's own user instead")
        return {"user": owner.uid, "group": owner.gid, "extra_groups": list(owner.groups)}

    def _spawn_forever(self):
        parent_pid = os.getpid()
        while True:
            argv, env, identity, handle = self._spawn_requests.get()
            try:
                process = subprocess.Popen(
                    argv, env=env, stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    process_group=0, close_fds=True,
                    preexec_fn=lambda: _die_with_parent(parent_pid), **identity)
            except OSError as exc:
                reason = f"could not be started: {argv[0]!r}: {exc.strerror}"
                self.loop.call_soon_threadsafe(lambda h=handle, r=reason: h.spawn_failed(r))
                continue
            self.loop.call_soon_threadsafe(lambda h=handle, p=process: h.spawned(p))


class ChildProcess(Running):
    def __init__(self, loop, name, on_output, on_exit):
        self.loop = loop
        self.name = name
        self.process = None
        self.pid = None
        self._on_output = on_output
        self._on_exit = on_exit
        self._partial = b""
        self._kill_timer = None
        self._stop_timeout = None      # a stop asked for before the process existed
        self.exited = False
        self._pipe = None
        self._pidfd = None
        self._oom_counter = None       # its memory cgroup's oom_kill count file...
        self._oom_kills_at_start = None  # ...and the count when it started
        self._killed_by_us = False

    # -- start (on the loop, once the spawner thread has forked) -------------------
    def spawned(self, process):
        self.process = process
        self.pid = process.pid
        log.info("model %s: started pid %d: %s", self.name, self.pid, " ".join(process.args))
        self._oom_counter = oom.counter_file(self.pid)
        self._oom_kills_at_start = oom.oom_kills(self._oom_counter)
        # A zombie still has a pidfd, so there is no race with a very quick exit.
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except OSError as exc:
            # Out of file descriptors: a process nobody watches must not run on. Kill its
            # group; subprocess reaps it once the Popen is dropped.
            self._signal_group(signal.SIGKILL)
            process.stdout.close()
            self.process = None
            self.spawn_failed(f"could not be watched ({exc.strerror}); killed")
            return
        self._pipe = process.stdout.fileno()
        os.set_blocking(self._pipe, False)
        self.loop.add_reader(self._pipe, self._read_output)
        self.loop.add_reader(self._pidfd, self._exited)
        if self._stop_timeout is not None:
            self.stop(self._stop_timeout)

    def spawn_failed(self, reason):
        self.exited = True
        self._on_exit(ExitInfo(detail=reason))

    # -- output and exit -------------------------------------------------------------
    def _read_output(self):
        while True:
            try:
                chunk = os.read(self._pipe, OUTPUT_CHUNK)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                chunk = b""
            if not chunk:
                self._close_pipe()
                return
            *lines, self._partial = (self._partial + chunk).split(b"\n")
            for line in lines:
                self._on_output(line.decode("utf-8", "replace").rstrip("\r"))
            if len(self._partial) > OUTPUT_CHUNK:   # a very long line: pass it on in pieces
                self._on_output(self._partial.decode("utf-8", "replace"))
                self._partial = b""

    def _close_pipe(self):
        if self._pipe is None:
            return
        if self._partial:
            self._on_output(self._partial.decode("utf-8", "replace").rstrip("\r"))
            self._partial = b""
        self.loop.remove_reader(self._pipe)
        self.process.stdout.close()
        self._pipe = None

    def _exited(self):
        try:
            # WNOWAIT: look without reaping, so the process group cannot be reused yet.
            if os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                return   # spurious wake-up
        except ChildProcessError:
            pass         # already reaped (Popen did it); poll() below has the code
        self._signal_group(signal.SIGKILL)   # no stray helpers outlive the backend
        returncode = self.process.poll()
        self.loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = None
        if self._kill_timer is not None:
            self._kill_timer.cancel()
        self.exited = True
        # Take what it printed last, so a failure report can quote it.
        if self._pipe is not None:
            self._read_output()
            # Helpers it left behind may keep the pipe open; stop reading it anyway.
            self._close_pipe()
        info = ExitInfo.from_returncode(returncode)
        if info.signal == signal.SIGKILL and not self._killed_by_us:
            kills = oom.oom_kills(self._oom_counter)
            if kills is not None and self._oom_kills_at_start is not None and \
                    kills > self._oom_kills_at_start:
                info = ExitInfo(signal=signal.SIGKILL, oom_killed=True)
        self._on_exit(info)

    def _signal_group(self, signum):
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            pass
        except PermissionError as exc:
            log.warning("cannot signal process group %d: %s", self.pid, exc)

    # -- stop ------------------------------------------------------------------------
    def stop(self, timeout):
        if self.exited:
            return
        if self.process is None:          # still being spawned: stop it once it exists
            self._stop_timeout = timeout
            return
        self._signal_group(signal.SIGTERM)
        if self._kill_timer is None:
            self._kill_timer = self.loop.call_later(
                timeout, lambda: self._kill_after_timeout(timeout))

    def _kill_after_timeout(self, timeout):
        if not self.exited:
            log.warning("backend pid %d still running %.3g s after SIGTERM; sending SIGKILL",
                        self.pid, timeout)
            self.kill()

    def kill(self):
        if self.exited:
            return
        if self.process is None:
            self._stop_timeout = 0
            return
        self._killed_by_us = True
        self._signal_group(signal.SIGKILL)
