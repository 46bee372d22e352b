"""Validate a config file in a child process; print the result as one JSON document.

    python3 -m backend_mgmt.validate PATH

Prints {"document": <the parsed, valid document>} and exits 0, or {"problems": [lines]} and
exits 78. The daemon uses this (config.load_isolated) so that it never imports jsonschema.
"""

import json
import sys

from . import config


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python3 -m backend_mgmt.validate PATH", file=sys.stderr)
        return 2
    path = argv[0]
    try:
        document = config.read(path)
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
