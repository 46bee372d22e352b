"""sd_notify against a real unix datagram socket, as systemd would listen on it."""

import array
import os
import signal
import socket
import time

import pytest

from backend_mgmt.notify import Notifier
from harness import wait_until


@pytest.fixture
def notify_socket(workdir):
    path = os.path.join(workdir, "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.05)
    yield path, sock
    sock.close()


class Received:
    """Everything that arrived on the notify socket, with arrival times."""

    def __init__(self, sock):
        self.sock = sock
        self.messages = []

    def drain(self, seconds=0.0):
        deadline = time.monotonic() + seconds
        while True:
            try:
                data = self.sock.recv(4096)
                self.messages.append((time.monotonic(), data.decode()))
            except socket.timeout:
                if time.monotonic() >= deadline:
                    return self.messages

    def texts(self):
        return [text for _, text in self.messages]

    def wait_for(self, needle, timeout):
        return wait_until(lambda: any(needle in t for t in (self.drain() and self.texts())),
                          timeout, 0, message=repr(needle))


def test_notifier_strips_environment_and_sends(notify_socket):
    path, sock = notify_socket
    environ = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "3000000",
               "WATCHDOG_PID": str(os.getpid())}
    notifier = Notifier.from_environment(environ)
    assert environ == {}                      # children will not inherit them
    assert notifier.watchdog_interval == 1.5
    notifier.ready("up")
    notifier.status("up")                     # unchanged: not sent again
    notifier.status("two ready")
    notifier.watchdog()
    notifier.stopping()
    received = Received(sock).drain(0.1)
    assert [t for _, t in received] == ["READY=1\nSTATUS=up", "STATUS=two ready", "WATCHDOG=1",
                                        "STOPPING=1"]
    notifier.close()


def test_watchdog_for_another_pid_is_ignored():
    notifier = Notifier.from_environment({"WATCHDOG_USEC": "100", "WATCHDOG_PID": "1"})
    assert notifier.watchdog_interval is None and not notifier.enabled


def test_abstract_namespace_address(workdir):
    name = f"backend-mgmt-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    try:
        Notifier.from_environment({"NOTIFY_SOCKET": "@" + name}).ready()
        assert sock.recv(100) == b"READY=1"
    finally:
        sock.close()


def test_daemon_ready_status_watchdog_and_stopping(daemon_factory, notify_socket):
    path, sock = notify_socket
    received = Received(sock)
    daemon = daemon_factory({"a": []}, env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"})
    received.wait_for("READY=1", 5)
    assert daemon.load("a")["success"]
    received.wait_for("STATUS=models: 1 ready", 5)
    # Pings every half of WATCHDOG_USEC (0.2 s): about 10 over 2 s.
    start = time.monotonic()
    received.drain(2.0)
    pings = [t for t, text in received.messages if text == "WATCHDOG=1" and t >= start]
    assert 7 <= len(pings) <= 13, len(pings)
    # A stuck loop stops the pings: freeze the daemon and none arrive.
    daemon.process.send_signal(signal.SIGSTOP)
    received.drain(0.1)                       # what was already sent
    frozen_from = len(received.messages)
    received.drain(0.8)
    assert "WATCHDOG=1" not in [text for _, text in received.messages[frozen_from:]]
    daemon.process.send_signal(signal.SIGCONT)
    received.wait_for("WATCHDOG=1", 2)
    assert daemon.terminate() == 0
    received.drain(0.1)
    assert any(text.startswith("STOPPING=1") for text in received.texts())
    # The listening sockets go to systemd's fd store before READY=1, which comes next.
    texts = received.texts()
    assert texts[:3] == [f"FDSTORE=1\nFDNAME={role}\nFDPOLL=0"
                         for role in ("control", "handshake", "events")], texts[:4]
    assert texts.index("READY=1\nSTATUS=no models loaded") == 3


def receive_with_fds(sock, max_fds=4):
    """(text, [fd, ...]) of one datagram, with the descriptors passed along."""
    fds = array.array("i")
    data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(max_fds * fds.itemsize))
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    return data.decode(), list(fds)


def test_store_fd_passes_the_very_socket(notify_socket, workdir):
    path, sock = notify_socket
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(os.path.join(workdir, "l.sock"))
    listening.listen(4)
    notifier = Notifier(path)
    try:
        assert notifier.store_fd("control", listening.fileno())
        text, fds = receive_with_fds(sock)
        assert text == "FDSTORE=1\nFDNAME=control\nFDPOLL=0"
        assert len(fds) == 1
        got = socket.socket(fileno=fds[0])
        try:
            # The same open socket, not a copy: same inode, and a client connecting to the
            # path is accepted through the descriptor that came over the notify socket.
            mine, theirs = os.fstat(listening.fileno()), os.fstat(got.fileno())
            assert (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.connect(os.path.join(workdir, "l.sock"))
            got.settimeout(2)
            accepted, _ = got.accept()
            accepted.close()
            client.close()
        finally:
            got.close()
        assert notifier.remove_stored("control")
        assert receive_with_fds(sock) == ("FDSTOREREMOVE=1\nFDNAME=control", [])
    finally:
        notifier.close()
        listening.close()


def test_store_fd_without_systemd_does_nothing():
    notifier = Notifier(None)
    assert notifier.store_fd("control", 0) is False
    assert notifier.remove_stored("control") is False
