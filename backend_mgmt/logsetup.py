"""Logging to the journal (with priorities) or to a terminal (with timestamps)."""

import logging
import os
import re
import sys

from . import journal

DEFAULT_FORMAT = "%(asctime)s [%(levelname)8s] %(name)s: %(message)s"


# What could end a line or change how one is shown: C0 and C1 controls (\n, \r, \0 (a line
# end for the journal), ESC...), DEL, and the Unicode line and paragraph separators
# (str.splitlines() and some viewers break lines there). Tab stays.
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")


def escape_controls(text):
    """``text`` on one line: every control character as a visible escape (\\x1b, \\u2028)."""
    return _CONTROL.sub(_escape, text)


def _escape(match):
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _escape_lines(text):
    return "\n".join(escape_controls(line) for line in text.split("\n"))


class SafeFormatter(logging.Formatter):
    """One log record, one line: control characters in the message (a model name a client
    sent, a backend's output line) are escaped, so nothing can forge a line of the daemon's
    own. Only a traceback spans several lines, split on \\n alone."""

    def formatMessage(self, record):
        message = record.message
        record.message = escape_controls(message)
        try:
            return super().formatMessage(record)
        finally:
            record.message = message

    def formatException(self, exc_info):
        return _escape_lines(super().formatException(exc_info))

    def formatStack(self, stack_info):
        return _escape_lines(super().formatStack(stack_info))


class JournalFormatter(SafeFormatter):
    """'<N>message' lines; the journal adds time and unit, so they are left out."""

    def format(self, record):
        priority = journal.priority(record.levelno)   # as sd-daemon(3) prefixes
        text = super().format(record)
        return "\n".join(f"<{priority}>{line}" for line in text.split("\n"))


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


def configure(level="INFO", fmt=None, date_format=None, stream=None,
              journal_socket=journal.SOCKET):
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    if stream_is_journal(stream):
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
        # Natively where journald's socket is there, so lines carry fields (journal.py),
        # escaped as on the stream: one entry is one line of the daemon's.
        native = journal.native_handler(handler, journal_socket)
        if native is not None:
            native.setFormatter(SafeFormatter("%(name)s: %(message)s"))
            handler = native
    else:
        handler.setFormatter(SafeFormatter(fmt or DEFAULT_FORMAT, date_format))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, str(level).upper(), logging.INFO))
