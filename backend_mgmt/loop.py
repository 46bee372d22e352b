"""The event loop: one zmq.Poller over sockets and file descriptors, plus timers.

The poll timeout is always the nearest timer deadline (or forever), so an idle daemon sleeps in
the kernel and uses no CPU. Callbacks must not block.
"""

import collections
import heapq
import itertools
import logging
import os
import time

import zmq

from .bounds import MAX_SECONDS

log = logging.getLogger(__name__)

# Defence in depth: values are checked where they come in (bounds.py), but no deadline, however
# computed, may jam or overflow the loop. A timer further out than MAX_TIMER_DELAY is brought
# in to that (it fires early, and its owner re-checks); one that is not a number is refused.
MAX_TIMER_DELAY = 2 * MAX_SECONDS
MAX_POLL_MS = 3600 * 1000       # a poll for a far timer wakes hourly: its timeout always fits


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
        self._poller = zmq.Poller()
        self._handlers = {}          # socket or fd -> callback()
        self._timers = []            # heap of (deadline, seq, Timer)
        self._seq = itertools.count()
        self._running = False
        # Other threads hand callbacks to the loop through this queue and wake it with a byte.
        self._from_threads = collections.deque()
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.add_reader(self._wake_read, self._run_from_threads)

    def call_soon_threadsafe(self, callback):
        """Run ``callback`` on the loop's thread; callable from any thread."""
        self._from_threads.append(callback)
        try:
            os.write(self._wake_write, b"\0")
        except BlockingIOError:
            pass   # the pipe is full of wake-ups already: the loop will come

    def _run_from_threads(self):
        try:
            os.read(self._wake_read, 4096)
        except BlockingIOError:
            pass
        while self._from_threads:
            self._guarded(self._from_threads.popleft())

    def close(self):
        self.remove_reader(self._wake_read)
        os.close(self._wake_read)
        os.close(self._wake_write)

    # -- registration ---------------------------------------------------------------
    def add_reader(self, source, callback):
        """Call ``callback()`` whenever ``source`` (a zmq socket or an fd) is readable."""
        self._handlers[source] = callback
        self._poller.register(source, zmq.POLLIN)

    def remove_reader(self, source):
        if self._handlers.pop(source, None) is not None:
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
            events = self._poller.poll(timeout_ms)
            for source, _ in events:
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
