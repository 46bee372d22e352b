"""The files that tie backend units to the daemon, written and read here only.

Two files per unit run, in ``<runtime dir>/units/``:

- ``<unit>.json``, the *unit record*, written by the daemon when it starts the unit: which
  model it runs, on which endpoint, since when, the run id, and a digest of the model's
  definition; once the backend has answered its handshake, since when and with which
  protocols. A later daemon adopts the unit by it, and serves a backend that was ready at
  once (confirming it with a handshake in the background).
- ``<unit>.<run>.exit``, the *exit record*, written by the unit's ExecStopPost= helper
  (``unit_exit.py``) once systemd has stopped every process of the unit: how it ended and
  the systemd invocation it belonged to. The run id is chosen by the daemon for each start,
  so a late record of an earlier run of the same unit name can never be taken for the
  current run's.

Units started by an older daemon have no run id; their exit record is ``<unit>.exit``.

Both files come from the filesystem and are checked field by field before use: a record
that does not hold up is reported and ignored, never trusted.
"""

import json
import math
import os
import re
import signal
import time
from dataclasses import asdict, dataclass, replace

from ..files import write_atomic
from .base import ExitInfo, Running

RECORD_SUFFIX = ".json"
EXIT_SUFFIX = ".exit"
UNIT_NAME = re.compile(r"backend-mgmt-[A-Za-z0-9_.-]{1,120}\.service")
RUN_ID = re.compile(r"[0-9a-f]{8,32}")
MAX_RECORD_BYTES = 64 * 1024
MAX_STOP_TIMEOUT = 10 * 365 * 86400.0
MAX_PROTOCOLS = 64
ENDPOINT_SCHEMES = ("ipc://", "tcp://")


class BadRecord(ValueError):
    """A record file that is unreadable or does not hold up; the message says why."""


@dataclass(frozen=True)
class UnitRecord:
    model: str
    unit: str
    endpoint: str | None = None
    started_at: float | None = None      # wall clock
    stop_timeout: float = 10.0
    gpus: str | None = None              # CUDA_VISIBLE_DEVICES it was placed on
    run: str | None = None               # daemon-chosen id of this start (None: older daemon)
    definition: str | None = None        # digest of how the unit was made (manager.py)
    pid: int | None = None               # its main process, once known
    invocation: str | None = None        # systemd's InvocationID, once known
    ready_at: float | None = None        # wall clock: it answered its handshake (None: not
    protocols: tuple | None = None       # ready, or no longer); the protocols it named


@dataclass(frozen=True)
class Adoption:
    """What a daemon finds of a unit a previous daemon started (launcher.recover())."""
    record: UnitRecord
    running: Running | None = None       # still running the recorded run: adopt this handle
    ended: ExitInfo | None = None        # or how it ended while no daemon watched
    was_ready: bool = False              # it was ready and its unit is active: serve it now
    stopping: bool = False               # its unit is being stopped (the previous daemon was
                                         # unloading it, or an operator stopped the unit)


def new_run_id():
    return os.urandom(8).hex()


def record_name(unit):
    return unit + RECORD_SUFFIX


def exit_name(unit, run):
    return f"{unit}.{run}{EXIT_SUFFIX}" if run else unit + EXIT_SUFFIX


def parse_exit_name(name):
    """(unit, run) for an exit record's file name (run None for an older daemon's), or None."""
    if not name.endswith(EXIT_SUFFIX):
        return None
    stem = name[:-len(EXIT_SUFFIX)]
    if stem.endswith(".service"):
        unit, run = stem, None
    else:
        unit, _, run = stem.rpartition(".")
        if not RUN_ID.fullmatch(run):
            return None
    return (unit, run) if UNIT_NAME.fullmatch(unit) else None


# -- writing ------------------------------------------------------------------------
def write_json(path, document):
    """Atomically replace ``path`` with ``document`` as JSON (files.write_atomic)."""
    write_atomic(path, json.dumps(document), mode=0o640)


def write_record(directory, record):
    write_json(os.path.join(directory, record_name(record.unit)), asdict(record))


def ready(record, protocols):
    """``record`` saying that its backend answered its handshake now with ``protocols``, or,
    with None, that it no longer counts as ready. Unchanged (the same object) when it says
    so already: an adopted backend keeps the time it first became ready."""
    if protocols is None:
        if record.ready_at is None and record.protocols is None:
            return record
        return replace(record, ready_at=None, protocols=None)
    if record.ready_at is not None and record.protocols == tuple(protocols):
        return record
    return replace(record, ready_at=time.time(), protocols=tuple(protocols))


