"""Keeps client connections below what the file descriptor limit allows.

libzmq 4.3.4 aborts the whole process when accept() on an ipc:// listener fails with EMFILE
(tcp:// listeners survive it). Every accepted connection costs the daemon one descriptor, so
enough idle connections from anyone allowed to connect would kill it. The guard counts the
connections each listening socket accepts and loses (socket monitor events, no polling, read on
the side thread: sidethread.py). When
all of them together reach the budget, it unbinds the listener that holds the most: libzmq
then closes that listener's connections too (they belong to it), so its descriptors come back
at once, and nothing more is accepted there. It binds it again after a pause (1 s, doubling
while this keeps happening, at most 60 s); ZeroMQ clients reconnect by themselves, and a
request that was in flight on a closed connection gets no reply (clients time out and retry).
The other listeners are untouched: a flood on the handshake socket does not cut the operators'
control socket off.

Memory: libzmq 4.3.4 keeps a multipart message that is still arriving in its own buffers,
out of the daemon's sight, until its last frame; ZMQ_MAXMSGSIZE bounds each frame, RCVHWM
counts whole messages, so a peer speaking ZMTP itself (no libzmq client does this) can send
frames flagged MORE for ever, about 200 MiB/s here. While clients are connected the guard
looks at the daemon's resident memory four times a second; past MEMORY_HEADROOM above what it was
when serving began, it resets every listener that has connections (which frees what they
held), gives the memory back to the system (malloc_trim), and binds them again after the
pause.

The budget is what the limit leaves after the descriptors the daemon holds when it starts
serving and a reserve for its own work (backend processes, pipes, probes) and for the
connections libzmq may still accept before the guard acts. That reaction is a race no code
here can win for certain: libzmq's I/O thread accepts a burst of connections in well under a
millisecond each, and on a busy machine the side thread and the loop may wait for the CPU
longer than that. With 2 busy cores, 2200 connections at once to a daemon with a limit of 2048
were seen accepted up to about 150 past the budget; the reserve (a quarter of the limit) is
there for that, and the guard asks for the reset the moment the count reaches the budget.
"""

import ctypes
import logging
import os
import resource
import threading

import zmq

from . import wire

log = logging.getLogger(__name__)

MIN_RESERVE = 128       # descriptors kept for the daemon's own work...
RESERVE_FRACTION = 4    # ...or 1/4 of the limit, whichever is more
MIN_BUDGET = 8


def budget_for(limit, in_use):
    """How many client connections a limit of ``limit`` descriptors allows (pure)."""
    reserve = max(MIN_RESERVE, limit // RESERVE_FRACTION)
    return max(MIN_BUDGET, limit - in_use - reserve)


MEMORY_HEADROOM = 256 * 1024 * 1024   # resident memory growth that resets the listeners
MEMORY_CHECK_EVERY = 0.25             # seconds, while any client is connected
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# Read per connection made and lost, so without pyzmq's helpers (parse_monitor_message makes an
# enum and a dict per event; IntFlag arithmetic on its constants costs as much again).
EVENTS, POLLIN, NOBLOCK = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.NOBLOCK)
RCVMORE = int(zmq.RCVMORE)
ACCEPTED, DISCONNECTED = int(zmq.EVENT_ACCEPTED), int(zmq.EVENT_DISCONNECTED)
CLOSED = int(zmq.EVENT_CLOSED)      # the listener itself, after an unbind

PAUSE_FIRST = 1.0
PAUSE_MAX = 60.0
CALM_AFTER = 300.0      # seconds without a reset before the pause starts at PAUSE_FIRST again


class Listener:
    __slots__ = ("socket", "endpoint", "after_bind", "rebind", "monitor", "arrivals",
                 "connections", "paused", "closing")

    def __init__(self, sock, endpoint, after_bind, monitor, rebind=None, arrivals=None):
        self.socket, self.endpoint, self.after_bind = sock, endpoint, after_bind
        self.rebind = rebind or (lambda: sock.bind(endpoint))
        self.monitor = monitor
        self.arrivals = arrivals
        self.connections = 0
        self.paused = False
        # Unbound, its CLOSED event not read yet: events still queued for it are for
        # connections that close with it, and are not counted.
        self.closing = False


