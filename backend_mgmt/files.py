"""Small files written safely, also as root in directories others may write to.

One way to write: ``write_atomic``. The data goes to a fresh temporary file in the same
directory (created with O_EXCL|O_NOFOLLOW by ``tempfile.mkstemp``, so a symlink or file someone
planted is never opened), is fsynced, and is renamed over the final name (``rename`` replaces a
symlink at the final name instead of following it). On any error the temporary is removed and
the final file is untouched.
"""

import os
import stat
import tempfile


class WriteError(OSError):
    """The file could not be written; str() is one line that names the path and why."""

    def __init__(self, number, message):
        super().__init__(message)
        self.errno = number


def write_atomic(path, data, mode=0o644):
    """Replace ``path`` with ``data`` (str or bytes) atomically; raises WriteError."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    directory = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise WriteError(exc.errno, f"cannot write {path}: {exc.strerror}") from None
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temporary, path)
    except OSError as exc:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise WriteError(exc.errno, f"cannot write {path}: {exc.strerror}") from None
    _sync_directory(directory)


def _sync_directory(directory):
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def open_nofollow(path, flags, mode=0o644):
    """os.open that refuses a symlink at ``path`` (ELOOP) and anything but a regular file."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path} is not a regular file")
    return fd
