"""The event loop: one zmq.Poller over the ZeroMQ sockets, an epoll over the plain file
descriptors (one entry in that poller), plus timers.

The poll timeout is always the nearest timer deadline (or forever), so an idle daemon sleeps in
the kernel and uses no CPU. Callbacks must not block: a helper command (systemctl,
systemd-run, nvidia-smi, the config validator) runs through ``run_async``, its output and exit
watched by the loop.

Why two pollers: zmq.Poller rebuilds its item array in Python on every wake-up, so its cost
grows with every backend's pipe and pidfd; epoll keeps the plain descriptors in the kernel and
costs the same for ten or a thousand. ZeroMQ sockets stay with zmq_poll, which knows when one
has messages although its descriptor did not signal.
"""

import collections
import heapq
import itertools
import logging
import os
import select
import signal
import subprocess
import time

import zmq

from . import isolation
from .bounds import MAX_SECONDS

log = logging.getLogger(__name__)

# Defence in depth: values are checked where they come in (bounds.py), but no deadline, however
# computed, may jam or overflow the loop. A timer further out than MAX_TIMER_DELAY is brought
# in to that (it fires early, and its owner re-checks); one that is not a number is refused.
MAX_TIMER_DELAY = 2 * MAX_SECONDS
MAX_POLL_MS = 3600 * 1000       # a poll for a far timer wakes hourly: its timeout always fits
POLLIN = int(zmq.POLLIN)        # a plain int: IntFlag arithmetic costs per call


class Mailbox:
    """Calls handed to a thread by others, and a pipe that wakes that thread's poll for them
    (its ``fd``). Used by the loop (call_soon_threadsafe) and by the side thread."""

    def __init__(self):
        self.calls = collections.deque()
        self.fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def post(self, call):
        """From any thread: queue ``call`` and wake the owner."""
        self.calls.append(call)
        try:
            os.write(self._write_fd, b"\0")
        except BlockingIOError:
            pass   # the pipe is full of wake-ups already: the owner will come

    def clear_wakeups(self):
        """On the owner's thread, once woken: empty the pipe (the calls stay queued)."""
        try:
            os.read(self.fd, 4096)
        except BlockingIOError:
            pass

    def close(self):
        for fd in (self.fd, self._write_fd):
            os.close(fd)


class Timer:
    __slots__ = ("deadline", "callback", "cancelled")

    def __init__(self, deadline, callback):
        self.deadline = deadline
        self.callback = callback
        self.cancelled = False

    def cancel(self):
        self.cancelled = True


