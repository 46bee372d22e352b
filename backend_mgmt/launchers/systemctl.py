"""What ``systemctl show`` and ``list-units`` print, read in one place: by the launcher (a
unit's main pid, whether it is still active) and by the ExecStopPost= helper (how a run
ended).

Imports nothing of the daemon's: unit_exit.py runs it in every backend unit's stop.
"""

SYSTEMCTL = "systemctl"
# At most this many units per `systemctl show`, so that the command line stays short.
UNITS_PER_SHOW = 200


def show_argv(units, properties):
    """``systemctl show`` of ``units`` (one or more names), only ``properties``; ``Id`` is
    always asked for too, which tells the units' answers apart (parse_show_many)."""
    if isinstance(units, str):
        units = [units]
    wanted = ["Id", *(p for p in properties if p != "Id")]
    return [SYSTEMCTL, "show", f"--property={','.join(wanted)}", "--", *units]


def parse_show(text):
    """One unit's ``systemctl show`` output as a dict (a value may hold '=')."""
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def list_units_argv(pattern):
    """Every loaded unit matching ``pattern``, with its states: one call to systemd for all
    of them, where ``show`` asks once per unit."""
    return [SYSTEMCTL, "list-units", "--all", "--plain", "--no-legend", "--no-pager",
            "--full", "--", pattern]


def parse_list_units(text):
    """{unit: ActiveState} from list_units_argv's output (UNIT LOAD ACTIVE SUB DESCRIPTION)."""
    states = {}
    for line in text.splitlines():
        fields = line.split(None, 4)
        if len(fields) >= 4:
            states[fields[0]] = fields[2]
    return states


def parse_show_many(text, units):
    """{unit: its properties} from one ``systemctl show`` of several units. systemctl prints
    one block per unit, in the order asked, blank lines between; each names itself by Id.
    A unit whose block is missing or names another unit is left out."""
    shown = {}
    wanted = set(units)
    for block in text.split("\n\n"):
        properties = parse_show(block)
        unit = properties.get("Id")
        if unit in wanted and unit not in shown:
            shown[unit] = properties
    return shown
