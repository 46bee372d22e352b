"""Reloading the configuration: read the file, validate it in a child process (so the loop
keeps serving), apply what changed, tell systemd, answer every request that asked.

Which requests share a validation is reloads.py's bookkeeping; this module does the IO.
"""

import logging
import os
import time

from . import config as config_module, errors, files
from .validated import ValidatedBytes
from .errors import ServiceError
from .loop import run_async
from .reloads import ReloadQueue

log = logging.getLogger(__name__)

VALIDATION_TIMEOUT = 60.0       # seconds the validating child may take


class Reloader:
    """``manager``: holds the running config (``manager.config``) and unloads or restarts
    the models a reload removes or changes; ``notifier``: RELOADING=1 / READY=1 for systemd;
    ``status_line()``: the STATUS= text sent with READY=1."""

    def __init__(self, loop, manager, notifier, runtime_dir, status_line, backend_path=None,
                 validated=None):
        self.loop = loop
        self.manager = manager
        self.notifier = notifier
        self.runtime_dir = runtime_dir
        self.status_line = status_line
        self.backend_path = backend_path
        self._queue = ReloadQueue()   # the reload under way and those waiting for it
        # The bytes the running config came from, and the record of them for the next start.
        self.validated = validated or ValidatedBytes(runtime_dir, self._read_config_bytes())

    @property
    def config(self):
        return self.manager.config

    def _read_config_bytes(self):
        try:
            with open(self.config.path, "rb") as stream:
                return stream.read()
        except OSError:
            return None

    def reload(self, done, why):
        """Re-read and validate the config, then apply it if valid. ``done(ConfigChange or
        ServiceError)``; None to just log.

        The answer is for the file as it is now: a request joins a validation of the same
        bytes, else waits for one of its own (reloads.py)."""
        data = self._read_config_bytes()
        log.info("reload of the configuration from %s asked for (%s)", self.config.path, why)
        self._queue.add(data, done)
        self._next()

    def _next(self):
        entry = self._queue.start_next()
        if entry is None:
            return
        try:
            self.notifier.reloading(time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)
            if self.validated.vouches_for(entry.data):
                # Same bytes, same validated result: nothing to validate or change.
                self.loop.call_later(0, lambda: self._done(config_module.ConfigChange()))
                return
            snapshot = None if entry.data is None else self._write_snapshot(entry.data)
            run_async(self.loop, config_module.validation_command(self.config.path, snapshot),
                      self._validated, timeout=VALIDATION_TIMEOUT)
        except Exception as exc:     # e.g. out of file descriptors: answer, never jam
            log.exception("cannot start validating the configuration")
            self._done(ServiceError(
                errors.INTERNAL, f"configuration not reloaded: {exc}; the running "
                                 f"configuration is unchanged"))

    def _snapshot_path(self):
        return os.path.join(self.runtime_dir, "config-reload.snapshot")

    def _write_snapshot(self, data):
        """The bytes a reload is for, where the validating child reads them (0600: a config
        may hold secrets in env)."""
        path = self._snapshot_path()
        files.write_atomic(path, data, mode=0o600)
        return path

    def _validated(self, result):
        try:
            new = config_module.from_validation_output(
                result.stdout, self.config.path, self.backend_path,
                detail="" if result.ok else result.describe())
        except config_module.ConfigError as exc:
            problems = exc.problems
            for problem in problems:
                log.error("%s", problem)
            log.error("configuration not reloaded (%d problem(s)); the running configuration "
                      "is unchanged", len(problems))
            self._done(ServiceError(
                errors.CONFIG_INVALID, f"configuration not reloaded, {len(problems)} "
                f"problem(s): {problems[0]}; the running configuration is unchanged",
                data={"problems": problems}))
            return
        except Exception as exc:
            log.exception("reading the validated configuration failed")
            self._done(ServiceError(errors.INTERNAL, f"configuration not reloaded: "
                                                     f"{exc}; see the service log"))
            return
        old = self.config
        try:
            change = config_module.diff(old, new)
            self._apply(new, change)
        except Exception as exc:
            # What was started (unloads) goes on; the old config stays the reference, so the
            # next reload of this file finds the same differences and finishes the job.
            self.manager.config = old
            log.exception("applying the reloaded configuration failed")
            self._done(ServiceError(errors.INTERNAL, f"configuration reload failed while "
                                                     f"applying it: {exc}; see the "
                                                     f"service log"))
            return
        self.validated.accept(self._queue.running.data)
        self.validated.record()
        self._done(change)

    def _apply(self, new, change):
        manager = self.manager
        manager.config = new
        if "log_level" in change.settings:
            logging.getLogger().setLevel(getattr(logging, new.log_level, logging.INFO))
        for name in change.removed:
            backend = manager.registry.get(name)
            if backend is not None:
                manager.unload_backend(backend, lambda b: None, "removed from the configuration")
        for name in change.changed:
            backend = manager.registry.get(name)
            if backend is not None:
                manager.reload_backend(backend, new.models[name])
        for key in change.need_restart:
            log.warning("configuration key %s changed: restart the service to apply it", key)
        log.info("configuration reloaded: %s", config_module.describe_change(change.as_dict()))

    def _done(self, outcome):
        """Whatever happened: READY=1 for systemd, every request answered, the next reload
        started."""
        entry = self._queue.finish()
        try:
            os.unlink(self._snapshot_path())
        except OSError:
            pass
        try:
            self.notifier.ready(self.status_line())
        except Exception:
            log.exception("cannot tell systemd the reload is over")
        for done in entry.waiters if entry is not None else ():
            if done is None:
                continue
            try:
                done(outcome)
            except Exception:
                log.exception("answering a reload request failed")
        self._next()