class EventLoop:
    def __init__(self, clock=time.monotonic, wall_clock=time.time):
        # The daemon's one source of time: ``clock()`` (monotonic) for deadlines and
        # durations, ``wall_clock()`` for the times people read. A test's loop fakes both.
        self.clock = clock
        self.wall_clock = wall_clock
        self._poller = zmq.Poller()          # the ZeroMQ sockets, and the epoll below
        self._epoll = select.epoll()         # the plain file descriptors
        self._epoll_fd = self._epoll.fileno()
        self._poller.register(self._epoll_fd, POLLIN)
        self._handlers = {}          # socket or fd -> callback()
        self._timers = []            # heap of (deadline, seq, Timer)
        self._seq = itertools.count()
        self._running = False
        self._mailbox = Mailbox()            # callbacks other threads hand to the loop
        self.add_reader(self._mailbox.fd, self._run_from_threads)

    def call_soon_threadsafe(self, callback):
        """Run ``callback`` on the loop's thread; callable from any thread."""
        self._mailbox.post(callback)

    def _run_from_threads(self):
        self._mailbox.clear_wakeups()
        calls = self._mailbox.calls
        while calls:
            self._guarded(calls.popleft())

    def close(self):
        self.remove_reader(self._mailbox.fd)
        self._mailbox.close()
        self._epoll.close()

    # -- registration ---------------------------------------------------------------
    def add_reader(self, source, callback):
        """Call ``callback()`` whenever ``source`` (a zmq socket or an fd) is readable."""
        self._handlers[source] = callback
        if isinstance(source, int):
            try:
                self._epoll.register(source, select.EPOLLIN)
            except FileExistsError:      # watched already: a new callback, same descriptor
                self._epoll.modify(source, select.EPOLLIN)
        else:
            self._poller.register(source, POLLIN)

    def remove_reader(self, source):
        if self._handlers.pop(source, None) is not None:
            if isinstance(source, int):
                try:
                    self._epoll.unregister(source)
                except OSError:          # closed already: epoll forgot it by itself
                    pass
            else:
                self._poller.unregister(source)

    def close_socket(self, sock):
        """Stop watching a zmq socket and close it, dropping anything unsent."""
        self.remove_reader(sock)
        sock.close(linger=0)

    def call_at(self, deadline, callback):
        if deadline != deadline:          # NaN (math.isnan cannot take a huge int)
            raise ValueError(f"timer deadline is not a number ({callback!r})")
        latest = self.clock() + MAX_TIMER_DELAY
        if deadline > latest:
            log.warning("timer for %r is more than %d s away; brought in to that", callback,
                        MAX_TIMER_DELAY)
            deadline = latest
        timer = Timer(deadline, callback)
        heapq.heappush(self._timers, (deadline, next(self._seq), timer))
        return timer

    def call_later(self, delay, callback):
        if delay > MAX_TIMER_DELAY:       # also keeps a huge int from overflowing the sum
            delay = float("inf")          # call_at brings it in, and says so
        return self.call_at(self.clock() + delay, callback)

    # -- running --------------------------------------------------------------------
    def stop(self):
        self._running = False

    def run(self):
        self._running = True
        while self._running:
            timeout_ms = self._run_due_timers()
            if not self._running:
                break
            for source, _ in self._poller.poll(timeout_ms):
                if source == self._epoll_fd:
                    for fd, _ in self._epoll.poll(0):
                        self._dispatch(fd)
                else:
                    self._dispatch(source)

    def _dispatch(self, source):
        callback = self._handlers.get(source)
        if callback is not None:   # may have been removed by an earlier callback
            self._guarded(callback)

    def _run_due_timers(self):
        """Run timers that are due; return the poll timeout in ms (None: no timer)."""
        while self._timers:
            deadline, _, timer = self._timers[0]
            if timer.cancelled:
                heapq.heappop(self._timers)
                continue
            remaining = deadline - self.clock()
            if remaining > 0:
                # Round up so we do not wake a hair early and spin.
                return min(int(remaining * 1000) + 1, MAX_POLL_MS)
            heapq.heappop(self._timers)
            self._guarded(timer.callback)
        return None

    def _guarded(self, callback):
        try:
            callback()
        except Exception:   # one bad event must not take the daemon down
            log.exception("unhandled error in event callback %r", callback)


# -- helper commands, watched by the loop ------------------------------------------------

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


class RunningCommand:
    """What run_async started. ``kill()`` ends it now (SIGKILL) when its result is no longer
    wanted; ``on_done`` is still called once it has exited."""

    __slots__ = ("_process",)

    def __init__(self, process=None):
        self._process = process        # None: it never started

    def kill(self):
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGKILL)


def run_async(loop, argv, on_done, timeout=30.0, env=None):
    """Start ``argv``; call ``on_done(CommandResult)`` once it has exited (or was killed
    after ``timeout`` seconds). Output is read as it comes, so a chatty command cannot block
    on a full pipe. It runs isolated (isolation.py): in ``/``, with ``env`` or else a clean
    environment, never the daemon's own. ``on_done`` is always called, later, from the loop;
    a command that cannot be started (out of file descriptors, not found) gets returncode
    127. Returns its RunningCommand."""
    try:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, close_fds=True,
                                   env=isolation.clean_env() if env is None else env,
                                   cwd=isolation.WORKING_DIRECTORY)
    except OSError as exc:
        failed = CommandResult(argv, 127, "", str(exc))   # (exc is unbound after the block)
        loop.call_later(0, lambda: on_done(failed))
        return RunningCommand()
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
    return RunningCommand(process)
