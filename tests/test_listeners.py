"""Listening sockets from systemd's fd store: LISTEN_FDS taken with suspicion, each fd checked
before use, anything else closed, dropped from the store and bound fresh."""

import fcntl
import os
import socket
import time

import pytest
import zmq

from backend_mgmt import listeners, runtime

HIGH = 200          # test descriptors live here, far from what pytest itself has open


class FakeNotifier:
    enabled = True

    def __init__(self):
        self.calls = []

    def store_fd(self, name, fd):
        self.calls.append(("store", name, os.fstat(fd).st_ino))
        return True

    def remove_stored(self, name):
        self.calls.append(("remove", name))
        return True


def listening_at(path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(8)
    return sock


def place(sock_or_fd, number):
    """A duplicate of it at descriptor ``number`` (as systemd would pass it)."""
    fd = sock_or_fd if isinstance(sock_or_fd, int) else sock_or_fd.fileno()
    os.dup2(fd, number, inheritable=True)
    return number


def is_open(fd):
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


@pytest.fixture
def placed():
    numbers = []
    yield lambda sock, n: numbers.append(place(sock, n)) or n
    for number in numbers:
        if is_open(number):
            os.close(number)


def test_take_listen_fds_for_this_process(workdir, placed):
    with listening_at(os.path.join(workdir, "a.sock")) as a, \
            listening_at(os.path.join(workdir, "b.sock")) as b:
        placed(a, HIGH)
        placed(b, HIGH + 1)
        environ = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2",
                   "LISTEN_FDNAMES": "control:handshake", "OTHER": "x"}
        got = listeners.take_listen_fds(environ, start=HIGH)
        assert got == {"control": [HIGH], "handshake": [HIGH + 1]}
        assert environ == {"OTHER": "x"}            # children never see them
        assert fcntl.fcntl(HIGH, fcntl.F_GETFD) & fcntl.FD_CLOEXEC


@pytest.mark.parametrize("environ", [
    {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "control"},   # someone else's
    {"LISTEN_PID": "{pid}", "LISTEN_FDS": "one", "LISTEN_FDNAMES": "control"},
    {"LISTEN_PID": "{pid}", "LISTEN_FDS": "-1", "LISTEN_FDNAMES": "control"},
    {"LISTEN_PID": "{pid}", "LISTEN_FDS": "100000", "LISTEN_FDNAMES": "control"},
    {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "control"},                     # no LISTEN_PID
])
def test_take_listen_fds_refuses_what_is_not_for_us(environ, workdir, placed):
    with listening_at(os.path.join(workdir, "a.sock")) as a:
        placed(a, HIGH)
        environ = {k: v.replace("{pid}", str(os.getpid())) for k, v in environ.items()}
        assert listeners.take_listen_fds(environ, start=HIGH) == {}
        assert environ == {}
        assert is_open(HIGH)           # not ours to close


def test_missing_names_and_closed_descriptors(workdir, placed):
    with listening_at(os.path.join(workdir, "a.sock")) as a:
        placed(a, HIGH + 1)            # HIGH itself is not open
        environ = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2"}
        assert listeners.take_listen_fds(environ, start=HIGH) == {"unknown": [HIGH + 1]}


def test_why_unusable(workdir):
    path = os.path.join(workdir, "c.sock")
    with listening_at(path) as good:
        assert listeners.why_unusable(good.fileno(), path) is None
        assert "bound to" in listeners.why_unusable(good.fileno(), path + "x")
        os.unlink(path)
        assert "No such file" in listeners.why_unusable(good.fileno(), path)
    with open(os.path.join(workdir, "plain"), "w") as plain:
        assert listeners.why_unusable(plain.fileno(), path) == "not a socket"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as datagram:
        datagram.bind(path)
        assert "SOCK_DGRAM" in listeners.why_unusable(datagram.fileno(), path)
    os.unlink(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as idle:
        idle.bind(path)
        assert listeners.why_unusable(idle.fileno(), path) == "not listening"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen(1)
        assert "AF_INET" in listeners.why_unusable(tcp.fileno(), path)


def test_a_stored_socket_for_the_path_is_reused_and_kept(workdir, placed):
    path = os.path.join(workdir, "control.sock")
    with listening_at(path) as before:
        inode = os.fstat(before.fileno()).st_ino
        placed(before, HIGH)
    notifier = FakeNotifier()
    group = listeners.Listeners({"control": [HIGH]}, notifier)
    got = group.open("control", f"ipc://{path}", 0o660, "nosuchgroup")
    assert got.reused and got.fd == HIGH and os.fstat(got.fd).st_ino == inode
    assert notifier.calls == []                 # still in the store: nothing to send
    assert group.stored
    # libzmq accepts on it, and a client that connected before is answered.
    context = zmq.Context()
    try:
        client = context.socket(zmq.DEALER)
        client.setsockopt(zmq.LINGER, 0)
        client.connect(f"ipc://{path}")
        client.send(b"waited in the queue")
        router = context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        got.attach(router)
        assert router.poll(5000)
        assert router.recv_multipart()[1] == b"waited in the queue"
        router.close()
        client.close()
    finally:
        context.destroy(linger=0)
    group.close(unlink=False)
    assert os.path.exists(path) and not is_open(HIGH)


def test_a_stored_socket_for_another_path_is_dropped_and_replaced(workdir, placed):
    old_path = os.path.join(workdir, "old.sock")
    path = os.path.join(workdir, "control.sock")
    with listening_at(old_path) as old:
        placed(old, HIGH)
    with open(os.path.join(workdir, "plain"), "w") as plain:
        placed(plain.fileno(), HIGH + 1)
    notifier = FakeNotifier()
    group = listeners.Listeners({"control": [HIGH], "stale": [HIGH + 1]}, notifier)
    got = group.open("control", f"ipc://{path}", 0o660, "nosuchgroup")
    group.forget_unclaimed()
    assert not got.reused and got.fd != HIGH
    assert not is_open(HIGH) and not is_open(HIGH + 1)
    assert notifier.calls == [("remove", "control"),
                              ("store", "control", os.fstat(got.fd).st_ino),
                              ("remove", "stale")]
    assert listeners.why_unusable(got.fd, path) is None
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o660)
    group.close(unlink=True)
    assert not os.path.exists(path)


