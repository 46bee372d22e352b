"""The code passes ruff with the rules in pyproject.toml ([tool.ruff]): unused and undefined
names, late-bound loop variables, over-long lines... A finding fails the suite; fix it, or, for
a rule that is wrong in that very place, say so with ``# noqa: <code>`` and why."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINTED = ["backend_mgmt", "tests", "benchmarks"]


def ruff(*args):
    try:
        return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
    except FileNotFoundError as exc:
        raise AssertionError(f"cannot run ruff ({exc}); packaging/dev-env installs it") from None


def test_ruff_finds_nothing():
    result = ruff("check", "--no-cache", "--output-format", "concise", *LINTED)
    assert "No module named ruff" not in result.stderr, \
        "ruff is not installed in this interpreter; packaging/dev-env installs it"
    assert result.returncode == 0, result.stdout + result.stderr
