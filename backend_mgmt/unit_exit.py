"""ExecStopPost= helper of backend units: record how the unit's main process ended.

    /usr/bin/env -i -C / SERVICE_RESULT=... EXIT_CODE=... EXIT_STATUS=... INVOCATION_ID=... \
        /usr/bin/python3 -I -m backend_mgmt.unit_exit DIR UNIT

systemd runs it after every end of a backend unit (with full privileges, the '+' prefix, when
the unit has User=), passing SERVICE_RESULT, EXIT_CODE, EXIT_STATUS and INVOCATION_ID. It runs
as root, so it is isolated from everything the backend could plant (see
launchers/systemd.py): a clean environment that holds only those four variables, working
directory /, and ``python3 -I`` (no PYTHON* variables, no user site-packages, no current
directory on sys.path). It writes them to DIR/UNIT.exit atomically (files.write_atomic); the
daemon sees the file appear through inotify. Because the record is a file under the runtime
dir, an exit that happens while the daemon is down is found when it comes back.
"""

import json
import os
import sys
import time

from .files import WriteError, write_atomic


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python3 -m backend_mgmt.unit_exit DIR UNIT", file=sys.stderr)
        return 2
    directory, unit = argv
    record = {
        "unit": unit,
        "result": os.environ.get("SERVICE_RESULT", ""),
        "exit_code": os.environ.get("EXIT_CODE", ""),
        "exit_status": os.environ.get("EXIT_STATUS", ""),
        "invocation": os.environ.get("INVOCATION_ID", ""),
        "time": time.time(),
    }
    try:
        write_atomic(os.path.join(directory, unit + ".exit"), json.dumps(record))
    except WriteError as exc:
        print(f"backend_mgmt.unit_exit: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
