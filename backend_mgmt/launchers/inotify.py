"""A few lines of inotify through ctypes: which files were written into a directory."""

import ctypes
import os
import struct

IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
_EVENT = struct.Struct("iIII")   # wd, mask, cookie, len; then len bytes of name

_libc = ctypes.CDLL(None, use_errno=True)


class DirectoryWatch:
    """``fd`` becomes readable when a file is written (closed) or moved into ``path``."""

    def __init__(self, path):
        self.fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        wd = _libc.inotify_add_watch(self.fd, os.fsencode(path), IN_CLOSE_WRITE | IN_MOVED_TO)
        if wd < 0:
            errno = ctypes.get_errno()
            os.close(self.fd)
            raise OSError(errno, f"inotify_add_watch {path} failed")

    def names(self):
        """The names of the files written since the last call."""
        found = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return found
            offset = 0
            while offset + _EVENT.size <= len(data):
                _, _, _, length = _EVENT.unpack_from(data, offset)
                name = data[offset + _EVENT.size: offset + _EVENT.size + length]
                found.append(os.fsdecode(name.rstrip(b"\0")))
                offset += _EVENT.size + length

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
