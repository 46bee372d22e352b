"""Running a short helper command (systemctl, systemd-run) without blocking the event loop."""

import logging
import os
import signal
import subprocess

from .. import isolation

log = logging.getLogger(__name__)


class CommandResult:
    __slots__ = ("argv", "returncode", "stdout", "stderr", "timed_out")

    def __init__(self, argv, returncode, stdout, stderr, timed_out=False):
        self.argv, self.returncode = argv, returncode
        self.stdout, self.stderr, self.timed_out = stdout, stderr, timed_out

    @property
    def ok(self):
        return self.returncode == 0 and not self.timed_out

    def describe(self):
        if self.timed_out:
            return f"{self.argv[0]} timed out"
        detail = (self.stderr or self.stdout).strip().splitlines()
        return f"{self.argv[0]} exited with {self.returncode}" + (
            f": {detail[-1]}" if detail else "")


def run_async(loop, argv, on_done, timeout=30.0, env=None):
    """Start ``argv``; call ``on_done(CommandResult)`` once it has exited (or was killed
    after ``timeout`` seconds). Output is read as it comes, so a chatty command cannot block
    on a full pipe. It runs isolated (isolation.py): in ``/``, with ``env`` or else a clean
    environment, never the daemon's own. ``on_done`` is always called, later, from the loop;
    a command that cannot be started (out of file descriptors, not found) gets returncode
    127."""
    try:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, close_fds=True,
                                   env=isolation.clean_env() if env is None else env,
                                   cwd=isolation.WORKING_DIRECTORY)
    except OSError as exc:
        failed = CommandResult(argv, 127, "", str(exc))   # (exc is unbound after the block)
        loop.call_later(0, lambda: on_done(failed))
        return
    buffers = {process.stdout.fileno(): [], process.stderr.fileno(): []}
    open_pipes = set(buffers)
    try:
        pidfd = os.pidfd_open(process.pid)
    except OSError as exc:
        # Out of file descriptors, with the command already running (systemd-run may have
        # started a unit): never leave it unwatched. Its exit shows as the end of both its
        # pipes, then it is reaped.
        log.warning("%s: cannot watch pid %d (%s); following its output instead", argv[0],
                    process.pid, exc.strerror)
        pidfd = None
    state = {"timed_out": False, "finished": False}

    def reader(fd):
        def read():
            while True:
                try:
                    chunk = os.read(fd, 65536)
                except (BlockingIOError, ValueError, OSError):
                    return
                if not chunk:
                    loop.remove_reader(fd)
                    open_pipes.discard(fd)
                    if pidfd is None and not open_pipes:
                        exited()
                    return
                buffers[fd].append(chunk)
        return read

    for fd in buffers:
        os.set_blocking(fd, False)
        loop.add_reader(fd, reader(fd))

    def kill():
        state["timed_out"] = True
        log.warning("%s did not finish within %g s; killing it", argv[0], timeout)
        process.send_signal(signal.SIGKILL)

    timer = loop.call_later(timeout, kill)

    def exited():
        if state["finished"]:
            return
        if process.poll() is None:
            if pidfd is None:              # pipes closed, process not gone yet: look again
                loop.call_later(0.01, exited)
            return
        state["finished"] = True
        timer.cancel()
        if pidfd is not None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
        for fd in buffers:
            reader(fd)()               # what is left in the pipe
            loop.remove_reader(fd)
        process.stdout.close()
        process.stderr.close()
        out, err = (b"".join(buffers[f]).decode("utf-8", "replace") for f in buffers)
        on_done(CommandResult(argv, process.returncode, out, err, state["timed_out"]))

    if pidfd is not None:
        loop.add_reader(pidfd, exited)
