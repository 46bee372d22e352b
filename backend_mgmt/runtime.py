"""The runtime directory, the instance lock and the ipc socket files in it."""

import errno
import fcntl
import grp
import logging
import os
import pwd
import socket
import stat

from . import config as config_module
from . import files

log = logging.getLogger(__name__)

LOCK_NAME = "backend-mgmt.pid"
# The runtime dir as root: operators (its group) may list it; anyone may pass through it to
# the sockets inside, each of which is 0660 and given to the group that may use it. Keep in
# step with RuntimeDirectoryMode= in the unit (systemd re-chowns the whole tree when the
# directory's mode has bits the unit's mode lacks).
DIRECTORY_MODE = 0o751


class StartupError(Exception):
    """Cannot set up the runtime dir or the endpoints; the message says why and what to do."""


def runtime_dir(cfg, environ=os.environ, euid=None):
    """$RUNTIME_DIRECTORY (systemd), else runtime_dir from config, else the default.

    A non-root user running in the foreground without a configured runtime_dir gets
    $XDG_RUNTIME_DIR/backend-mgmt, else ~/.cache/backend-mgmt (in the home directory from the
    password database): never a predictable name in a shared directory such as /tmp, which
    another user could create first.
    """
    euid = os.geteuid() if euid is None else euid
    from_systemd = environ.get("RUNTIME_DIRECTORY")
    if from_systemd:
        return from_systemd.split(":")[0]
    if cfg is not None and cfg.runtime_dir:
        return cfg.runtime_dir
    if euid != 0:
        base = environ.get("XDG_RUNTIME_DIR")
        if base:
            return os.path.join(base, "backend-mgmt")
        try:
            home = pwd.getpwuid(euid).pw_dir
        except KeyError:
            home = environ.get("HOME") or "/nonexistent"
        return os.path.join(home, ".cache", "backend-mgmt")
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


def check_trusted_directory(path, what="runtime dir"):
    """Raise StartupError unless ``path`` is a real directory (not a symlink) owned by us and
    writable by nobody else. Everything the daemon keeps there (sockets, lock, unit records)
    is only as safe as the directory."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise StartupError(f"cannot use {what} {path}: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise StartupError(f"{what} {path} is a symlink; refusing to use it (remove it, or set "
                           f"runtime_dir to a directory of your own)")
    if not stat.S_ISDIR(st.st_mode):
        raise StartupError(f"{what} {path} exists and is not a directory")
    if st.st_uid != os.geteuid():
        raise StartupError(f"{what} {path} belongs to uid {st.st_uid}, not to this daemon "
                           f"(uid {os.geteuid()}); refusing to trust it (someone else may have "
                           f"created it: remove it, or set runtime_dir)")
    if st.st_mode & 0o022:
        raise StartupError(f"{what} {path} is writable by group or others (mode "
                           f"{stat.S_IMODE(st.st_mode):04o}); refusing to trust it (chmod "
                           f"go-w it, or remove it)")


def prepare_directory(path, group_name):
    """Create the runtime dir, or check one that exists (check_trusted_directory); as root
    give it to the operators' group ``group_name`` (if that group exists) with DIRECTORY_MODE,
    what the unit's RuntimeDirectoryMode= says too."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o755, exist_ok=True)
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise StartupError(f"cannot create runtime dir {path}: {exc.strerror}") from None
    check_trusted_directory(path)
    gid = group_id(group_name)
    try:
        if os.geteuid() == 0:
            if gid is not None:
                os.chown(path, -1, gid, follow_symlinks=False)
            os.chmod(path, DIRECTORY_MODE)
        else:
            # Not root: only we use it (and the clients we run as ourselves).
            os.chmod(path, 0o700)
    except OSError as exc:
        log.warning("cannot set the owner or mode of %s: %s", path, exc.strerror)


class InstanceLock:
    """An flock on <runtime dir>/backend-mgmt.pid: one daemon per runtime dir.

    Opened without following symlinks. The lock belongs to a file, so a daemon that locked a
    file which is no longer the one at the path (its holder unlinked it on the way out while
    we waited) has won nothing: it checks that the path still names the inode it locked, and
    starts over if not. Otherwise two daemons could each hold "the" lock at once."""

    ATTEMPTS = 10

    def __init__(self, directory):
        self.path = os.path.join(directory, LOCK_NAME)
        self._fd = None

    def acquire(self):
        for _ in range(self.ATTEMPTS):
            if self._lock(self._open()):
                return
        raise StartupError(f"cannot lock {self.path}: it keeps being replaced")

    def _open(self):
        try:
            return files.open_nofollow(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StartupError(f"cannot open the lock file {self.path}: "
                               f"{exc.strerror or exc} (a symlink there is refused)") from None

    def _lock(self, fd):
        """Lock the file open at ``fd``; True when it is ours, False to try again."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StartupError(
                f"another backend-mgmt (pid {other}) is already running with runtime dir "
                f"{os.path.dirname(self.path)}; stop it first (backend-mgmt stop-service)"
            ) from None
        try:
            current = os.lstat(self.path)
        except FileNotFoundError:
            current = None
        locked = os.fstat(fd)
        if current is None or (current.st_dev, current.st_ino) != (locked.st_dev, locked.st_ino):
            os.close(fd)          # its holder removed it while we waited: not the lock any more
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def release(self):
        if self._fd is not None:
            try:
                os.unlink(self.path)     # while still holding the lock (see the class doc)
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
    """Give the socket file we just bound ``mode`` and (as root) group ``group_name``,
    through an O_PATH|O_NOFOLLOW descriptor: a symlink swapped in is never followed."""
    path = ipc_path(endpoint)
    if path is None:
        return
    try:
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        log.warning("cannot set access on %s: %s", path, exc.strerror)
        return
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            log.warning("cannot set access on %s: not a socket any more", path)
            return
        through = f"/proc/self/fd/{fd}"
        os.chmod(through, mode)
        gid = group_id(group_name)
        if os.geteuid() == 0 and gid is not None:
            os.chown(through, -1, gid)
    except OSError as exc:
        log.warning("cannot set access on %s: %s", path, exc.strerror)
    finally:
        os.close(fd)


def remove_socket_file(endpoint):
    path = ipc_path(endpoint)
    if path:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove %s: %s", path, exc.strerror)
