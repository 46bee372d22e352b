"""The reference backend, plus timestamps for the benchmark.

    PYTHONPATH=<repository> python3 benchmarks/timed_backend.py [reference backend options]

(the benchmarks start it so: common.clean_env). Runs backend_mgmt.reference_backend
unchanged, and appends lines "<event> <CLOCK_MONOTONIC seconds> <pid>" to the file named by
$BENCH_TIMES_FILE:
- "start": when this script begins (the interpreter is up; nothing imported yet);
- "listening": right after the ROUTER socket is bound (the backend's readiness moment);
- "exit": just before the process exits (os._exit right after it, so the pidfd the daemon
  watches fires microseconds later).
CLOCK_MONOTONIC is system wide on Linux, so these compare with the benchmark's own clock.
"""

import time

_STARTED = time.monotonic()

import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

from backend_mgmt import reference_backend  # noqa: E402

TIMES_FILE = os.environ.get("BENCH_TIMES_FILE")


def record(event, moment=None):
    moment = time.monotonic() if moment is None else moment
    if TIMES_FILE:
        with open(TIMES_FILE, "a", encoding="ascii") as stream:
            stream.write(f"{event} {moment:.6f} {os.getpid()}\n")


class _ListeningHook(logging.Handler):
    """The reference backend logs "listening on EP" right after bind(): note that moment."""

    def emit(self, log_record):
        moment = time.monotonic()
        if str(log_record.msg).startswith("listening on"):
            record("listening", moment)


_original_serve = reference_backend.serve
record("start", _STARTED)


def _serve(args, log):
    # Added here, after main()'s logging.basicConfig(), so that call still configures stdout.
    log.addHandler(_ListeningHook())
    return _original_serve(args, log)


reference_backend.serve = _serve

if __name__ == "__main__":
    code = reference_backend.main()
    record("exit")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 1)
