"""Restart policy edges against the real daemon, one test per transition."""

import datetime
import os
import signal
import time

from harness import REFERENCE, pid_alive, wait_until


def backends(**restart):
    return {"reference": {"command": REFERENCE, "startup_timeout": 10, "stop_timeout": 2,
                          "restart": restart}}


def test_crash_backoff_restart_ready(daemon_factory, workdir):
    marker = os.path.join(workdir, "crashed")
    daemon = daemon_factory({"m": ["--exit-after", "0.3", "--crash-once", marker]},
                            backends=backends(policy="on-failure", backoff_initial=0.5))
    first = daemon.load("m")["data"]["model"]["pid"]
    model = wait_until(lambda: (m := daemon.model("m"))["state"] == "restarting" and m, 5,
                       message="restarting")
    assert model["last_exit"]["code"] == 3 and model["next_restart_at"]
    assert "restarting in 0.5 s" in model["reason"]
    model = wait_until(lambda: (m := daemon.model("m"))["state"] == "ready" and m, 10,
                       message="ready again")
    assert model["restarts"] == 1 and model["pid"] != first and pid_alive(model["pid"])
    assert daemon.handshake("m").model_ipc_endpoint == model["endpoint"]


def test_clean_exit_is_not_restarted_by_on_failure(daemon_factory):
    daemon = daemon_factory({"m": ["--exit-after", "0.2", "--exit-code", "0"]},
                            backends=backends(policy="on-failure", backoff_initial=0.1))
    daemon.load("m")
    model = wait_until(lambda: (m := daemon.model("m"))["state"] == "failed" and m, 5)
    assert model["restarts"] == 0 and model["last_exit"]["code"] == 0


def test_always_restarts_clean_exits(daemon_factory):
    daemon = daemon_factory({"m": ["--exit-after", "0.2", "--exit-code", "0"]},
                            backends=backends(policy="always", backoff_initial=0.1,
                                              max_restarts=100))
    daemon.load("m")
    wait_until(lambda: daemon.model("m")["restarts"] >= 2, 10, message="two restarts")


def test_flapping_ends_in_failed_until_the_next_load(daemon_factory):
    daemon = daemon_factory({"m": ["--exit-after", "0.2"]},
                            backends=backends(backoff_initial=0.1, max_restarts=2, window=60))
    daemon.load("m")
    model = wait_until(lambda: (m := daemon.model("m"))["state"] == "failed" and m, 15,
                       message="flapping to end in failed")
    assert model["restarts"] == 2 and model["error_code"] == "flapping"
    assert "gave up after 2 restarts within 60 s" in model["error"]
    assert model["next_restart_at"] is None              # stays failed: nothing scheduled
    assert not daemon.backend_pids()
    assert daemon.load("m")["success"]                   # until the next load-model
    assert daemon.model("m")["state"] == "ready"


def test_unload_during_backoff_is_never_undone(daemon_factory):
    daemon = daemon_factory({"m": ["--exit-after", "0.2"]},
                            backends=backends(backoff_initial=1.0))
    daemon.load("m")
    model = wait_until(lambda: (m := daemon.model("m"))["state"] == "restarting" and m, 5)
    assert daemon.request("unload-model", {"model_name": "m"})["success"]
    assert daemon.model("m") is None
    # Past the moment the restart was due; the next request is answered after any timer
    # that was due by then has run.
    due = datetime.datetime.fromisoformat(model["next_restart_at"].replace("Z", "+00:00"))
    wait_until(lambda: time.time() > due.timestamp() + 0.2, 5,
               message="the cancelled restart's due time")
    assert daemon.model("m") is None and not daemon.backend_pids()


def test_load_during_backoff_starts_at_once(daemon_factory):
    daemon = daemon_factory({"m": ["--exit-after", "0.5"]},
                            backends=backends(backoff_initial=30))
    daemon.load("m")
    wait_until(lambda: daemon.model("m")["state"] == "restarting", 5)
    started = time.monotonic()
    assert daemon.load("m")["success"]
    assert time.monotonic() - started < 10               # not the 30 s backoff


def test_shutdown_during_backoff_exits_promptly(daemon_factory):
    daemon = daemon_factory({"m": ["--exit-after", "0.2"]},
                            backends=backends(backoff_initial=30))
    daemon.load("m")
    wait_until(lambda: daemon.model("m")["state"] == "restarting", 5)
    assert daemon.terminate(timeout=10) == 0


def test_killed_backend_is_reported_and_restarted(daemon_factory):
    daemon = daemon_factory({"m": []}, backends=backends(backoff_initial=0.1))
    pid = daemon.load("m")["data"]["model"]["pid"]
    os.kill(pid, signal.SIGKILL)
    model = wait_until(lambda: (m := daemon.model("m"))["restarts"] == 1 and
                       m["state"] == "ready" and m, 10)
    assert model["last_exit"]["signal"] == signal.SIGKILL
    assert "killed by SIGKILL" in model["last_exit"]["description"]


def test_exit_code_137_is_described_as_a_kill(daemon_factory):
    daemon = daemon_factory({"m": ["--exit-after", "0.2", "--exit-code", "137"]},
                            backends=backends(policy="no"))
    daemon.load("m")
    model = wait_until(lambda: (m := daemon.model("m"))["state"] == "failed" and m, 5)
    assert "code 137 (killed with SIGKILL, e.g. out of memory)" in model["error"]
