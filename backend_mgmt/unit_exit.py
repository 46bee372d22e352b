"""ExecStopPost= helper of backend units: record how a run of the unit ended.

    /usr/bin/env -i --chdir=/ /usr/bin/python3 -I -m backend_mgmt.unit_exit DIR UNIT RUN

systemd runs it after every end of a backend unit's main process (with full privileges, the
'+' prefix, when the unit has User=). It runs as root in a unit whose backend may run as
another user, so it takes nothing from that unit: ``env -i`` clears the environment (no
PYTHONPATH, HOME, LD_LIBRARY_PATH, ...), ``--chdir=/`` leaves the unit's working directory,
and ``python -I`` ignores PYTHON* variables and the user's site-packages and keeps the
current directory off sys.path.

How the unit ended (what systemd passes to ExecStopPost= as SERVICE_RESULT, EXIT_CODE,
EXIT_STATUS and INVOCATION_ID) is asked of systemd itself (``systemctl show``: Result,
ExecMainCode, ExecMainStatus, InvocationID), not taken from the environment: passing the
variables through ``env -i`` as ``${VAR}`` words works only until the next daemon-reload, after
which systemd 252 reads the transient unit's command line back with a backslash before each
``$`` (seen in the booted-systemd system test). Where systemctl cannot answer, the variables
are taken from the environment if there (a run by hand, or a unit started by an older daemon,
whose command line has no ``env -i``).

The record goes to DIR/UNIT.RUN.exit atomically (launchers/records.py); the daemon sees the
file appear through inotify. RUN is the id the daemon chose for this start of the unit, so
the record of one run is never read as another's. Because it is a file under the runtime
dir, an end that happens while the daemon is down is found when it comes back. Units started
by an older daemon call it without RUN; it then writes DIR/UNIT.exit.
"""

import os
import signal
import subprocess
import sys
import time

from .files import WriteError
from .isolation import WORKING_DIRECTORY, clean_env
from .launchers import records, systemctl

PROPERTIES = ("Result", "ExecMainCode", "ExecMainStatus", "InvocationID")
EXIT_CODES = {"1": "exited", "2": "killed", "3": "dumped"}    # CLD_* as systemd shows them


def record_from_properties(properties):
    """The record fields from ``systemctl show`` properties, spelled as systemd spells the
    ExecStopPost= variables (EXIT_CODE 'killed', EXIT_STATUS 'TERM', ...)."""
    code = EXIT_CODES.get(properties.get("ExecMainCode", ""), "")
    status = properties.get("ExecMainStatus", "")
    if code in ("killed", "dumped") and status.isdigit():
        try:
            status = signal.Signals(int(status)).name[len("SIG"):]
        except ValueError:
            pass
    return {"result": properties.get("Result", ""), "exit_code": code, "exit_status": status,
            "invocation": properties.get("InvocationID", "")}


def ask_systemd(unit, run=subprocess.run):
    """The record fields for ``unit`` from systemd, or None when it cannot say."""
    try:
        result = run(systemctl.show_argv(unit, PROPERTIES), capture_output=True, text=True,
                     timeout=20, env=clean_env(), cwd=WORKING_DIRECTORY,
                     stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    properties = systemctl.parse_show(result.stdout)
    if result.returncode != 0 or not properties.get("Result"):
        return None
    return record_from_properties(properties)


def from_environment(environ=os.environ):
    return {"result": environ.get("SERVICE_RESULT", ""), "exit_code": environ.get("EXIT_CODE", ""),
            "exit_status": environ.get("EXIT_STATUS", ""),
            "invocation": environ.get("INVOCATION_ID", "")}


def main(argv=None, ask=ask_systemd):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (2, 3):
        print("usage: python3 -m backend_mgmt.unit_exit DIR UNIT [RUN]", file=sys.stderr)
        return 2
    directory, unit, run = argv[0], argv[1], argv[2] if len(argv) == 3 else None
    if not records.UNIT_NAME.fullmatch(unit) or (run is not None and
                                                 not records.RUN_ID.fullmatch(run)):
        print(f"unit_exit: refusing unit {unit!r} / run {run!r}", file=sys.stderr)
        return 2
    fields = (ask(unit) if "SERVICE_RESULT" not in os.environ else None) or from_environment()
    record = {"unit": unit, "run": run, **fields, "time": time.time()}
    try:
        records.write_json(os.path.join(directory, records.exit_name(unit, run)), record)
    except WriteError as exc:
        print(f"backend_mgmt.unit_exit: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