def test_a_live_socket_of_someone_else_is_not_taken_over(workdir):
    path = os.path.join(workdir, "control.sock")
    with listening_at(path):
        group = listeners.Listeners({}, FakeNotifier())
        with pytest.raises(runtime.StartupError):
            group.open("control", f"ipc://{path}", 0o660, "nosuchgroup")


def test_tcp_endpoints_drop_a_stored_socket(workdir, placed):
    with listening_at(os.path.join(workdir, "old.sock")) as old:
        placed(old, HIGH)
    notifier = FakeNotifier()
    group = listeners.Listeners({"control": [HIGH]}, notifier)
    assert group.open("control", "tcp://127.0.0.1:5555", 0o660, "g") is None
    assert notifier.calls == [("remove", "control")] and not is_open(HIGH)


# -- the last moments of a restarting daemon: the handshake gate and the quiet drain -------

def run_for(loop, seconds):
    loop.call_later(seconds, loop.stop)
    loop.run()


class Watched:
    """A listening ROUTER guarded as the daemon's are: ZAP domain set, the guard's monitor
    on the side thread telling the gate of each connection."""

    def __init__(self, workdir, name="h.sock"):
        from backend_mgmt.connguard import ConnectionGuard
        from backend_mgmt.loop import EventLoop
        from backend_mgmt.sidethread import SideThread
        self.endpoint = "ipc://" + os.path.join(workdir, name)
        self.loop, self.context = EventLoop(), zmq.Context()
        self.side = SideThread()
        self.guard = ConnectionGuard(self.loop, self.context, self.side)
        self.gate = listeners.HandshakeGate(self.loop.clock, self.context)
        self.router = self.context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        listeners.HandshakeGate.guard(self.router)
        self.router.bind(self.endpoint)
        self.guard.watch(self.router, self.endpoint, arrivals=self.gate)
        self.side.start()
        self.clients = []

    def client(self, payload=None):
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        if payload is not None:
            sock.send(payload)
        self.clients.append(sock)
        return sock

    def close(self):
        self.side.stop()
        self.guard.close()
        for sock in (*self.clients, self.router):
            sock.close(linger=0)
        self.gate.shut()
        self.context.destroy(linger=0)
        self.loop.close()


@pytest.fixture
def watched(workdir):
    made = Watched(workdir)
    yield made
    made.close()


def test_a_closed_gate_holds_new_connections_not_open_ones(watched):
    received = []
    watched.loop.add_reader(watched.router,
                            lambda: received.append(watched.router.recv_multipart()[1]))
    early = watched.client(b"before")
    run_for(watched.loop, 0.5)
    assert received == [b"before"]                  # an open gate lets everyone in
    watched.gate.close()
    watched.client(b"after the gate closed")
    run_for(watched.loop, 0.5)
    assert received == [b"before"]                  # its handshake waits...
    early.send(b"on an open connection")
    run_for(watched.loop, 0.5)
    assert received == [b"before", b"on an open connection"]   # ...others go on


def test_an_open_gate_costs_a_handshake_nothing(watched):
    """While open, no ZAP handler answers (none is bound): a request arrives although the
    loop never runs, as on a bare socket. (A gate that answered ZAP on the loop held every
    handshake until the loop came round: one more wake-up per connection.)"""
    watched.client(b"request")
    assert watched.router.poll(5000), "the request should arrive without the loop"
    assert watched.router.recv_multipart()[1] == b"request"


def test_the_guard_counts_connections_without_the_loop(watched):
    """Connections are counted on the side thread, the loop not woken for them."""
    for _ in range(3):
        watched.client()
    deadline = time.monotonic() + 5
    while watched.guard.connections < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert watched.guard.connections == 3
    watched.clients.pop().close(linger=0)
    deadline = time.monotonic() + 5
    while watched.guard.connections > 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert watched.guard.connections == 2


