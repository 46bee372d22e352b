"""Backends report loading progress to the daemon the way services report to systemd.

Each backend gets ``NOTIFY_SOCKET`` (and ``BACKEND_MGMT_NOTIFY_SOCKET``) pointing at a datagram
socket of the daemon's, in the abstract namespace so that a backend running as another user
reaches it. A backend still loading may send, in sd_notify(3) form:

    EXTEND_TIMEOUT_USEC=600000000     the startup deadline becomes at least now + 600 s
    STATUS=loading shard 3/8          shown as the model's "progress" in status

Any sd_notify library or ``systemd-notify`` works. The sender is identified by its process
(SO_PASSCRED): a datagram counts only if it comes from the backend's process or one of its
descendants (child launcher) or from inside its unit's control group exactly as systemd reports
it (systemd launcher; a user's own ``systemd-run --user`` unit of the same name lives in
another control group and does not count); READY=1 and anything else is ignored, since
readiness is the handshake.

An abstract name can be bound by anyone: if someone else holds it when the daemon starts, the
daemon refuses to start (runtime.StartupError) rather than let a stranger hear its backends.
"""

import errno
import logging
import os
import socket
import struct

from .runtime import StartupError

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
        try:
            self._socket.bind("\0" + name)
        except OSError as exc:
            self._socket.close()
            if exc.errno == errno.EADDRINUSE:
                raise StartupError(
                    f"the progress socket address {self.address} is already bound by another "
                    f"process (another backend-mgmt with the same runtime dir, or someone "
                    f"squatting it: see ss -xlp | grep '{name}'); refusing to start") from None
            raise StartupError(f"cannot bind the progress socket {self.address}: "
                               f"{exc.strerror}") from None
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


def process_in_cgroup(pid, control_group):
    """True if ``pid`` runs in ``control_group`` (a path such as systemd's ControlGroup
    property, ``/system.slice/x.service``) or in a group below it. The whole path must match:
    a user's own unit with the same name is under ``/user.slice/...`` and does not."""
    if not control_group or not control_group.startswith("/") or control_group == "/":
        return False
    try:
        with open(f"/proc/{pid}/cgroup") as stream:
            lines = stream.read().splitlines()
    except OSError:
        return False
    below = control_group.rstrip("/") + "/"
    for line in lines:
        fields = line.split(":", 2)
        # systemd's own hierarchy: the unified one (v2, "0::"), or name=systemd on a
        # legacy/hybrid host.
        if len(fields) == 3 and fields[1] in ("", "name=systemd"):
            if fields[2] == control_group or fields[2].startswith(below):
                return True
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
