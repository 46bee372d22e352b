"""A model type's ``park:`` settings and the argv templates of its ``command`` method: what
the config holds and checks (config.py), apart from how a park is done (parking.py), so that
reading a config imports neither ZeroMQ nor protobuf."""

import re
from dataclasses import dataclass

PROTOCOL = "protocol"
COMMAND = "command"
METHODS = (PROTOCOL, COMMAND)
DEFAULT_TIMEOUT = 60.0            # seconds for one park or one wake
PLACEHOLDERS = ("{pid}", "{endpoint}", "{unit}")   # all a command template may contain
_PLACEHOLDER = re.compile(r"\{[^{}]*\}")


@dataclass(frozen=True)
class ParkSettings:
    """A model type's ``park:`` settings, as config.py parsed them."""
    method: str                          # PROTOCOL or COMMAND
    park_command: tuple = ()             # argv template (COMMAND only)
    wake_command: tuple = ()             # argv template (COMMAND only)
    timeout: float = DEFAULT_TIMEOUT     # for one park, and for one wake


def template_problems(argv):
    """What is wrong with a park or wake argv template, as sentences (empty: nothing). Only
    the exact placeholders in PLACEHOLDERS are substituted; any other ``{...}`` is refused,
    so a typo is found at load time rather than passed on literally (config.py calls this)."""
    if not argv:
        return ["the command is empty"]
    problems = []
    for position, argument in enumerate(argv):
        if not isinstance(argument, str):
            problems.append(f"argument {position} is not a string")
            continue
        for found in _PLACEHOLDER.findall(argument):
            if found not in PLACEHOLDERS:
                problems.append(f"argument {position} ({argument!r}) has an unknown placeholder "
                                f"{found}; only {', '.join(PLACEHOLDERS)} are substituted")
    return problems


def substitute(template, values):
    """``(argv, None)`` with each placeholder replaced by ``values[placeholder]`` (a str), or
    ``(None, "why not")``: a problem in the template, or a placeholder without a value.
    Plain replacement in one pass (never str.format, which would reach into attributes);
    a value is never searched for placeholders itself."""
    problems = template_problems(template)
    if problems:
        return None, "; ".join(problems)
    for placeholder in PLACEHOLDERS:
        if values.get(placeholder) in (None, "") and any(placeholder in a for a in template):
            return None, f"{placeholder} has no value for this backend"
    return [_PLACEHOLDER.sub(lambda m: values[m.group()], a) for a in template], None
