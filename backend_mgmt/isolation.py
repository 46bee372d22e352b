"""How the daemon runs other programs while it is root: isolated from what backends, clients
and config values can plant.

Every helper (config validation, systemctl, systemd-run, nvidia-smi) gets ``clean_env()``, not
the daemon's environment, and runs in ``/``; Python helpers run as ``python_argv(...)``, i.e.
``python3 -I`` (no PYTHON* variables, no user site-packages, the current directory not on
sys.path). The exit-record helper of backend units is isolated the same way by its command line
(launchers/systemd.py).
"""

import os
import sys

SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
WORKING_DIRECTORY = "/"


def clean_env(**extra):
    """A fixed environment: PATH and a UTF-8 locale, and only what the caller adds."""
    return {"PATH": SAFE_PATH, "LANG": "C.UTF-8", **extra}


def python_argv(module, *args, python=None):
    """``<this interpreter> -I -m module args...``."""
    return [python or sys.executable, "-I", "-m", module, *args]


def absolute(path):
    """A path that still means the same file from WORKING_DIRECTORY."""
    return os.path.abspath(path)
