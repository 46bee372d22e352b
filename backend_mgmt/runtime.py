"""The runtime directory, the instance lock and the ipc socket files in it."""

import errno
import fcntl
import grp
import logging
import os
import socket

from . import config as config_module

log = logging.getLogger(__name__)

LOCK_NAME = "backend-mgmt.pid"


class StartupError(Exception):
    """Cannot set up the runtime dir or the endpoints; the message says why and what to do."""


def runtime_dir(cfg, environ=os.environ, euid=None):
    """$RUNTIME_DIRECTORY (systemd), else runtime_dir from config, else the default.

    A non-root user running in the foreground without a configured runtime_dir gets
    $XDG_RUNTIME_DIR/backend-mgmt (or /tmp/backend-mgmt-UID) instead of /run/backend-mgmt.
    """
    euid = os.geteuid() if euid is None else euid
    from_systemd = environ.get("RUNTIME_DIRECTORY")
    if from_systemd:
        return from_systemd.split(":")[0]
    if cfg is not None and cfg.runtime_dir:
        return cfg.runtime_dir
    if euid != 0:
        base = environ.get("XDG_RUNTIME_DIR")
        return os.path.join(base, "backend-mgmt") if base else f"/tmp/backend-mgmt-{euid}"
    return config_module.DEFAULT_RUNTIME_DIR


def default_endpoints(directory):
    return (f"ipc://{os.path.join(directory, 'control.sock')}",
            f"ipc://{os.path.join(directory, 'handshake.sock')}")


def default_events_endpoint(directory):
    return f"ipc://{os.path.join(directory, 'events.sock')}"


def ipc_path(endpoint):
    return endpoint[len("ipc://"):] if endpoint.startswith("ipc://") else None


def group_id(name):
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def prepare_directory(path, group_name):
    """Create the runtime dir (0750, group ``group_name`` if that group exists and we may)."""
    try:
        os.makedirs(path, mode=0o750, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"cannot create runtime dir {path}: {exc.strerror}") from None
    gid = group_id(group_name)
    if os.geteuid() == 0 and gid is not None:
        try:
            os.chown(path, -1, gid)
            os.chmod(path, 0o750)
        except OSError as exc:
            log.warning("cannot give %s to group %s: %s", path, group_name, exc.strerror)


class InstanceLock:
    """An flock on <runtime dir>/backend-mgmt.pid: one daemon per runtime dir."""

    def __init__(self, directory):
        self.path = os.path.join(directory, LOCK_NAME)
        self._fd = None

    def acquire(self):
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StartupError(
                f"another backend-mgmt (pid {other}) is already running with runtime dir "
                f"{os.path.dirname(self.path)}; stop it first (backend-mgmt stop-service)"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self):
        if self._fd is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None


def ipc_in_use(path):
    """True if something accepts connections on the unix socket at ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
        return True
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
            return False
        if exc.errno == errno.EACCES:
            return True   # someone else's socket: do not touch it
        raise
    finally:
        probe.close()


def claim_ipc_endpoint(endpoint):
    """Before binding: refuse a live socket (no hijack), remove a stale one."""
    path = ipc_path(endpoint)
    if path is None or not os.path.lexists(path):
        return
    if ipc_in_use(path):
        raise StartupError(f"{endpoint} is in use by another process (another backend-mgmt?); "
                            f"refusing to take it over")
    log.info("removing stale socket file %s from an earlier run", path)
    os.unlink(path)


def restrict_socket_file(endpoint, mode, group_name):
    path = ipc_path(endpoint)
    if path is None:
        return
    try:
        os.chmod(path, mode)
        gid = group_id(group_name)
        if os.geteuid() == 0 and gid is not None:
            os.chown(path, -1, gid)
    except OSError as exc:
        log.warning("cannot set access on %s: %s", path, exc.strerror)


def remove_socket_file(endpoint):
    path = ipc_path(endpoint)
    if path:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove %s: %s", path, exc.strerror)