def test_stop_when_quiet_waits_for_a_pause_and_no_longer_than_the_limit():
    from backend_mgmt.loop import EventLoop
    loop = EventLoop()
    try:
        count = [0]

        def busy():                        # a request every 20 ms for 0.2 s
            count[0] += 1
            if count[0] < 10:
                loop.call_later(0.02, busy)
        busy()
        started = time.monotonic()
        listeners.stop_when_quiet(loop, lambda: count[0], loop.stop, quiet=0.05, longest=2)
        loop.run()
        assert 0.18 + 0.05 <= time.monotonic() - started < 0.6   # last one at 0.18 s
        # Requests that never stop: done at the limit.
        endless = []
        ticker = lambda: (endless.append(1), loop.call_later(0.01, ticker))  # noqa: E731
        ticker()
        started = time.monotonic()
        listeners.stop_when_quiet(loop, lambda: len(endless), loop.stop, quiet=0.05,
                                  longest=0.3)
        loop.run()
        assert 0.3 <= time.monotonic() - started < 0.5
    finally:
        loop.close()


def test_the_gate_knows_which_connections_still_owe_their_request(watched):
    router, gate = watched.router, watched.gate
    watched.loop.add_reader(router, lambda: gate.seen(router.recv_multipart(copy=False)[-1]))
    silent = watched.client()                  # connects, sends nothing (yet)
    watched.client(b"request")
    run_for(watched.loop, 0.3)
    assert gate.unheard() == 1                 # the silent one still owes it
    silent.send(b"late request")
    run_for(watched.loop, 0.2)
    assert gate.unheard() == 0
    watched.client()                           # an idle client is forgotten in time
    run_for(watched.loop, 0.2)
    assert gate.unheard() == 1
    run_for(watched.loop, listeners.UNHEARD_AGE)
    assert gate.unheard() == 0


def test_connections_held_by_a_closed_gate_owe_nothing(watched):
    """A restarting daemon waits for the connections that owe a request; one accepted after
    the gate closed is held and never sends one, so it must not keep the daemon waiting
    (clients that keep connecting would hold it to its 1 s limit)."""
    watched.client(b"request")
    deadline = time.monotonic() + 5
    while watched.guard.connections < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    watched.gate.close(settle=lambda: watched.side.call_and_wait(lambda: None, 1.0))
    assert watched.gate.unheard() == 1          # accepted before: its request is owed
    for _ in range(3):
        watched.client(b"held")
    while watched.guard.connections < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert watched.guard.connections == 4       # accepted, and told to the gate...
    assert watched.gate.unheard() == 1          # ...but not owing anything


class SentOn:
    """A message's frame as the gate reads it: only the descriptor it came on."""

    def __init__(self, fd):
        self.fd = fd

    def get(self, option):
        assert option == listeners.SRCFD
        return self.fd


def test_a_request_read_before_its_connection_was_counted_owes_nothing():
    """The loop may read a connection's first message before the side thread has handled
    its "accepted" event: it must not then count as owing one (the restart drain would wait
    for it in vain)."""
    now = [100.0]
    gate = listeners.HandshakeGate(lambda: now[0], context=None)
    gate.seen(SentOn(12))
    gate.accepted(12)
    assert gate.unheard() == 0
    gate.accepted(13)                          # and in the usual order
    assert gate.unheard() == 1
    gate.seen(SentOn(13))
    assert gate.unheard() == 0
    gate.lost(12)
    gate.accepted(12)                          # a new connection on the same descriptor
    assert gate.unheard() == 1
    gate.lost(12)                              # lost before it spoke
    assert gate.unheard() == 0


def test_stop_when_quiet_waits_for_connections_that_owe_a_request():
    from backend_mgmt.loop import EventLoop
    loop = EventLoop()
    try:
        owing = [1]
        loop.call_later(0.2, lambda: owing.clear())
        started = time.monotonic()
        listeners.stop_when_quiet(loop, lambda: 0, loop.stop, lambda: len(owing), quiet=0.02,
                                  longest=2)
        loop.run()
        assert 0.2 <= time.monotonic() - started < 0.5
    finally:
        loop.close()


def test_a_closed_gate_stops_waiting_for_silent_connections_soon():
    """A connection accepted just before the gate closed may have its handshake held: it
    never speaks. The restart drain waits HELD_GRACE for such ones, not UNHEARD_AGE (with
    clients connecting all the time there is nearly always one: every restart waited 0.5 s
    more)."""
    now = [100.0]
    context = zmq.Context()
    gate = listeners.HandshakeGate(lambda: now[0], context)
    try:
        gate.accepted(21)
        gate.close()
        assert gate.unheard() == 1
        now[0] += listeners.HELD_GRACE - 0.01
        assert gate.unheard() == 1              # one that completed its handshake: heard soon
        now[0] += 0.01
        assert listeners.HELD_GRACE < listeners.UNHEARD_AGE
        assert gate.unheard() == 0
    finally:
        gate.shut()
        context.destroy(linger=0)
