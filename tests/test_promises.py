"""Promises of README.md that a change to the daemon could break without another test noticing.

Each test here was checked once against a daemon broken on purpose (the change named in its
docstring), and failed there. Real daemon, real reference backends, real sockets.
"""

import grp
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time

import psutil
import pytest

from harness import REFERENCE, REPO, Daemon, make_config, pid_alive, wait_until


@pytest.fixture
def start_daemon(workdir):
    """Start a real daemon on a full config document; killed and cleaned up after the test."""
    started = []

    def start(document, env=None):
        daemon = Daemon(document, directory=workdir, env=env)
        started.append(daemon)
        return daemon.start()
    yield start
    for daemon in started:
        daemon.close()


def cli(*args, env=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "backend_mgmt", *args], capture_output=True,
                          text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": REPO, **(env or {})})


def read_json(path):
    with open(path) as stream:
        return json.load(stream)


def backends(**settings):
    return {"reference": {"command": REFERENCE, "startup_timeout": 10, "stop_timeout": 3,
                          **settings}}


# -- the backend contract ------------------------------------------------------------------

def test_backend_gets_the_fullname_and_the_contract_environment(start_daemon, workdir):
    """Broken by: ``--model-name spec.name``; by leaving out any BACKEND_MGMT_* variable."""
    report = os.path.join(workdir, "report.json")
    document = make_config(workdir, models={"Short-1B": ["--report", report]})
    document["supported_models"][0]["fullname"] = "org/Short-Model-1B-Instruct"
    daemon = start_daemon(document)
    reply = daemon.load("Short-1B")
    assert reply["success"], reply
    endpoint = reply["data"]["endpoint"]
    given = read_json(report)
    assert given["model_name"] == "org/Short-Model-1B-Instruct"       # the fullname, not the name
    assert given["ipc_endpoint"] == endpoint
    assert given["env"]["BACKEND_MGMT_ENDPOINT"] == endpoint
    assert given["env"]["BACKEND_MGMT_MODEL"] == "Short-1B"
    assert given["env"]["BACKEND_MGMT_MODEL_NAME"] == "org/Short-Model-1B-Instruct"
    # A client naming the model by its fullname reaches the same backend.
    assert daemon.handshake("org/Short-Model-1B-Instruct").model_ipc_endpoint == endpoint


# -- the model budget ------------------------------------------------------------------------

def test_an_unloading_model_holds_its_slot_until_its_process_is_gone(start_daemon, workdir):
    """Broken by: dropping UNLOADING from the states that hold a slot of max_loaded_models."""
    document = make_config(workdir, models={"a": ["--ignore-sigterm"], "b": []},
                           backends=backends(stop_timeout=1.5), max_loaded_models=1)
    daemon = start_daemon(document)
    a_pid = daemon.load("a")["data"]["model"]["pid"]
    # a ignores SIGTERM, so it stays unloading for stop_timeout: it still holds its memory.
    unloader = threading.Thread(
        target=lambda: daemon.request("unload-model", {"model_name": "a"}, timeout=20))
    unloader.start()
    wait_until(lambda: (m := daemon.model("a")) and m["state"] == "unloading", 5,
               message="a to be unloading")
    result = {}
    loader = threading.Thread(target=lambda: result.update(daemon.load("b")))
    loader.start()
    wait_until(lambda: daemon.request("status")["data"]["queued"] == ["b"], 5,
               message="b to wait for a slot")
    def a_gone():
        a, b = daemon.model("a"), daemon.model("b")
        # a's process is looked at after status: alive now, it was alive when b was shown.
        if b is not None:
            assert not pid_alive(a_pid), "b started while a still held its memory"
        if a is not None:
            assert a["state"] == "unloading"
        return a is None
    wait_until(a_gone, 10, message="a's process to be killed after stop_timeout")
    loader.join(20)
    unloader.join(20)
    assert result["success"], result
    assert not pid_alive(a_pid)


# -- restarts -----------------------------------------------------------------------------------

