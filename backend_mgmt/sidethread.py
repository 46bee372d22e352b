"""One thread beside the event loop, for the bookkeeping every client connection brings.

Each new connection to a listening socket costs three messages that are not requests: the ZAP
request of the handshake gate (listeners.HandshakeGate) and the socket monitor's "accepted" and
"disconnected" events (connguard.ConnectionGuard). Answered by the loop they cost a wake-up
each, and a client that opens a connection per request (the project's CLI does) waited for
them on the loop's thread: a status round trip took about 1.8 times what a bare ROUTER socket
needs. Here they are read by a thread of their own, which sleeps in zmq_poll (without the
GIL) while the loop serves requests.

Rules, because ZeroMQ sockets are not thread-safe: a socket given to ``add_reader`` is used
only by this thread from ``start()`` until ``stop()`` returns; what the thread decides that
needs one of the loop's sockets is handed to the loop (``EventLoop.call_soon_threadsafe``).
"""

import logging
import threading
import time

import zmq

from .loop import Mailbox

log = logging.getLogger(__name__)

POLLIN = int(zmq.POLLIN)
STOP_WAIT = 5.0        # seconds stop() waits for the thread (its callbacks are short)
POLL_RETRY = 0.01      # seconds before polling again after a failed poll
_STOP = object()


class SideThread:
    def __init__(self, name="backend-mgmt-side"):
        self.name = name
        self._poller = zmq.Poller()
        self._handlers = {}
        self._tickers = []
        self._mailbox = Mailbox()            # calls handed to the thread: call_and_wait, stop
        self._poller.register(self._mailbox.fd, POLLIN)
        self._thread = None

    def add_reader(self, sock, callback):
        """Call ``callback()`` on this thread whenever ``sock`` is readable (before start)."""
        assert self._thread is None, "readers are added before the thread starts"
        self._handlers[sock] = callback
        self._poller.register(sock, POLLIN)

    def add_ticker(self, tick):
        """``tick()`` is called on this thread after every wake-up and returns how many
        seconds may pass before it wants to be called again, or None (not until a socket
        wakes the thread): timed work without a wake-up when there is nothing to do."""
        assert self._thread is None, "tickers are added before the thread starts"
        self._tickers.append(tick)

    def start(self):
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    @property
    def running(self):
        return self._thread is not None and self._thread.is_alive()

    def call_and_wait(self, callback, timeout):
        """Run ``callback()`` on the thread once it has read what its sockets hold now, and
        wait for it (``timeout`` seconds at most); True if it ran. A barrier: whatever was
        queued on its sockets before this call has been handled when it returns True (the
        socket callbacks read all that is queued, as the guard's do)."""
        if not self.running:
            return False
        done = threading.Event()

        def call():
            try:
                callback()
            finally:
                done.set()
        self._mailbox.post(call)
        return done.wait(timeout)

    def stop(self):
        """Stop the thread and wait for it; its sockets are then the caller's again."""
        if self._thread is not None:
            self._mailbox.post(_STOP)
            self._thread.join(STOP_WAIT)
            if self._thread.is_alive():
                log.error("%s did not stop within %g s", self.name, STOP_WAIT)
            self._thread = None
        if self._mailbox is not None:
            self._mailbox.close()
            self._mailbox = None

    def _run(self):
        timeout = self._tick()
        while True:
            try:
                ready = self._poller.poll(
                    None if timeout is None else max(1, int(timeout * 1000)))
            except zmq.ZMQError as exc:    # never end the bookkeeping: the guard needs it
                log.error("%s: poll failed (%s); going on", self.name, exc)
                ready = []
                time.sleep(POLL_RETRY)
            woken = False
            for source, _ in ready:
                if source == self._mailbox.fd:
                    woken = True
                else:
                    self._guarded(self._handlers[source])
            if woken:           # after the sockets: call_and_wait is a barrier
                self._mailbox.clear_wakeups()
                # Only those handed over before this wake-up: a later one waits for the
                # next poll, after the sockets (each hand-over writes its own wake-up).
                calls = self._mailbox.calls
                for _ in range(len(calls)):
                    call = calls.popleft()
                    if call is _STOP:
                        return
                    self._guarded(call)
            timeout = self._tick()

    def _tick(self):
        soonest = None
        for tick in self._tickers:
            delay = self._guarded(tick)
            if delay is not None and (soonest is None or delay < soonest):
                soonest = delay
        return soonest

    @staticmethod
    def _guarded(callback):
        try:
            return callback()
        except Exception:   # one bad event must not end the thread (nor the bookkeeping)
            log.exception("unhandled error in %r", callback)
            return None
