"""Limits on values that come from outside (control params, config, correlation ids), and
the checks that apply them. Pure: no IO; the callers turn a ValueError into a ``bad_param``
reply or a config problem line that names the field.

Why these limits: every number of seconds ends up as a timer deadline, a poll timeout or a
timestamp shown in status. Python's JSON parser accepts ``NaN``, ``Infinity`` and ``1e300``;
unchecked, such a value made ``status`` fail (a timestamp past the year 9999) and could make
the loop's poll timeout overflow. A year is longer than any start-up, stop, idle or back-off
time anyone means; ``-1`` stays the way to say "forever" where forever makes sense.
"""

import math

MAX_SECONDS = 365 * 24 * 3600           # any duration: at most a year
MIN_INTERVAL = 0.01                     # periodic checks: no busier than 100 per second
MAX_NAME_LENGTH = 1024                  # a model name in a request
MAX_CORRELATION_ID_LENGTH = 256         # a string correlation_id (a UUID is 36)
MAX_CORRELATION_INT = 2 ** 63           # an integer correlation_id: |id| below this


def is_number(value):
    """A JSON number (int or float), not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def seconds(value, name, minimum=0.0, maximum=MAX_SECONDS, forever=False):
    """``value`` as float seconds in [minimum, maximum] (from -1 when ``forever``, as the
    config's keep_alive: a negative number means forever).

    Raises ValueError with a message that names ``name``."""
    what = f"{name} must be a number of seconds"
    if forever:
        what += " (-1: forever)"
    if not is_number(value):
        raise ValueError(f"{what}, not {type(value).__name__} {_short(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{what}, not {value}")
    if forever:
        minimum = -1                    # any negative number up to -1 means forever
    if not minimum <= value <= maximum:
        raise ValueError(f"{what} from {_bound(minimum)} to {_bound(maximum)}, "
                         f"not {_short(value)}")
    return float(value)


def correlation_id(value):
    """Echoable as it came: None, a string of bounded length, or a finite number of bounded
    size. Raises ValueError saying what is wrong."""
    if value is None:
        return value
    if isinstance(value, str):
        if len(value) > MAX_CORRELATION_ID_LENGTH:
            raise ValueError(f"correlation_id must be at most {MAX_CORRELATION_ID_LENGTH} "
                             f"characters, not {len(value)}")
        return value
    if is_number(value):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"correlation_id must be a finite number, not {value}")
        if isinstance(value, int) and abs(value) >= MAX_CORRELATION_INT:
            raise ValueError("correlation_id is too large a number (at most 2^63 - 1)")
        return value
    raise ValueError(f"correlation_id must be a string or a number, not "
                     f"{type(value).__name__}")


def _bound(number):
    """A limit as the README writes it: 31536000, not 3.1536e+07 (as ``:g`` would)."""
    return str(int(number)) if float(number).is_integer() else repr(float(number))


def _short(value):
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
