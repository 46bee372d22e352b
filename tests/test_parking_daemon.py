"""Parking through the real daemon (README "Parking models"): reference backends that speak
the sleep protocol, the cuda-checkpoint stand-in for the command form, real sockets and
processes. The scheduler's decisions are tested in-process (test_parking_core.py); here the
promises a user sees: the process is kept, status says parked, a handshake or load wakes it,
failures end as documented."""

import json
import os
import signal
import sys

from harness import REFERENCE, pid_alive, wait_until

HERE = os.path.dirname(os.path.abspath(__file__))
STAND_IN = os.path.join(HERE, "fixtures", "fake_cuda_checkpoint.py")


def parking_backends(park="protocol"):
    return {"reference": {"command": REFERENCE, "startup_timeout": 10, "stop_timeout": 3,
                          "park": park}}


def report(path):
    with open(path) as stream:
        return json.load(stream)


def test_an_evicted_model_is_parked_and_a_handshake_wakes_the_same_process(
        daemon_factory, workdir):
    reports = {name: os.path.join(workdir, f"{name}.report") for name in ("a", "b")}
    daemon = daemon_factory({name: ["--report", path] for name, path in reports.items()},
                            backends=parking_backends(), max_loaded_models=1)
    first = daemon.load("a")
    assert first["success"], first
    pid_a = first["data"]["model"]["pid"]
    assert daemon.load("b")["success"]
    parked = daemon.model("a")
    assert parked["state"] == "parked", parked
    assert parked["pid"] == pid_a and pid_alive(pid_a), "parked, not unloaded"
    assert parked["parked_at"] and parked["endpoint"] is None, parked
    assert report(reports["a"])["sleeps"] == 1

    answer = daemon.handshake("a", timeout=20)
    assert not answer.error_message, answer.error_message
    assert answer.model_ipc_endpoint == parked["backend_endpoint"]
    woken = daemon.model("a")
    assert woken["state"] == "ready" and woken["pid"] == pid_a, woken
    assert woken["parked_at"] is None
    assert report(reports["a"])["wakes"] == 1
    assert daemon.model("b")["state"] == "parked", "b made room for a in turn"


def test_park_model_and_load_model_wake_it(daemon_factory):
    daemon = daemon_factory({"m": [], "plain": []}, backends={
        **parking_backends(), "nopark": {"command": REFERENCE, "startup_timeout": 10}},
        supported_models=[{"name": "m", "type": "reference"},
                          {"name": "plain", "type": "nopark"}])
    pid = daemon.load("m")["data"]["model"]["pid"]
    reply = daemon.request("park-model", {"model_name": "m"}, timeout=20)
    assert reply["success"], reply
    assert reply["data"]["model"]["state"] == "parked"
    assert daemon.request("status")["data"]["counts"].get("parked") == 1
    again = daemon.load("m")
    assert again["success"] and again["data"]["model"]["pid"] == pid, again

    assert daemon.load("plain")["success"]
    refused = daemon.request("park-model", {"model_name": "plain"})
    assert not refused["success"] and refused["code"] == "bad_request", refused
    assert "cannot be parked" in refused["error"]


def test_a_handshake_wakes_a_parked_model_that_is_not_on_demand(daemon_factory):
    """on_demand: false keeps handshakes from loading a model; a parked one was loaded, and
    a handshake wakes it (issue: "a handshake or load-model for a parked model wakes it")."""
    daemon = daemon_factory({"m": []}, backends=parking_backends(), on_demand=False)
    assert daemon.handshake("m").error_message, "not loaded, not on demand: refused"
    pid = daemon.load("m")["data"]["model"]["pid"]
    assert daemon.request("park-model", {"model_name": "m"}, timeout=20)["success"]
    answer = daemon.handshake("m", timeout=20)
    assert not answer.error_message, answer.error_message
    assert daemon.model("m")["state"] == "ready" and daemon.model("m")["pid"] == pid


def test_a_failed_wake_restarts_the_model_cold_with_the_reason(daemon_factory):
    daemon = daemon_factory({"m": ["--wake-fail"]}, backends=parking_backends())
    pid = daemon.load("m")["data"]["model"]["pid"]
    assert daemon.request("park-model", {"model_name": "m"}, timeout=20)["success"]
    reply = daemon.load("m", timeout=40)
    # The loads that waited for the wake are told (README: answered load_failed)...
    assert not reply["success"] and reply["code"] == "load_failed", reply
    assert "wake failed" in reply["error"]
    # ...and the restart policy starts it cold, the reason kept.
    model = wait_until(lambda: (daemon.model("m") or {}).get("state") == "ready"
                       and daemon.model("m"), 30, message="the cold restart to be ready")
    assert model["pid"] != pid and not pid_alive(pid), "started cold in a new process"
    assert model["restarts"] >= 1
    assert "wake failed" in (model["last_error"] or ""), model


def test_a_failed_park_unloads_the_model(daemon_factory):
    daemon = daemon_factory({"m": ["--sleep-fail"]}, backends=parking_backends())
    pid = daemon.load("m")["data"]["model"]["pid"]
    reply = daemon.request("park-model", {"model_name": "m"}, timeout=20)
    assert not reply["success"] and reply["code"] == "park_failed", reply
    wait_until(lambda: daemon.model("m") is None, 15, message="the model to be unloaded")
    wait_until(lambda: not pid_alive(pid), 10, message="its process to be gone")


def test_a_parked_backend_that_dies_is_reported_and_unloaded(daemon_factory):
    daemon = daemon_factory({"m": []}, backends=parking_backends())
    pid = daemon.load("m")["data"]["model"]["pid"]
    assert daemon.request("park-model", {"model_name": "m"}, timeout=20)["success"]
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: daemon.model("m") is None, 15, message="the dead parked model to go")
    assert "parked" in daemon.log() and str(pid) in daemon.log()
    assert daemon.load("m")["data"]["model"]["pid"] != pid      # the next load is cold


def test_the_command_form_runs_the_templates_with_the_backends_pid(daemon_factory, workdir):
    record = os.path.join(workdir, "calls.jsonl")
    tool = [sys.executable, STAND_IN, "--record", record, "--toggle", "--pid", "{pid}"]
    daemon = daemon_factory({"m": ["--no-sleep"]}, backends=parking_backends(
        {"command": {"park": tool, "wake": tool}, "timeout": 10}))
    pid = daemon.load("m")["data"]["model"]["pid"]
    assert daemon.request("park-model", {"model_name": "m"}, timeout=20)["success"]
    assert daemon.load("m")["data"]["model"]["pid"] == pid
    with open(record) as stream:
        calls = [json.loads(line)["argv"] for line in stream]
    assert calls == [["--toggle", "--pid", str(pid)]] * 2
