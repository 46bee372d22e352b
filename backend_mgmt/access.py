"""Backend endpoints the clients' group can reach, and nobody else.

Each model's backend gets its own directory, ``<runtime dir>/models/<model>/``, prepared by the
daemon before every start: owned by the user the backend runs as (``resources.user``, else the
daemon's), so that the backend can create its socket there whatever its user; group the
clients' group; mode 0750. The backend binds ``ipc://<that dir>/backend.sock``. Before the
endpoint is handed out (the model becomes ready) the daemon looks at the socket file without
following symlinks: it must be a socket, with one link, owned by the backend's user (or root);
the daemon then gives it the clients' group and mode 0660 itself, so the backend's umask does
not matter. Anything else and the model fails to load with a message that says why.

Every operation on a path a backend user can write to goes through a file descriptor opened
with O_NOFOLLOW (O_PATH for the socket, whose mode and group are then set through
/proc/self/fd), so a symlink planted there never redirects a chown or chmod done as root.
"""

import errno
import grp
import os
import pwd
import stat
from dataclasses import dataclass

MODELS_SUBDIR = "models"
SOCKET_NAME = "backend.sock"
MODEL_DIR_MODE = 0o750
SOCKET_MODE = 0o660


class AccessError(Exception):
    """A model's directory or socket is not what it must be; the message says why."""


@dataclass(frozen=True)
class Owner:
    """Who a backend runs as (uid, gid, supplementary groups), and the clients' group id."""
    uid: int
    gid: int
    groups: tuple = ()
    client_gid: int | None = None
    name: str | None = None


def backend_owner(user, client_group, euid=None):
    """The Owner for a backend with ``resources.user`` = ``user`` (None: the daemon's own)."""
    euid = os.geteuid() if euid is None else euid
    client_gid = group_id(client_group)
    if not user:
        return Owner(uid=euid, gid=os.getegid(), client_gid=client_gid)
    try:
        entry = pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
    except KeyError:
        raise AccessError(f"resources.user: no such user {user!r}") from None
    groups = tuple(g for g in os.getgrouplist(entry.pw_name, entry.pw_gid) if g != entry.pw_gid)
    return Owner(uid=entry.pw_uid, gid=entry.pw_gid, groups=groups, client_gid=client_gid,
                 name=entry.pw_name)


def group_id(name):
    try:
        return grp.getgrnam(name).gr_gid if name else None
    except KeyError:
        return None


def model_directory(runtime_dir, slug):
    return os.path.join(runtime_dir, MODELS_SUBDIR, slug)


def prepare_model_directory(path, owner):
    """Create or fix ``path`` (a model's directory): a real directory, owned by the backend's
    user, group the clients' group (as root), mode 0750. Its parent is ours (0755)."""
    parent = os.path.dirname(path)
    _make_directory(parent, 0o755)
    _check_ours(parent)
    _make_directory(path, MODEL_DIR_MODE)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise AccessError(f"{path} is not a directory (a symlink?); refusing to use "
                              f"it") from None
        raise AccessError(f"cannot open {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if st.st_uid not in (0, os.geteuid(), owner.uid):
            raise AccessError(f"{path} belongs to uid {st.st_uid}, neither this daemon nor "
                              f"the backend's user; refusing to use it")
        if os.geteuid() == 0:
            gid = owner.client_gid if owner.client_gid is not None else owner.gid
            os.fchown(fd, owner.uid, gid)
        os.fchmod(fd, MODEL_DIR_MODE)
    except OSError as exc:
        raise AccessError(f"cannot set the owner or mode of {path}: {exc.strerror}") from None
    finally:
        os.close(fd)


def _make_directory(path, mode):
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        pass
    except OSError as exc:
        raise AccessError(f"cannot create {path}: {exc.strerror}") from None


def _check_ours(path):
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise AccessError(f"{path} is not a directory of this daemon's that only it may write "
                          f"to; refusing to use it")


def secure_socket(path, owner):
    """Check the backend's socket file at ``path`` and give it to the clients' group, mode
    0660; raises AccessError (the endpoint must not be handed out)."""
    try:
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise AccessError(f"cannot check the backend's socket {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISSOCK(st.st_mode):
            raise AccessError(f"{path} is not a socket (a symlink or another file); refusing "
                              f"to hand it out")
        if st.st_nlink != 1:
            raise AccessError(f"{path} has {st.st_nlink} links; refusing to hand it out")
        if st.st_uid not in (0, owner.uid):
            raise AccessError(f"{path} belongs to uid {st.st_uid}, not to the backend's user "
                              f"(uid {owner.uid}); refusing to hand it out")
        # fchmod/fchown do not work on an O_PATH descriptor; its /proc link does, and names
        # this very inode whatever happens to the path meanwhile.
        through = f"/proc/self/fd/{fd}"
        if os.geteuid() == 0 and owner.client_gid is not None:
            os.chown(through, -1, owner.client_gid)
        os.chmod(through, SOCKET_MODE)
        st = os.fstat(fd)
        wanted_gid = owner.client_gid if os.geteuid() == 0 and owner.client_gid is not None \
            else st.st_gid
        if stat.S_IMODE(st.st_mode) != SOCKET_MODE or st.st_gid != wanted_gid:
            raise AccessError(f"{path} could not be given mode {SOCKET_MODE:04o} and the "
                              f"clients' group")
    except OSError as exc:
        raise AccessError(f"cannot set the group or mode of {path}: {exc.strerror}") from None
    finally:
        os.close(fd)


def remove_model_directory(socket_path):
    """Once its backend is gone: remove the model's directory and, if it was the last one,
    the models directory (rmdir only removes empty directories and never follows a symlink)."""
    if not socket_path:
        return
    directory = os.path.dirname(socket_path)
    parent = os.path.dirname(directory)
    if os.path.basename(parent) != MODELS_SUBDIR:
        return
    for path in (directory, parent):
        try:
            os.rmdir(path)
        except OSError:
            return
