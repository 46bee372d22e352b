"""Validate a config file in a child process; print the result as one JSON document.

    python3 -m backend_mgmt.validate PATH [CONTENT]

Prints {"document": <the parsed, valid document>} and exits 0, or {"problems": [lines]} and
exits 78. The daemon uses this (config.load_isolated) so that it never imports jsonschema.
With CONTENT, the text is read from that file (a snapshot the daemon took when a reload was
asked for) and problems still name PATH.
"""

import json
import sys

from . import config


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (1, 2):
        print("usage: python3 -m backend_mgmt.validate PATH [CONTENT]", file=sys.stderr)
        return 2
    path = argv[0]
    try:
        document = config.read(path, source=argv[1] if len(argv) == 2 else None)
        problems = [f"{path}: {line}" for line in config.validate(document)]
    except config.ConfigError as exc:
        problems = exc.problems
    if problems:
        json.dump({"problems": problems}, sys.stdout)
        return 78
    json.dump({"document": document}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
