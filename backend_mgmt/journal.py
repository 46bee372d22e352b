"""Log records to the journal's native protocol, each line about a model carrying its name.

Lines written to stderr reach the journal as a stream, which cannot carry fields. Sent as a
datagram to journald's socket instead (sd_journal_send(3), systemd.journal-fields(7)), a
record carries ``MESSAGE``, ``PRIORITY`` (so ``journalctl -p`` keeps working),
``SYSLOG_IDENTIFIER=backend-mgmt`` and, when it is about a model,
``BACKEND_MGMT_MODEL=<name>``: ``journalctl -u backend-mgmt BACKEND_MGMT_MODEL=demo`` selects
them. journald attributes a datagram to the sender's unit by its control group, so ``-u``
finds them as before.

A record is about a model when it was logged with ``extra={"model": name}``, or, by the
daemon's convention, when its message starts with ``model %s:`` (the daemon's lines about a
model) or ``[%s] `` (a child-process backend's output line) and the first argument is the name.

A datagram that cannot be sent at once (journald's queue full, a record too large) goes to
the stream handler instead, so nothing is lost and the loop does not wait on journald.
"""

import logging
import os
import socket
import struct

MODEL_FIELD = "BACKEND_MGMT_MODEL"
IDENTIFIER = "backend-mgmt"
SOCKET = "/run/systemd/journal/socket"

# syslog priorities, as journalctl -p knows them (also for logsetup's stream lines).
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
             logging.DEBUG: 7}
_MODEL_PREFIXES = ("model %s:", "[%s] ")


def priority(levelno):
    return _PRIORITY.get(levelno, 6 if levelno > logging.DEBUG else 7)


def model_of(record):
    """The name of the model ``record`` is about, or None."""
    model = getattr(record, "model", None)
    if model is not None:
        return str(model)
    if isinstance(record.msg, str) and record.msg.startswith(_MODEL_PREFIXES) and \
            isinstance(record.args, tuple) and record.args:
        return str(record.args[0])
    return None


def encode(fields):
    """The native protocol's datagram for ``fields`` (name -> str): ``NAME=value`` lines, and
    for a value with a newline the binary form, ``NAME``, a little-endian 64-bit length, the
    value."""
    parts = []
    for name, value in fields.items():
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            parts.append(name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n")
        else:
            parts.append(name.encode() + b"=" + data + b"\n")
    return b"".join(parts)


def decode(datagram):
    """The fields of a native-protocol datagram (for tests and tools)."""
    fields, position = {}, 0
    while position < len(datagram):
        newline = datagram.index(b"\n", position)
        line = datagram[position:newline]
        if b"=" in line:
            name, value = line.split(b"=", 1)
            position = newline + 1
        else:
            name = line
            (length,) = struct.unpack("<Q", datagram[newline + 1:newline + 9])
            value = datagram[newline + 9:newline + 9 + length]
            position = newline + 9 + length + 1
        fields[name.decode()] = value.decode("utf-8", "replace")
    return fields


class JournalHandler(logging.Handler):
    """Sends each record to journald as one entry with fields; ``fallback`` (a handler) takes
    what cannot be sent."""

    def __init__(self, fallback, address=SOCKET, identifier=IDENTIFIER):
        super().__init__()
        self.fallback = fallback
        self.address = address
        self.identifier = identifier
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def emit(self, record):
        try:
            fields = {"MESSAGE": self.format(record), "PRIORITY": str(priority(record.levelno)),
                      "SYSLOG_IDENTIFIER": self.identifier,
                      "CODE_FILE": record.pathname or "", "CODE_LINE": str(record.lineno),
                      "CODE_FUNC": record.funcName or ""}
            model = model_of(record)
            if model is not None:
                fields[MODEL_FIELD] = model
            self.socket.sendto(encode(fields), socket.MSG_DONTWAIT, self.address)
        except OSError:
            # Queue full (EAGAIN), too large (EMSGSIZE), journald gone: the stream instead.
            self.fallback.handle(record)
        except Exception:
            self.handleError(record)

    def close(self):
        self.socket.close()
        self.fallback.close()
        super().close()


def native_handler(fallback, address=SOCKET):
    """A JournalHandler in front of ``fallback`` where journald's socket is there, else
    None. It formats ``name: message``; time and unit are the journal's own fields."""
    if not os.path.exists(address):
        return None
    handler = JournalHandler(fallback, address)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    return handler
