"""Listening sockets that outlive the daemon, through systemd's file descriptor store.

The daemon binds each ipc:// endpoint itself (a plain AF_UNIX listening socket), hands libzmq
a duplicate of it (ZMQ_USE_FD, so libzmq neither binds nor unlinks anything) and, under
systemd, stores it in the unit's fd store (sd_notify FDSTORE=1, FDNAME=<role>). The next
start of the service gets it back in LISTEN_FDS/LISTEN_FDNAMES. So the socket file never
disappears, and a client that connects while the daemon restarts (or after it crashed)
waits in the kernel's accept queue until the new daemon takes the connection.

What comes in LISTEN_FDS is checked before use (another program may have started us with
any environment): LISTEN_PID must be ours, and each fd must be an AF_UNIX stream socket that
listens, bound to the very path this run's config names for that role. Anything else is
closed here and dropped from the store (FDSTOREREMOVE=1), and the endpoint is bound fresh;
so is a role whose endpoint the config moved.

Without systemd (no NOTIFY_SOCKET) this binds as before, only nothing is stored.
"""

import collections
import fcntl
import logging
import os
import socket
import stat
import threading

import zmq

from . import runtime

log = logging.getLogger(__name__)

LISTEN_FDS_START = 3        # SD_LISTEN_FDS_START
MAX_LISTEN_FDS = 64         # far more than the three we store; more is not systemd's doing


def take_listen_fds(environ, pid=None, start=LISTEN_FDS_START):
    """{name: [fd, ...]} passed to this process by systemd, removing LISTEN_PID, LISTEN_FDS
    and LISTEN_FDNAMES from ``environ`` (so children never see them). Empty unless
    LISTEN_PID is our pid; the fds are made close-on-exec. (``start``: for tests.)"""
    pid = os.getpid() if pid is None else pid
    owner = environ.pop("LISTEN_PID", None)
    count = environ.pop("LISTEN_FDS", None)
    names = environ.pop("LISTEN_FDNAMES", None)
    if owner is None or count is None:
        return {}
    if owner.strip() != str(pid):
        log.warning("ignoring LISTEN_FDS: LISTEN_PID=%r is not this process (%d)", owner, pid)
        return {}
    try:
        count = int(count)
    except ValueError:
        log.warning("ignoring LISTEN_FDS=%r: not a number", count)
        return {}
    if not 0 < count <= MAX_LISTEN_FDS:
        if count:
            log.warning("ignoring LISTEN_FDS=%d: not between 1 and %d", count, MAX_LISTEN_FDS)
        return {}
    labels = names.split(":") if names else []
    received = {}
    for index in range(count):
        fd = start + index
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
            fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        except OSError:
            continue                       # not open: nothing to take
        name = labels[index] if index < len(labels) and labels[index] else "unknown"
        received.setdefault(name, []).append(fd)
    return received


def why_unusable(fd, path):
    """None if ``fd`` is an AF_UNIX stream socket listening on ``path``, else why not."""
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            return "not a socket"
        with socket.socket(fileno=os.dup(fd)) as sock:
            if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
                return f"a {sock.family.name} {sock.type.name} socket, not AF_UNIX SOCK_STREAM"
            if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                return "not listening"
            bound = sock.getsockname()
    except OSError as exc:
        return f"cannot inspect it: {exc.strerror or exc}"
    if isinstance(bound, bytes):
        bound = bound.decode("utf-8", "replace")
    if bound != path:
        return f"bound to {bound or 'no path'!r}, not {path!r}"
    try:
        # The file itself must still be there, else nobody can reach the socket. (The runtime
        # dir is checked as ours: only root could have put another socket in its place.)
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return f"{path} is not a socket file any more"
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    return None


