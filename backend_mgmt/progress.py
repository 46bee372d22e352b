"""Backends report loading progress to the daemon the way services report to systemd.

Each backend gets ``NOTIFY_SOCKET`` (and ``BACKEND_MGMT_NOTIFY_SOCKET``) pointing at a datagram
socket of the daemon's, in the abstract namespace so that a backend running as another user
reaches it. A backend still loading may send, in sd_notify(3) form:

    EXTEND_TIMEOUT_USEC=600000000     the startup deadline becomes at least now + 600 s
    STATUS=loading shard 3/8          shown as the model's "progress" in status

Any sd_notify library or ``systemd-notify`` works. The sender is identified by its process
(SO_PASSCRED): a datagram counts only if it comes from the backend's process or one of its
descendants (child launcher) or from inside its unit (systemd launcher); READY=1 and anything
else is ignored, since readiness is the handshake.
"""

import logging
import os
import socket
import struct

log = logging.getLogger(__name__)

_UCRED = struct.Struct("3i")   # pid, uid, gid
MAX_DATAGRAM = 4096


def parse(datagram):
    """sd_notify assignments as a dict (later ones win); malformed lines are skipped."""
    fields = {}
    for line in datagram.decode("utf-8", "replace").split("\n"):
        key, sep, value = line.partition("=")
        if sep and key:
            fields[key] = value
    return fields


class ProgressListener:
    """Receives datagrams; calls ``on_message(pid, fields)`` for each."""

    def __init__(self, loop, name, on_message):
        self.loop = loop
        self.on_message = on_message
        self.address = "@" + name                       # as NOTIFY_SOCKET spells it
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC |
                                     socket.SOCK_NONBLOCK)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._socket.bind("\0" + name)
        loop.add_reader(self._socket.fileno(), self._on_readable)

    def _on_readable(self):
        for _ in range(64):
            try:
                data, ancillary, _, _ = self._socket.recvmsg(
                    MAX_DATAGRAM, socket.CMSG_SPACE(_UCRED.size))
            except (BlockingIOError, InterruptedError):
                return
            pid = None
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = _UCRED.unpack(payload[:_UCRED.size])[0]
            if pid:
                self.on_message(pid, parse(data))

    def close(self):
        self.loop.remove_reader(self._socket.fileno())
        self._socket.close()


def process_in_unit(pid, unit):
    """True if ``pid`` runs in the control group of ``unit``."""
    try:
        with open(f"/proc/{pid}/cgroup") as stream:
            return any(line.rstrip("\n").endswith("/" + unit) for line in stream)
    except OSError:
        return False


def process_descends_from(pid, ancestor):
    """True if ``pid`` is ``ancestor`` or one of its descendants."""
    seen = 0
    while pid and pid > 1 and seen < 64:
        if pid == ancestor:
            return True
        try:
            with open(f"/proc/{pid}/stat") as stream:
                # the field after the command (which may hold spaces and parentheses)
                pid = int(stream.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
        seen += 1
    return False


def listener_name(runtime_dir):
    """An abstract socket name unique to this runtime dir."""
    from .names import short_digest
    return f"backend-mgmt/{short_digest(os.path.abspath(runtime_dir))}/notify"
