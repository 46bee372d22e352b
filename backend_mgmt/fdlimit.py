"""The daemon's file descriptor limit.

Every client connection costs the daemon a file descriptor, and libzmq 4.3.4 aborts the whole
process when accept() on a listening socket fails with EMFILE. So the daemon raises its soft
RLIMIT_NOFILE to the hard limit at start (as systemd advises for programs that need many
files; the unit sets the hard limit), and gives backends it starts as child processes the soft
limit it was started with, since programs that use select() break above 1024.
"""

import logging
import os
import resource

log = logging.getLogger(__name__)

_inherited = None       # (soft, hard) the daemon was started with


def raise_to_hard():
    """Raise the soft limit to the hard one; log it. Returns (old soft, new soft)."""
    global _inherited
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if _inherited is None:
        _inherited = (soft, hard)
    if soft == hard:
        log.info("file descriptor limit: %s", _describe(hard))
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the file descriptor limit from %s to %s: %s",
                    _describe(soft), _describe(hard), exc)
        return soft, soft
    log.info("file descriptor limit raised from %s to %s (the hard limit)", _describe(soft),
             _describe(hard))
    return soft, hard


def restore_inherited():
    """In a child between fork and exec: the soft limit the daemon was started with."""
    if _inherited is not None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (_inherited[0], resource.getrlimit(
            resource.RLIMIT_NOFILE)[1]))


def shortage_hint():
    """'' or, when the daemon is (nearly) out of file descriptors, a note for a failure
    message: the probe of a backend cannot connect then, and only times out."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError as exc:            # EMFILE itself
        return f"; the daemon is out of file descriptors ({exc.strerror})"
    if soft != resource.RLIM_INFINITY and in_use >= soft - 8:
        return (f"; the daemon is at its file descriptor limit ({in_use} of {soft} open), "
                f"which may be why")
    return ""


def _describe(limit):
    return "unlimited" if limit == resource.RLIM_INFINITY else str(limit)
