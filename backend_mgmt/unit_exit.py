"""ExecStopPost= helper of backend units: record how the unit's main process ended.

    python3 -m backend_mgmt.unit_exit DIR UNIT

systemd runs it (with full privileges, the '+' prefix) after every end of a backend unit,
with SERVICE_RESULT, EXIT_CODE and EXIT_STATUS in its environment. It writes them to
DIR/UNIT.exit atomically; the daemon sees the file appear through inotify. Because the record
is a file under the runtime dir, an exit that happens while the daemon is down is found when
it comes back.
"""

import json
import os
import sys
import time


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
        "time": time.time(),
    }
    final = os.path.join(directory, unit + ".exit")
    temporary = final + ".tmp"
    with open(temporary, "w") as stream:
        json.dump(record, stream)
    os.rename(temporary, final)
    return 0


if __name__ == "__main__":
    sys.exit(main())
