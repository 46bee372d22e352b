"""sd_notify: readiness, status, watchdog pings and stopping, sent to systemd.

A few lines of our own instead of a dependency: they also pass file descriptors (FDSTORE=1
with SCM_RIGHTS, for systemd's fd store; see listeners.py), which the ``sdnotify`` package
cannot. ``Notifier.from_environment()`` takes NOTIFY_SOCKET and the watchdog settings out of the
environment, so that backends started later do not inherit them and talk to systemd in our name.
"""

import array
import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, address=None, watchdog_usec=None):
        self.address = address
        self.watchdog_usec = watchdog_usec
        self._socket = None
        self._last_status = None
        if address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @classmethod
    def from_environment(cls, environ=os.environ):
        address = environ.pop("NOTIFY_SOCKET", None)
        usec = environ.pop("WATCHDOG_USEC", None)
        watchdog_pid = environ.pop("WATCHDOG_PID", None)
        watchdog_usec = None
        if usec and (watchdog_pid is None or watchdog_pid == str(os.getpid())):
            try:
                watchdog_usec = int(usec) or None
            except ValueError:
                log.warning("ignoring WATCHDOG_USEC=%r: not a number", usec)
        if address and address.startswith("@"):
            address = "\0" + address[1:]   # abstract namespace
        return cls(address, watchdog_usec)

    @property
    def enabled(self):
        return self._socket is not None

    @property
    def watchdog_interval(self):
        """Seconds between pings (half the timeout systemd gave us), or None."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None

    def send(self, *assignments, fds=()):
        """One datagram; ``fds`` go along as SCM_RIGHTS (systemd keeps duplicates). True
        when it was sent."""
        if self._socket is None:
            return False
        message = "\n".join(assignments).encode("utf-8", "replace")
        try:
            if fds:
                rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                self._socket.sendmsg([message], rights, 0, self.address)
            else:
                self._socket.sendto(message, self.address)
            return True
        except OSError as exc:
            # systemd gone or socket full: not fatal for serving clients.
            log.debug("sd_notify %r failed: %s", assignments, exc)
            return False

    def store_fd(self, name, fd):
        """Keep a duplicate of ``fd`` in systemd's fd store under ``name``: the next start of
        the service gets it in LISTEN_FDS/LISTEN_FDNAMES. Needs FileDescriptorStoreMax= in
        the unit (else systemd drops it). FDPOLL=0: never drop it on POLLHUP/POLLERR."""
        return self.send("FDSTORE=1", f"FDNAME={name}", "FDPOLL=0", fds=(fd,))

    def remove_stored(self, name):
        """Close every fd stored under ``name`` in systemd's fd store."""
        return self.send("FDSTOREREMOVE=1", f"FDNAME={name}")

    def ready(self, status=None):
        self.send("READY=1", *((f"STATUS={status}",) if status else ()))
        self._last_status = status

    def status(self, text):
        if text != self._last_status:
            self._last_status = text
            self.send(f"STATUS={text}")

    def watchdog(self):
        self.send("WATCHDOG=1")

    def reloading(self, monotonic_usec):
        self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec}")

    def stopping(self, status=None):
        self.send("STOPPING=1", *((f"STATUS={status}",) if status else ()))

    def close(self):
        if self._socket is not None:
            self._socket.close()
            self._socket = None
