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


# The directory this very package was imported from: a Python helper runs the daemon's own
# code, wherever that is installed (dist-packages, a virtualenv, a source tree on PYTHONPATH,
# which -I would otherwise ignore).
PACKAGE_HOME = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_argv(module, *args, python=None):
    """``<this interpreter> -I`` running ``module`` (of this package) with ``args``."""
    code = (f"import runpy, sys; sys.path.insert(0, {PACKAGE_HOME!r}); "
            f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)")
    return [python or sys.executable, "-I", "-c", code, *args]


def absolute(path):
    """A path that still means the same file from WORKING_DIRECTORY."""
    return os.path.abspath(path)