class Listening:
    """One listening AF_UNIX socket (the daemon's own descriptor) for one role."""

    def __init__(self, role, endpoint, fd, reused):
        self.role, self.endpoint, self.fd, self.reused = role, endpoint, fd, reused

    def attach(self, zmq_socket):
        """Make ``zmq_socket`` accept on it: libzmq gets (and later closes) a duplicate."""
        duplicate = os.dup(self.fd)
        try:
            zmq_socket.setsockopt(zmq.USE_FD, duplicate)
            zmq_socket.bind(self.endpoint)
        except zmq.ZMQError:
            os.close(duplicate)
            raise

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class Listeners:
    """The daemon's listening sockets for one run: taken from systemd's fd store when usable,
    else bound fresh (and stored)."""

    def __init__(self, inherited, notifier):
        self.inherited = inherited          # {name: [fd, ...]} from take_listen_fds
        self.notifier = notifier
        self.sockets = {}
        self.stored = False                 # something of ours is in systemd's fd store

    @classmethod
    def from_environment(cls, environ, notifier):
        return cls(take_listen_fds(environ), notifier)

    def open(self, role, endpoint, mode, group):
        """The Listening socket for ``endpoint`` (ipc:// only; None for others, which
        libzmq binds as before). Raises runtime.StartupError."""
        path = runtime.ipc_path(endpoint)
        offered = self.inherited.pop(role, [])
        if path is None:
            self._drop(role, offered, "the endpoint is not ipc:// any more")
            return None
        listening = None
        for fd in offered:
            reason = why_unusable(fd, path) if listening is None else "a second one"
            if reason is None:
                listening = Listening(role, endpoint, fd, reused=True)
                log.info("%s: accepting on %s, kept by systemd across the restart", role, path)
            else:
                log.warning("%s: not using the stored socket: %s", role, reason)
                os.close(fd)
        if listening is None:
            if offered:
                self.notifier.remove_stored(role)
            listening = Listening(role, endpoint, self._bind_fresh(endpoint, path), False)
        elif len(offered) > 1:
            self.notifier.remove_stored(role)       # keep exactly the one we use
        # Mode and group as configured now (they may have changed since it was stored).
        runtime.restrict_socket_file(endpoint, mode, group)
        if listening.reused and len(offered) == 1:
            self.stored = True                      # still in the store from the last run
        elif self.notifier.store_fd(role, listening.fd):
            self.stored = True
        self.sockets[role] = listening
        return listening

    def _bind_fresh(self, endpoint, path):
        runtime.claim_ipc_endpoint(endpoint)       # refuses a live socket, removes a stale one
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)                # 0600 until restrict_socket_file
        try:
            sock.bind(path)
            sock.listen(socket.SOMAXCONN)
        except OSError as exc:
            sock.close()
            raise runtime.StartupError(f"cannot bind {endpoint}: {exc.strerror or exc}") \
                from None
        finally:
            os.umask(old_umask)
        return sock.detach()

    def _drop(self, name, fds, why):
        for fd in fds:
            log.info("closing the stored socket %r: %s", name, why)
            os.close(fd)
        if fds:
            self.notifier.remove_stored(name)

    def forget_unclaimed(self):
        """After every role is open: what the store offered that no role took (an old
        version's, or a role this config has no more) is closed and removed from it."""
        for name, fds in list(self.inherited.items()):
            self._drop(name, fds, "no endpoint of this daemon uses it")
        self.inherited = {}

    def close(self, unlink):
        """Close our descriptors. ``unlink``: also remove the socket files (when nothing
        keeps the sockets for a next run)."""
        for listening in self.sockets.values():
            listening.close()
            if unlink:
                runtime.remove_socket_file(listening.endpoint)
        self.sockets = {}


# -- the last moments of a daemon that restarts -------------------------------------------

ZAP_ENDPOINT = "inproc://zeromq.zap.01"    # where libzmq asks for its ZAP verdicts
ZAP_DOMAIN = b"backend-mgmt"