def test_a_restart_that_fails_to_start_counts_as_another_crash(start_daemon, workdir):
    """Broken by: treating a failed start after a restart as final (a plain load failure)."""
    marker = os.path.join(workdir, "crashed")
    document = make_config(
        workdir, models={"m": ["--exit-after", "0.3", "--crash-once", marker,
                               "--fail-if-exists", marker]},
        backends=backends(restart={"backoff_initial": 0.1, "max_restarts": 3, "window": 60}))
    daemon = start_daemon(document)
    assert daemon.load("m")["success"]
    model = wait_until(lambda: (m := daemon.model("m"))["state"] == "failed" and m, 20,
                       message="the restarts to give up")
    # The first restart failed to start; it was retried until the flapping guard gave up.
    assert model["restarts"] == 3, model
    assert model["error_code"] == "flapping", model
    assert model["last_exit"]["code"] == 4


# -- reloads ----------------------------------------------------------------------------------

def test_a_reload_reports_what_needs_a_service_restart(daemon_factory):
    """Broken by: ``need_restart=()`` in config.diff, or the reply leaving it out."""
    daemon = daemon_factory({"a": []})
    reply = daemon.reconfigure(lambda document: document.update(
        launcher="process", access={"control_mode": "0600"}))
    assert sorted(reply["data"]["need_restart"]) == ["access", "launcher"]
    assert reply["data"]["changed"] is True
    assert "configuration key launcher changed: restart the service" in daemon.log()


def test_the_log_level_applies_on_reload(daemon_factory):
    """Broken by: not setting the root logger's level in Reloader._apply."""
    daemon = daemon_factory({"a": [], "b": []}, logging={"level": "WARNING"})
    assert daemon.load("a")["success"]
    daemon.reconfigure(lambda document: document.update(logging={"level": "INFO"}))
    assert daemon.load("b")["success"]
    # A backend's output is logged at INFO: shown now, not before the reload.
    wait_until(lambda: "[b] INFO reference-backend: starting model b" in daemon.log(), 10,
               message="b's output in the daemon log")
    assert "[a] " not in daemon.log()


def children_running(daemon, words, seen, stop):
    """Collect the command lines of the daemon's children that contain ``words``."""
    while not stop.is_set():
        try:
            for child in psutil.Process(daemon.process.pid).children(recursive=True):
                try:
                    cmdline = " ".join(child.cmdline())
                except psutil.Error:
                    continue
                if words in cmdline:
                    seen.add(child.pid)
        except psutil.NoSuchProcess:
            return
        time.sleep(0.002)


def reload_watching_validation(daemon):
    """reload-config; the reply and how many validation processes the daemon ran for it."""
    seen, stop = set(), threading.Event()
    watcher = threading.Thread(target=children_running,
                               args=(daemon, "backend_mgmt.validate", seen, stop))
    watcher.start()
    try:
        reply = daemon.request("reload-config", timeout=30)
    finally:
        stop.set()
        watcher.join(5)
    return reply, len(seen)


def test_unchanged_config_bytes_are_not_validated_again(daemon_factory):
    """Broken by: removing the same-bytes shortcut in Reloader._next."""
    daemon = daemon_factory({"a": []})
    reply, validations = reload_watching_validation(daemon)
    assert reply["success"] and reply["data"]["changed"] is False
    assert validations == 0
    # The watch does see a validation when there is one: the same document, other bytes.
    with open(daemon.config_path, "a") as stream:
        stream.write("# a comment changes the bytes, not the meaning\n")
    reply, validations = reload_watching_validation(daemon)
    assert reply["success"] and reply["data"]["changed"] is False
    assert validations == 1


# -- liveness -----------------------------------------------------------------------------------

def test_liveness_of_a_backend_without_ping_uses_fresh_handshakes(daemon_factory, workdir):
    """Broken by: skipping liveness checks of backends that do not speak ping."""
    report = os.path.join(workdir, "report.json")
    daemon = daemon_factory({"m": ["--no-ping", "--report", report]}, backends=backends(
        stop_timeout=1, liveness={"interval": 0.3, "failures": 2, "timeout": 0.3},
        restart={"backoff_initial": 0.1}))
    reply = daemon.load("m")
    assert reply["success"] and reply["data"]["protocols"] == []
    pid = reply["data"]["model"]["pid"]
    # Each check is a handshake from a new identity (the daemon's own probe was the first).
    wait_until(lambda: read_json(report)["handshakes"] >= 4, 10,
               message="liveness handshakes")
    assert read_json(report)["pings"] == 0
    os.kill(pid, signal.SIGSTOP)
    model = wait_until(lambda: "hung" in (m := daemon.model("m"))["reason"] and m, 10,
                       message="the hang to be noticed")
    assert model["endpoint"] is None
    model = wait_until(lambda: (m := daemon.model("m"))["state"] == "ready" and
                       m["restarts"] == 1 and m, 10, message="the restart")
    assert model["pid"] != pid and not pid_alive(pid)


