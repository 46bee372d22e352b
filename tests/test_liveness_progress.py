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
