"""Logging to the journal (with priorities) or to a terminal (with timestamps)."""

import logging
import os
import sys

from . import journal

DEFAULT_FORMAT = "%(asctime)s [%(levelname)8s] %(name)s: %(message)s"


class JournalFormatter(logging.Formatter):
    """'<N>message' lines; the journal adds time and unit, so they are left out."""

    def format(self, record):
        priority = journal.priority(record.levelno)   # as sd-daemon(3) prefixes
        text = super().format(record)
        return "\n".join(f"<{priority}>{line}" for line in text.splitlines() or [""])


def stream_is_journal(stream, environ=os.environ):
    """True if ``stream`` is connected to the journal (systemd sets JOURNAL_STREAM)."""
    value = environ.get("JOURNAL_STREAM")
    if not value:
        return False
    try:
        device, inode = (int(part) for part in value.split(":"))
        info = os.fstat(stream.fileno())
    except (ValueError, OSError):
        return False
    return (info.st_dev, info.st_ino) == (device, inode)


def configure(level="INFO", fmt=None, date_format=None, stream=None):
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    if stream_is_journal(stream):
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
        # Natively where journald's socket is there, so lines carry fields (journal.py).
        handler = journal.native_handler(handler) or handler
    else:
        handler.setFormatter(logging.Formatter(fmt or DEFAULT_FORMAT, date_format))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, str(level).upper(), logging.INFO))