# -- the CLI ------------------------------------------------------------------------------------

def test_cli_finds_the_daemon_through_its_environment(daemon_factory, workdir):
    """Broken by: ignoring $BACKEND_MGMT_CONFIG (config_path) or $BACKEND_MGMT_CONTROL."""
    daemon = daemon_factory({"a": []})
    nowhere = f"ipc://{workdir}/nobody-listens.sock"
    # $BACKEND_MGMT_CONFIG instead of --config.
    result = cli("status", "--json", env={"BACKEND_MGMT_CONFIG": daemon.config_path})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["data"]["cli_endpoint"] == daemon.control_endpoint
    # $BACKEND_MGMT_CONTROL wins over the config's endpoint, both ways.
    result = cli("status", "--timeout", "2", "--config", daemon.config_path,
                 env={"BACKEND_MGMT_CONTROL": nowhere})
    assert result.returncode == 69, result
    result = cli("status", "--json", env={"BACKEND_MGMT_CONTROL": daemon.control_endpoint,
                                          "BACKEND_MGMT_CONFIG": f"{workdir}/missing.yaml"})
    assert result.returncode == 0, result.stderr


def test_load_model_keep_alive_from_the_cli(daemon_factory):
    """Broken by: the CLI not sending --keep-alive, or the daemon ignoring params.keep_alive."""
    daemon = daemon_factory({"m": []})                 # keep_alive -1: forever by default
    result = cli("load-model", "m", "--keep-alive", "0.5", "--json",
                 "--config", daemon.config_path)
    assert result.returncode == 0, result.stderr
    model = json.loads(result.stdout)["data"]["model"]
    assert model["keep_alive"] == 0.5 and model["unload_at"] is not None
    wait_until(lambda: daemon.model("m") is None, 10, message="the idle unload")
    assert not pid_alive(model["pid"])


def test_metrics_output_replaces_the_file_atomically(daemon_factory, workdir):
    """Broken by: writing the text into the --output file itself (a reader can see half)."""
    daemon = daemon_factory({"a": []})
    output = os.path.join(workdir, "textfile", "backend_mgmt.prom")
    os.makedirs(os.path.dirname(output))
    with open(output, "w") as stream:
        stream.write("old\n")
    os.link(output, output + ".before")              # the old file, as a reader holds it open
    result = cli("metrics", "--output", output, "--config", daemon.config_path)
    assert result.returncode == 0, result.stderr
    with open(output) as stream:
        text = stream.read()
    assert "backend_mgmt_" in text and text.endswith("\n")
    with open(output + ".before") as stream:
        assert stream.read() == "old\n"               # a new file was renamed over the old one
    assert sorted(os.listdir(os.path.dirname(output))) == \
        ["backend_mgmt.prom", "backend_mgmt.prom.before"]      # no temporary file left


# -- access ------------------------------------------------------------------------------------

@pytest.mark.skipif(os.geteuid() != 0, reason="giving sockets to a group needs root")
def test_non_default_access_modes_and_group(daemon_factory):
    """Broken by: ignoring access.control_mode/handshake_mode/events_mode or access.group."""
    group = grp.getgrgid(1).gr_name                   # any group but root's and the default
    daemon = daemon_factory({"a": []}, access={
        "group": group, "client_group": group, "control_mode": "0600",
        "handshake_mode": "0666", "events_mode": "0640"})
    gid = grp.getgrnam(group).gr_gid

    def mode_and_gid(name):
        info = os.stat(os.path.join(daemon.runtime_dir, name))
        return stat.S_IMODE(info.st_mode), info.st_gid
    assert mode_and_gid("control.sock") == (0o600, gid)
    assert mode_and_gid("handshake.sock") == (0o666, gid)
    assert mode_and_gid("events.sock") == (0o640, gid)
    info = os.stat(daemon.runtime_dir)
    assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o751, gid)
