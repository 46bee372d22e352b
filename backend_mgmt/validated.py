"""Which configuration bytes have passed validation, so that the same bytes are not validated
again: neither by a reload nor by the next daemon's start-up.

Validating runs a child that imports jsonschema and yaml (config.validation_command): a good
part of a second of CPU on a busy machine, and at start-up it sits on the clients' path. Both
reloads and start-ups ask one question here, ``vouches_for(data)``:

- in memory: the bytes the running configuration came from (a reload of those bytes has
  nothing to validate or change);
- before there is a running configuration (start-up): a record in the runtime directory of the
  bytes' SHA-256 and of the validator they passed (``validator_identity``), written only after
  a validation succeeded. It is trusted only when it and its directory belong to the daemon's
  own user and nobody else may write to them, so no other user can forge one (the runtime dir
  as root is root:backend-mgmt 0751, runtime.py).

The record only spares the schema check. The daemon still parses the bytes it read and runs
its own checks on them (config.from_unchanged).
"""

import hashlib
import json
import logging
import os
import stat

from . import __version__, config, files, runtime

log = logging.getLogger(__name__)

RECORD_NAME = "config.validated"
RECORD_MODE = 0o600
MAX_RECORD_SIZE = 4096
# What the validator is made of: a new schema or new checks invalidate every record.
VALIDATOR_FILES = ("schema.json", "config.py", "validate.py")


def validator_identity():
    """A digest of the package version and the validator's files, as installed."""
    digest = hashlib.sha256(__version__.encode())
    home = os.path.dirname(os.path.abspath(__file__))
    for name in VALIDATOR_FILES:
        with open(os.path.join(home, name), "rb") as stream:
            digest.update(hashlib.sha256(stream.read()).digest())
    return digest.hexdigest()


def record_text(data):
    """What the record says of ``data``: its digest and the validator's."""
    return json.dumps({"sha256": hashlib.sha256(data).hexdigest(),
                       "validator": validator_identity()}, sort_keys=True) + "\n"


def _owned_by_us_alone(st):
    return st.st_uid == os.geteuid() and not st.st_mode & 0o022


def read_record(directory):
    """The record's text if ``directory`` and the record in it can only have been written by
    this daemon's user; else None (missing, a symlink, someone else's, writable by others)."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not _owned_by_us_alone(os.fstat(dir_fd)):
            return None
        fd = os.open(RECORD_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    finally:
        os.close(dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not _owned_by_us_alone(st):
            return None
        return os.read(fd, MAX_RECORD_SIZE).decode("utf-8", "replace")
    except OSError:
        return None
    finally:
        os.close(fd)


class ValidatedBytes:
    """The configuration bytes this daemon knows passed validation; ``directory`` keeps the
    record of them (the runtime dir, once it is prepared: runtime.prepare_directory)."""

    def __init__(self, directory, running=None):
        self.directory = directory
        self.running = running        # the bytes the running configuration came from
        self._recorded = False        # the record already names ``running``
        self.spared = False           # a record spared the start-up its validation
        self._stopping = False        # forget() was called: write no record any more

    def vouches_for(self, data):
        """True if ``data`` passed validation and the daemon accepted what they say."""
        if data is None:
            return False
        if self.running is not None:
            return data == self.running
        if read_record(self.directory) != record_text(data):
            return False
        self.running, self._recorded = data, True     # the record names them already
        return True

    def accept(self, data):
        """``data`` passed validation (or a record vouched for them) and the daemon runs a
        configuration read from them."""
        if data != self.running:
            self.running, self._recorded = data, False

    def record(self):
        """Write the record of the running bytes for the next daemon, unless it is there.
        Only into a directory checked as ours (runtime.check_trusted_directory)."""
        if self.running is None or self._recorded or self._stopping:
            return
        try:
            runtime.check_trusted_directory(self.directory)
            files.write_atomic(os.path.join(self.directory, RECORD_NAME),
                               record_text(self.running), mode=RECORD_MODE)
        except (runtime.StartupError, OSError) as exc:
            # Only costs the next start a validation.
            log.warning("cannot record that the configuration was validated: %s", exc)
            return
        self._recorded = True

    def forget(self):
        """The service stops for good: leave nothing behind in the runtime dir. (A restart
        or a crash keeps the record; the next start after a stop validates again. A reload
        that ends after this records nothing.)"""
        self._recorded, self._stopping = False, True
        try:
            os.unlink(os.path.join(self.directory, RECORD_NAME))
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove the record of the validated configuration: %s", exc)


def load_config(path, backend_path=None, environ=os.environ):
    """(Config, ValidatedBytes) for the daemon's start-up. Bytes a trusted record vouches
    for are parsed and checked here, without the validating child; any others are validated
    in the child (config.load_isolated), exactly the bytes read here. Raises ConfigError."""
    try:
        with open(path, "rb") as stream:
            data = stream.read()
    except OSError:
        data = None                  # the child says why, as for any unreadable file
    document = _parsed_or_none(data, path)
    validated = ValidatedBytes(runtime.runtime_dir(_locations(document), environ))
    if document is not None and validated.vouches_for(data):
        cfg = config.from_unchanged(document, path, backend_path)
        validated.accept(data)
        validated.spared = True
        return cfg, validated
    cfg = config.load_isolated(path, backend_path=backend_path, data=data)
    validated.accept(data)
    return cfg, validated


def _parsed_or_none(data, path):
    if data is None:
        return None
    try:
        return config.parse_text(data.decode("utf-8"), path)
    except (UnicodeDecodeError, config.ConfigError):
        return None


def _locations(document):
    """Just enough of a config for runtime.runtime_dir: the document's runtime_dir."""
    directory = document.get("runtime_dir") if isinstance(document, dict) else None
    return config.Locations(runtime_dir=directory if isinstance(directory, str) else None)
