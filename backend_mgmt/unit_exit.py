"""ExecStopPost= helper of backend units: record how the unit's run ended.

    python3 -m backend_mgmt.unit_exit DIR UNIT RUN

systemd runs it after every end of a backend unit, once every process of the unit is gone,
with SERVICE_RESULT, EXIT_CODE, EXIT_STATUS and INVOCATION_ID in its environment. It writes
them to DIR/UNIT.RUN.exit atomically (see launchers/records.py); the daemon sees the file
appear through inotify. RUN is the id the daemon chose for this start of the unit, so the
record of one run is never read as another's. Because the record is a file under the
runtime dir, an end that happens while the daemon is down is found when it comes back.

Units started by an older daemon call it without RUN; it then writes DIR/UNIT.exit.
"""

import os
import sys
import time

from .launchers import records


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (2, 3):
        print("usage: python3 -m backend_mgmt.unit_exit DIR UNIT [RUN]", file=sys.stderr)
        return 2
    directory, unit, run = argv[0], argv[1], argv[2] if len(argv) == 3 else None
    if not records.UNIT_NAME.fullmatch(unit) or (run is not None and
                                                 not records.RUN_ID.fullmatch(run)):
        print(f"unit_exit: refusing unit {unit!r} / run {run!r}", file=sys.stderr)
        return 2
    record = {
        "unit": unit,
        "run": run,
        "invocation": os.environ.get("INVOCATION_ID", ""),
        "result": os.environ.get("SERVICE_RESULT", ""),
        "exit_code": os.environ.get("EXIT_CODE", ""),
        "exit_status": os.environ.get("EXIT_STATUS", ""),
        "time": time.time(),
    }
    records.write_json(os.path.join(directory, records.exit_name(unit, run)), record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