class HandshakeGate:
    """Decides when a new connection may complete its ZMTP handshake, through libzmq's ZAP
    hook (any client, NULL mechanism: only the timing is decided, nobody is refused).

    A ZeroMQ client sends its request only once the handshake is complete. So a daemon
    about to exit closes the gate: connections that arrive from then on never carry a
    request to it, and when it exits their clients reconnect to the socket systemd keeps
    and send it to the next daemon. The requests on connections already open are read and
    answered before it exits (stop_when_quiet).

    While the gate is open nothing answers ZAP at all: the listening sockets carry a ZAP
    domain (``guard``), and libzmq 4.3 skips ZAP when no handler is bound, so a handshake
    costs nothing extra. ``close()`` binds the handler and never answers it: from then on
    handshakes wait.

    A connection that completed its handshake just before the gate closed still owes its
    request. The guard's socket monitor tells the gate of each connection accepted and lost
    (``accepted``/``lost``, on the side thread, by the connection's descriptor), and each
    message names the descriptor it came on (ZMQ_SRCFD): until its first message arrives
    (``seen``) a connection is ``unheard``. A client's request follows its handshake within
    moments, so one let in less than UNHEARD_AGE ago and unheard still owes one; older ones
    are taken for idle clients that keep a connection open and forgotten."""

    def __init__(self, clock, context):
        self.clock = clock
        self.context = context
        self.socket = None                          # the ZAP handler, bound by close()
        # Descriptor -> when accepted, oldest first; written on the side thread (accepted,
        # lost) and on the loop (seen, unheard): the lock keeps it whole.
        self._unheard = collections.OrderedDict()
        # Descriptors whose first message the loop read before the side thread had heard
        # of the connection, so that its late "accepted" does not count it as owing one.
        self._heard_first = set()
        self._counting = True        # False once closed: later connections never speak
        self._closed_at = None
        self._lock = threading.Lock()

    @staticmethod
    def guard(zmq_socket):
        """Make ``zmq_socket``'s new connections ask the gate (before it binds)."""
        zmq_socket.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)

    @property
    def open(self):
        return self.socket is None

    def accepted(self, fd):
        """The guard's monitor (side thread): a connection was accepted on ``fd``."""
        with self._lock:
            if fd in self._heard_first:
                self._heard_first.discard(fd)
                return
            if not self._counting:
                return        # accepted after the gate closed: held, it never sends
            self._unheard[fd] = self.clock()
            self._forget_idle()

    def lost(self, fd):
        """The guard's monitor (side thread): the connection on ``fd`` is gone."""
        with self._lock:
            self._unheard.pop(fd, None)
            self._heard_first.discard(fd)

    def seen(self, frame):
        """A message (its zmq.Frame) arrived: its connection owes nothing any more."""
        try:
            fd = frame.get(SRCFD)
        except (zmq.ZMQError, AttributeError):
            return
        with self._lock:
            if self._unheard.pop(fd, None) is None and len(self._heard_first) < HEARD_FIRST_MAX:
                # Read before the side thread saw it accepted (or an older connection):
                # remembered until the connection is lost, at most HEARD_FIRST_MAX of them.
                self._heard_first.add(fd)

    def unheard(self):
        """Connections let in within UNHEARD_AGE that have sent nothing yet; none once the
        gate has been closed for HELD_GRACE: by then every connection that completed its
        handshake before the close has spoken, and the silent rest are held by the gate
        (accepted just before it closed, their handshake after) or idle."""
        with self._lock:
            if self._closed_at is not None and self.clock() - self._closed_at >= HELD_GRACE:
                return 0
            self._forget_idle()
            return len(self._unheard)

    def _forget_idle(self):
        oldest = self.clock() - UNHEARD_AGE
        while self._unheard and next(iter(self._unheard.values())) < oldest:
            self._unheard.popitem(last=False)

    def close(self, settle=lambda: None):
        """No new connection completes its handshake from now on. ``settle()`` returns once
        the connections accepted until now have been told to the gate (the side thread's
        barrier): those still count; the ones accepted later are held and never will."""
        if self.socket is None:
            sock = self.context.socket(zmq.ROUTER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, 0)     # never make libzmq wait to ask
            sock.bind(ZAP_ENDPOINT)
            self.socket = sock                 # read by nobody: the handshakes wait
            settle()
            with self._lock:
                self._counting = False
                self._closed_at = self.clock()

    def shut(self):
        if self.socket is not None:
            self.socket.close(linger=0)
            self.socket = None


SRCFD = int(zmq.SRCFD)      # a message's property: the descriptor of its connection
HEARD_FIRST_MAX = 65536     # bounds _heard_first whatever the monitor does
UNHEARD_AGE = 0.5  # s: a connection let in longer ago that has sent nothing is an idle one
# s after the gate closed: a client sends its request as its handshake completes (a DEALER
# queues it before), so one whose handshake completed before the close has spoken by then.
HELD_GRACE = 0.15
QUIET = 0.02       # s without a request: the clients still connected have sent what they had
LONGEST = 1.0      # s at most, though requests keep coming on connections already open
CHECK_EVERY = 0.01


def stop_when_quiet(loop, activity, done, unheard=lambda: 0, quiet=QUIET, longest=LONGEST):
    """Call ``done()`` once no connection let in owes its request (``unheard()``, see
    HandshakeGate) and ``activity()`` (a count of requests read) has not changed for
    ``quiet`` seconds; ``longest`` seconds from now at the latest. Meanwhile the loop keeps
    answering."""
    started = loop.clock()
    state = {"count": activity(), "since": started}

    def check():
        now = loop.clock()
        count = activity()
        if count != state["count"]:
            state["count"], state["since"] = count, now
        if (now - state["since"] >= quiet and not unheard()) or now - started >= longest:
            done()
        else:
            loop.call_later(CHECK_EVERY, check)
    loop.call_later(CHECK_EVERY, check)
