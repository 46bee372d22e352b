"""Who sent a control request: the peer's user as the kernel reports it for unix sockets.

libzmq tells the file descriptor a message came in on (ZMQ_SRCFD); SO_PEERCRED on it gives
the connecting process's pid, uid and gid. Only for ipc:// peers; a tcp:// peer is known by
its address alone.
"""

import os
import pwd
import socket
import struct

import zmq

_UCRED = struct.Struct("3i")   # pid, uid, gid


def describe(frame):
    """'user alice (uid 1000, pid 4242)' for the sender of ``frame`` (a zmq.Frame), or a
    best effort ('a tcp peer at ...', 'an unknown peer')."""
    try:
        fd = frame.get(zmq.SRCFD)
        duplicate = os.dup(fd)
    except (zmq.ZMQError, OSError, AttributeError):
        return "an unknown peer"
    try:
        with socket.socket(fileno=duplicate) as sock:
            if sock.family != socket.AF_UNIX:
                return f"a peer at {frame.get('Peer-Address')}"
            pid, uid, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET,
                                                        socket.SO_PEERCRED, _UCRED.size))
    except (OSError, zmq.ZMQError):
        return "an unknown peer"
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = "?"
    return f"user {name} (uid {uid}, pid {pid})"