# -- reading ------------------------------------------------------------------------
def _load(path):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise BadRecord(f"{path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "rb") as stream:
            data = stream.read(MAX_RECORD_BYTES + 1)
    except OSError as exc:                  # a directory, say: never a crash
        raise BadRecord(f"{path}: {exc.strerror}") from None
    if len(data) > MAX_RECORD_BYTES:
        raise BadRecord(f"{path}: larger than {MAX_RECORD_BYTES} bytes")
    try:
        document = json.loads(data)
    except ValueError as exc:
        raise BadRecord(f"{path}: not JSON ({exc})") from None
    if not isinstance(document, dict):
        raise BadRecord(f"{path}: not a JSON object")
    return document


def _field(document, key, kind, path, optional=True):
    value = document.get(key)
    if value is None and optional:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise BadRecord(f"{path}: field {key!r} is not a {kind.__name__}")
    if kind is float and not math.isfinite(value):
        raise BadRecord(f"{path}: field {key!r} is not a finite number")
    if kind is str and len(value) > 4096:
        raise BadRecord(f"{path}: field {key!r} is too long")
    return value


def read_record(directory, unit):
    """The UnitRecord for ``unit``, None if there is none; BadRecord if it does not hold up."""
    path = os.path.join(directory, record_name(unit))
    document = _load(path)
    if document is None:
        return None
    record = UnitRecord(
        model=_field(document, "model", str, path, optional=False),
        unit=_field(document, "unit", str, path, optional=False),
        endpoint=_field(document, "endpoint", str, path),
        started_at=_field(document, "started_at", float, path),
        stop_timeout=_field(document, "stop_timeout", float, path) or 10.0,
        gpus=_field(document, "gpus", str, path),
        run=_field(document, "run", str, path),
        definition=_field(document, "definition", str, path),
        pid=_field(document, "pid", int, path),
        invocation=_field(document, "invocation", str, path),
        ready_at=_field(document, "ready_at", float, path),
        protocols=_protocols(document, path))
    if record.unit != unit:
        raise BadRecord(f"{path}: names unit {record.unit!r}, not {unit!r}")
    if record.run is not None and not RUN_ID.fullmatch(record.run):
        raise BadRecord(f"{path}: run id {record.run!r} is malformed")
    if record.pid is not None and record.pid <= 1:
        raise BadRecord(f"{path}: pid {record.pid} is not a backend's")
    if not 0 <= record.stop_timeout <= MAX_STOP_TIMEOUT:
        raise BadRecord(f"{path}: stop_timeout {record.stop_timeout} is out of range")
    if record.endpoint is not None and not record.endpoint.startswith(ENDPOINT_SCHEMES):
        raise BadRecord(f"{path}: endpoint {record.endpoint[:80]!r} is not ipc:// or tcp://")
    if (record.ready_at is None) != (record.protocols is None):
        raise BadRecord(f"{path}: ready_at and protocols must be given together")
    return record


def _protocols(document, path):
    value = document.get("protocols")
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > MAX_PROTOCOLS or not all(
            isinstance(item, str) and 0 < len(item) <= 256 for item in value):
        raise BadRecord(f"{path}: field 'protocols' is not a list of at most {MAX_PROTOCOLS} "
                        f"protocol names")
    return tuple(value)


def read_exit(directory, unit, run):
    """(ExitInfo, invocation id or None) from the exit record of ``unit``'s run ``run``, or
    None while there is none. A malformed one ends the run with an unknown status."""
    path = os.path.join(directory, exit_name(unit, run))
    try:
        document = _load(path)
    except BadRecord as exc:
        return ExitInfo(detail=f"exit status unknown (bad exit record: {exc})"), None
    if document is None:
        return None
    if document.get("unit") not in (None, unit):
        return ExitInfo(detail="exit status unknown (the record names another unit)"), None
    fields = {key: document.get(key) for key in ("result", "exit_code", "exit_status",
                                                 "invocation")}
    fields = {key: value if isinstance(value, str) and len(value) < 256 else ""
              for key, value in fields.items()}
    return exit_info(fields), fields["invocation"] or None


def exit_info(record):
    """ExitInfo from systemd's SERVICE_RESULT / EXIT_CODE / EXIT_STATUS as unit_exit.py
    records them (``result``, ``exit_code``, ``exit_status``)."""
    result = record.get("result", "")
    code, status = record.get("exit_code", ""), record.get("exit_status", "")
    if result == "oom-kill":
        return ExitInfo(signal=signal.SIGKILL, oom_killed=True)
    if code == "exited":
        try:
            return ExitInfo(code=int(status))
        except ValueError:
            pass
    if code in ("killed", "dumped"):
        try:
            return ExitInfo(signal=int(signal.Signals["SIG" + status]))
        except KeyError:
            try:
                return ExitInfo(signal=int(status))
            except ValueError:
                pass
    if result == "timeout":
        return ExitInfo(signal=signal.SIGKILL, detail="stop timed out")
    return ExitInfo(detail=f"unit ended with result {result or 'unknown'}")


def remove(directory, name):
    try:
        os.unlink(os.path.join(directory, name))
    except FileNotFoundError:
        pass
