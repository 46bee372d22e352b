"""What `backend-mgmt serve` loads before READY=1 under systemd: start-up sits on the clients'
path at every restart, so modules needed only later (or only by another launcher) are
imported where they are used. Which modules, not how long: timings are for
benchmarks/bench_startup.py."""

import subprocess
import sys

from harness import REPO

# Loaded only after READY=1, or never under systemd (launchers/child.py is the process
# launcher's; uuid brings platform and ctypes' uuid helpers).
DEFERRED = ("backend_mgmt.launchers.child", "uuid", "jsonschema")


def test_the_daemons_modules_leave_out_what_start_up_does_not_need():
    """Broken by: importing ChildLauncher at the top of daemon.py again, or uuid at the top of
    backend_socket.py or client.py."""
    code = ("import sys; import backend_mgmt.cli, backend_mgmt.validated, backend_mgmt.daemon; "
            f"print([name for name in {DEFERRED!r} if name in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO, check=True)
    assert result.stdout.strip() == "[]", result.stdout


def test_reading_a_config_needs_neither_zeromq_nor_protobuf():
    """The validating child and `check-config` import config.py only: park settings live in
    park_settings.py, not beside the park steps (parking.py, which speaks ZeroMQ and
    protobuf). Broken by: config.py importing parking again."""
    code = ("import sys; import backend_mgmt.config, backend_mgmt.validate; "
            "print([name for name in ('zmq', 'google.protobuf', 'backend_mgmt.parking') "
            "if name in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO, check=True)
    assert result.stdout.strip() == "[]", result.stdout
