"""Hypothesis the same way in every test module.

Derandomized: every run tries the same examples, so a failure shows again on the next run and
on another machine (hypothesis prints the falsifying example). ``examples(n)`` scales the
number of examples by $BACKEND_MGMT_EXAMPLES (a fraction, default 1): packaging/mutation-test
runs the property tests once per mutant and asks for fewer.
"""

import os

from hypothesis import settings

FRACTION = float(os.environ.get("BACKEND_MGMT_EXAMPLES") or 1)

settings.register_profile("backend-mgmt", derandomize=True, database=None, deadline=None,
                          print_blob=True)
settings.load_profile("backend-mgmt")


def examples(count):
    return max(10, int(count * FRACTION))
