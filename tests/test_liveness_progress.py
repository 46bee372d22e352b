"""Liveness checks of ready backends and progress reports of loading ones (real daemon)."""

import json
import os
import signal
import time

from harness import REFERENCE, pid_alive, wait_until


def config(startup_timeout=10, **extra):
    return {"reference": {"command": REFERENCE, "startup_timeout": startup_timeout,
                          "stop_timeout": 1, **extra}}


def pings(report):
    with open(report) as stream:
        return json.load(stream)["pings"]


def test_hung_backend_is_found_and_restarted(daemon_factory, workdir):
    report = os.path.join(workdir, "report.json")
    liveness = {"interval": 0.5, "failures": 3, "timeout": 0.3}
    daemon = daemon_factory({"m": ["--report", report]}, backends=config(
        liveness=liveness, restart={"policy": "on-failure", "backoff_initial": 0.1}))
    pid = daemon.load("m")["data"]["model"]["pid"]
    wait_until(lambda: pings(report) >= 2, 10, message="a few checks to pass")
    assert daemon.model("m")["state"] == "ready"
    os.kill(pid, signal.SIGSTOP)                      # hung: alive, but answers nothing
    frozen_at = time.monotonic()
    model = wait_until(lambda: "hung" in (m := daemon.model("m"))["reason"] and m, 10,
                       interval=0.02, message="the hang to be noticed")
    noticed = time.monotonic() - frozen_at
    assert noticed < 0.5 * 3 + 1, noticed             # interval x failures + 1 s
    assert model["endpoint"] is None                  # no longer handed out
    assert "being stopped" in daemon.handshake("m").error_message
    model = wait_until(lambda: (m := daemon.model("m"))["state"] == "ready" and
                       m["restarts"] == 1 and m, 10, message="the restart")
    assert "hung: no answer to 3 liveness checks" in model["last_error"]
    assert model["pid"] != pid and not pid_alive(pid)


def test_liveness_leaves_healthy_backends_alone(daemon_factory, workdir):
    report = os.path.join(workdir, "report.json")
    daemon = daemon_factory({"m": ["--report", report]},
                            backends=config(liveness={"interval": 0.2, "failures": 2}))
    pid = daemon.load("m")["data"]["model"]["pid"]
    # Checked (pinged) several times, answered each time, left alone.
    wait_until(lambda: pings(report) >= 5, 10, message="five liveness pings")
    model = daemon.model("m")
    assert model["state"] == "ready" and model["pid"] == pid and model["restarts"] == 0


def test_progress_reports_extend_the_startup_deadline(daemon_factory):
    daemon = daemon_factory({"slow": ["--startup-delay", "3", "--progress", "0.4"],
                             "silent": ["--startup-delay", "3"]},
                            backends=config(startup_timeout=1))
    status_seen = []
    import threading
    result = {}
    loader = threading.Thread(target=lambda: result.update(daemon.load("slow")))
    loader.start()
    wait_until(lambda: (m := daemon.model("slow")) and m.get("progress") and
               status_seen.append(m["progress"]) is None, 5, message="a progress line")
    loader.join(15)
    assert result["success"], result                  # 3 s load under a 1 s startup_timeout
    assert status_seen[0].startswith("loading ")
    assert daemon.model("slow")["progress"] is None    # cleared once ready
    reply = daemon.load("silent")                      # the same load without reports
    assert reply["code"] == "startup_timeout"


def test_progress_from_a_stranger_is_ignored(daemon_factory):
    import socket
    daemon = daemon_factory({"slow": ["--startup-delay", "3"]},
                            backends=config(startup_timeout=1.5))
    import threading
    result = {}
    loader = threading.Thread(target=lambda: result.update(daemon.load("slow")))
    loader.start()
    wait_until(lambda: daemon.model("slow"), 5)
    address = "\0" + __import__("backend_mgmt.progress", fromlist=["x"]).listener_name(
        daemon.runtime_dir)
    stranger = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        for _ in range(5):                             # this test process is no backend
            stranger.sendto(b"EXTEND_TIMEOUT_USEC=60000000\nSTATUS=fake", address)
            time.sleep(0.1)
    finally:
        stranger.close()
    loader.join(15)
    assert result["code"] == "startup_timeout"


def _cgroup_v2_root():
    """Where this machine's unified cgroup hierarchy is mounted (writable), or None."""
    for root in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
        if os.path.exists(os.path.join(root, "cgroup.procs")) and os.access(root, os.W_OK):
            return root
    return None


def test_progress_sender_check_compares_the_whole_control_group(tmp_path):
    """A user's own `systemd-run --user --unit=<same name>` unit ends in the same unit name
    but lives under user.slice. There is no systemd (nor a user manager) on these machines,
    so real processes are placed in real cgroups with those two paths; the check must accept
    only the one systemd reported for the model's unit (and what runs below it)."""
    import subprocess
    import uuid
    from backend_mgmt import progress
    root = _cgroup_v2_root()
    if root is None or os.geteuid() != 0:
        import pytest
        pytest.skip("needs root and a writable cgroup v2 hierarchy")
    top = f"/bm-test-{uuid.uuid4().hex[:8]}"
    unit = "backend-mgmt-demo-0123abcd.service"
    ours = f"{top}/backend-mgmt.slice/{unit}"
    users = f"{top}/user.slice/user-1000.slice/user@1000.service/app.slice/{unit}"
    below = f"{ours}/helper"
    made, processes = [], []
    try:
        for path in (ours, users, below):
            os.makedirs(root + path, exist_ok=True)
        made = [below, users, f"{top}/user.slice/user-1000.slice/user@1000.service/app.slice",
                f"{top}/user.slice/user-1000.slice/user@1000.service",
                f"{top}/user.slice/user-1000.slice", f"{top}/user.slice", ours,
                f"{top}/backend-mgmt.slice", top]
        pids = {}
        for name, path in (("ours", ours), ("users", users), ("below", below)):
            process = subprocess.Popen(["sleep", "30"])
            processes.append(process)
            with open(f"{root}{path}/cgroup.procs", "w") as stream:
                stream.write(str(process.pid))
            pids[name] = process.pid
        assert progress.process_in_cgroup(pids["ours"], ours)
        assert progress.process_in_cgroup(pids["below"], ours)
        assert not progress.process_in_cgroup(pids["users"], ours)   # same unit name
        assert not progress.process_in_cgroup(pids["ours"], None)    # not known yet
        assert not progress.process_in_cgroup(pids["ours"], "/")
        assert not progress.process_in_cgroup(pids["ours"], f"{top}/backend-mgmt.slice/"
                                                            f"{unit[:-8]}")   # a prefix
    finally:
        for process in processes:
            process.kill()
            process.wait(5)
        for path in made:
            try:
                os.rmdir(root + path)
            except OSError:
                pass


def test_extend_timeout_values_are_bounded():
    from backend_mgmt import manager
    ceiling = float(manager.EXTEND_TIMEOUT_CEILING)
    assert manager.extend_seconds("600000000") == 600.0
    assert manager.extend_seconds("9" * 20) == ceiling                  # huge: the ceiling
    for bad in ("-5000000", "+5", " 5", "5 ", "1e9", "0x10", "", "nan", "9" * 21, "٣"):
        assert manager.extend_seconds(bad) is None, bad