class ConnectionGuard:
    """Counts on the side thread (sidethread.py: no wake-up of the loop per connection),
    acts on the loop: unbinding and binding a listening socket is the loop's business, so
    the side thread hands it each reset it decides on."""

    def __init__(self, loop, context, side):
        self.loop = loop
        self.context = context
        self.side = side
        self.listeners = []
        self.budget = None
        self.memory_base = None
        self._memory_start = None
        self._next_memory_check = None   # loop clock; None while nobody is connected
        self._trim_pending = False
        self._reset_asked = False        # a reset for the budget handed to the loop, not done
        # Counts change on the side thread (events) and on the loop (a reset zeroes them).
        self._lock = threading.Lock()
        self.resets = 0
        self._pause = PAUSE_FIRST
        self._last_reset = None
        side.add_ticker(self._memory_tick)

    @property
    def connections(self):
        return sum(listener.connections for listener in self.listeners)

    def watch(self, sock, endpoint, after_bind=lambda: None, rebind=None, arrivals=None):
        """Count ``sock``'s accepted connections; ``after_bind()`` runs after a re-bind
        (file mode and group of an ipc socket file). ``rebind()`` binds it again (default
        ``sock.bind(endpoint)``; a socket libzmq got with ZMQ_USE_FD needs a fresh
        descriptor each time, see listeners.py). ``arrivals`` (listeners.HandshakeGate) is
        told of each connection accepted and lost, by descriptor, on the side thread."""
        address = f"inproc://connguard-{id(sock):x}"
        sock.monitor(address, zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED)
        monitor = self.context.socket(zmq.PAIR)
        monitor.setsockopt(zmq.LINGER, 0)
        monitor.setsockopt(zmq.RCVHWM, 0)    # libzmq blocks its I/O thread on a full monitor
        monitor.connect(address)
        listener = Listener(sock, endpoint, after_bind, monitor, rebind, arrivals)
        self.listeners.append(listener)
        self.side.add_reader(monitor, lambda: self._on_events(listener))

    def start(self):
        """Once everything is bound: the budget from the limit and what is in use now."""
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if limit == resource.RLIM_INFINITY:
            limit = 1 << 20
        self.budget = budget_for(limit, len(os.listdir("/proc/self/fd")))
        self.memory_base = self._memory_start = resident_memory()
        log.info("up to %d client connections (file descriptor limit %d)", self.budget, limit)

    # -- on the side thread ------------------------------------------------------------
    def _on_events(self, listener):
        monitor, arrivals = listener.monitor, listener.arrivals
        while monitor.getsockopt(EVENTS) & POLLIN:
            event, fd = wire.monitor_event(monitor.recv(NOBLOCK))
            while monitor.getsockopt(RCVMORE):      # the endpoint: not needed
                monitor.recv(NOBLOCK)
            if event == ACCEPTED:
                with self._lock:
                    if listener.closing:
                        continue
                    listener.connections += 1
                if arrivals is not None:
                    arrivals.accepted(fd)
                # At once, not after the drain: while a flood lasts, events come as fast as
                # they are read, and libzmq goes on accepting until the loop unbinds.
                if self.budget is not None and not self._reset_asked and \
                        self.connections >= self.budget:
                    self._reset_asked = True
                    self.loop.call_soon_threadsafe(self._reset_busiest)
            elif event == DISCONNECTED:
                with self._lock:
                    if not listener.closing:
                        listener.connections = max(0, listener.connections - 1)
                if arrivals is not None:
                    arrivals.lost(fd)
            elif event == CLOSED:
                with self._lock:
                    listener.closing = False

    def _memory_tick(self):
        """The side thread's timer: memory looked at every MEMORY_CHECK_EVERY seconds while
        clients are connected (or a trim is due), not at all otherwise."""
        if self.memory_base is None or not (self.connections or self._trim_pending):
            self._next_memory_check = None
            return None
        now = self.loop.clock()
        if self._next_memory_check is None:
            self._next_memory_check = now + MEMORY_CHECK_EVERY
        elif now >= self._next_memory_check:
            self._next_memory_check = now + MEMORY_CHECK_EVERY
            self._check_memory()
        return max(0.0, self._next_memory_check - now)

    def _check_memory(self):
        if self._trim_pending:
            # One check after the reset: libzmq has freed what the connections held by now.
            self._trim_pending = False
            _malloc_trim()
            still = resident_memory() - self.memory_base
            log.warning("resident memory now %d MiB above where it started", still >> 20)
            if still > MEMORY_HEADROOM // 2:
                # Kept by the allocator, or not the connections' doing: measure from here
                # rather than close the connections again and again, but never from more
                # than one headroom above the start, so repeated floods cannot ratchet it up.
                self.memory_base = min(self.memory_base + still,
                                       self._memory_start + MEMORY_HEADROOM)
            return
        grown = resident_memory() - self.memory_base
        if grown > MEMORY_HEADROOM:
            why = (f"resident memory grew by {grown >> 20} MiB while clients were connected "
                   f"(a message that never ends?)")
            self._trim_pending = True
            self.loop.call_soon_threadsafe(lambda: self._reset_connected(why))

    # -- on the loop -------------------------------------------------------------------
    def _reset_busiest(self):
        self._reset_asked = False
        if self.connections < self.budget:
            return
        busiest = max((item for item in self.listeners if not item.paused),
                      key=lambda item: item.connections, default=None)
        if busiest is not None:
            self._reset(busiest, f"{self.connections} client connections, the most the "
                                 f"file descriptor limit allows")

    def _reset_connected(self, why):
        for listener in self.listeners:
            if listener.connections and not listener.paused:
                self._reset(listener, why)

    def _reset(self, listener, why):
        now = self.loop.clock()
        if self._last_reset is not None and now - self._last_reset > CALM_AFTER:
            self._pause = PAUSE_FIRST
        self._last_reset = now
        pause, self._pause = self._pause, min(self._pause * 2, PAUSE_MAX)
        self.resets += 1
        log.warning("%s: closing the %d connections on %s and not accepting new connections "
                    "there for %g s", why, listener.connections, listener.endpoint, pause)
        listener.paused = True
        with self._lock:
            # Its connections close with it (libzmq sends no event for those), and so do
            # the ones it accepts before the unbind takes effect, whose events are still on
            # their way. Before the unbind: the CLOSED event may be read at once.
            counted, listener.connections = listener.connections, 0
            listener.closing = True
        try:
            listener.socket.unbind(
                listener.socket.getsockopt_string(zmq.LAST_ENDPOINT) or listener.endpoint)
        except zmq.ZMQError as exc:
            log.error("cannot stop accepting on %s: %s", listener.endpoint, exc)
            with self._lock:
                listener.connections += counted
                listener.closing = False
            return
        self.loop.call_later(pause, lambda: self._resume(listener))

    def _resume(self, listener):
        if not listener.paused or listener.socket.closed:
            return
        listener.paused = False
        with self._lock:
            if listener.closing:     # no CLOSED event came: count again all the same
                log.warning("no word from libzmq that %s was closed", listener.endpoint)
                listener.closing = False
        try:
            listener.rebind()
            listener.after_bind()
        except (zmq.ZMQError, OSError) as exc:
            log.error("cannot accept on %s again: %s", listener.endpoint, exc)
            return
        log.warning("accepting new connections on %s again", listener.endpoint)

    def close(self):
        """Once the side thread has stopped: the monitors are the loop's to close."""
        for listener in self.listeners:
            try:
                listener.socket.disable_monitor()
            except zmq.ZMQError:
                pass
            listener.monitor.close(linger=0)
        self.listeners = []


def resident_memory():
    """This process's resident memory in bytes (one small read of /proc)."""
    with open("/proc/self/statm") as stream:
        return int(stream.read().split()[1]) * PAGE_SIZE


def _malloc_trim():
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
