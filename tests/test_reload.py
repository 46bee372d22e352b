"""Live reconfiguration: reload-config, SIGHUP (what systemctl reload sends)."""

import os
import signal
import socket

import yaml

from harness import make_config, pid_alive, wait_until


def rewrite(daemon, document):
    with open(daemon.config_path, "w") as stream:
        yaml.safe_dump(document, stream)


def names(daemon):
    return [m["name"] for m in daemon.request("list-models")["data"]["models"]]


def test_invalid_config_is_refused_and_nothing_changes(daemon_factory, workdir):
    daemon = daemon_factory({"a": []})
    pid = daemon.load("a")["data"]["model"]["pid"]
    document = make_config(workdir, models={"a": [], "b": []})
    document["supported_models"][1]["type"] = "refrence"
    rewrite(daemon, document)
    reply = daemon.request("reload-config", timeout=30)
    assert reply["success"] is False and reply["code"] == "config_invalid"
    assert reply["data"]["problems"] == [
        f"{daemon.config_path}: supported_models[1].type: no backend for model type "
        f"'refrence' in model_backends (has: reference); did you mean 'reference'?"]
    assert "the running configuration is unchanged" in reply["error"]
    assert names(daemon) == ["a"] and daemon.model("a")["pid"] == pid
    assert "supported_models[1].type: no backend for model type" in daemon.log()


def test_unchanged_config_changes_nothing(daemon_factory):
    daemon = daemon_factory({"a": [], "b": []})
    pids = [daemon.load(n)["data"]["model"]["pid"] for n in ("a", "b")]
    reply = daemon.request("reload-config")
    assert reply["success"] and reply["data"]["changed"] is False
    assert [daemon.model(n)["pid"] for n in ("a", "b")] == pids


def test_add_remove_and_change_models(daemon_factory, workdir):
    daemon = daemon_factory({"keep": [], "gone": [], "edit": []})
    pids = {n: daemon.load(n)["data"]["model"]["pid"] for n in ("keep", "gone", "edit")}
    rewrite(daemon, make_config(workdir, models={"keep": [], "edit": ["--startup-delay", "0.1"],
                                                 "new": []}, default_model="new"))
    reply = daemon.request("reload-config", timeout=30)
    assert reply["success"], reply
    data = reply["data"]
    assert (data["added"], data["removed"], data["changed_models"]) == (["new"], ["gone"],
                                                                         ["edit"])
    assert data["settings"] == ["default_model"]
    assert daemon.model("keep")["pid"] == pids["keep"]          # untouched
    wait_until(lambda: daemon.model("gone") is None and not pid_alive(pids["gone"]), 10,
               message="the removed model to be unloaded")
    edited = wait_until(lambda: (m := daemon.model("edit")) and m["state"] == "ready" and
                        m["pid"] != pids["edit"] and m, 10, message="the changed model back")
    assert not pid_alive(pids["edit"])
    assert sorted(names(daemon)) == ["edit", "keep", "new"]
    assert daemon.load("new")["success"]
    assert daemon.handshake("").model_ipc_endpoint == daemon.model("new")["endpoint"]
    assert edited["restarts"] == 0


def test_sighup_reloads_and_notifies_systemd(daemon_factory, workdir):
    notify_path = os.path.join(workdir, "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(notify_path)
    listener.settimeout(5)
    try:
        daemon = daemon_factory({"a": []}, env={"NOTIFY_SOCKET": notify_path})
        first = listener.recv(4096)
        while first.startswith(b"FDSTORE=1"):       # the listening sockets, before READY=1
            first = listener.recv(4096)
        assert first.startswith(b"READY=1")
        rewrite(daemon, make_config(workdir, models={"a": [], "b": []}))
        daemon.process.send_signal(signal.SIGHUP)
        messages = [listener.recv(4096).decode() for _ in range(2)]
        assert messages[0].startswith("RELOADING=1\nMONOTONIC_USEC=")
        assert messages[1].startswith("READY=1")
        assert sorted(names(daemon)) == ["a", "b"]
    finally:
        listener.close()


def test_cli_reload_config_exit_codes(daemon_factory, workdir):
    from test_cli import cli
    daemon = daemon_factory({"a": []})
    result = cli("reload-config", "--config", daemon.config_path)
    assert result.returncode == 0 and "nothing changed" in result.stdout
    document = make_config(workdir, models={"a": []})
    del document["supported_models"]                  # broken, but the CLI still finds it
    rewrite(daemon, document)
    result = cli("reload-config", "--config", daemon.config_path)
    assert result.returncode == 78
    assert "supported_models: missing (required)" in result.stderr
    assert daemon.model("a") is None and daemon.request("status")["success"]


# --- overlapping reloads and failures during a reload --------------------------------------

import json                                                     # noqa: E402

from backend_mgmt import wire                                   # noqa: E402


class Notifications:
    """A real unix datagram socket as NOTIFY_SOCKET, as systemd listens on it."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.05)
        self.texts = []

    def drain(self):
        while True:
            try:
                self.texts.append(self.sock.recv(4096).decode())
            except socket.timeout:
                return self.texts

    def count(self, prefix):
        return sum(1 for text in self.drain() if text.startswith(prefix))

    def close(self):
        self.sock.close()


def ask_reload(daemon, correlation_id):
    sock = daemon.socket()
    sock.send(wire.encode_control_request("reload-config", None, correlation_id))
    return sock


def answer(sock, timeout=30):
    try:
        assert sock.poll(timeout * 1000), "no reply to reload-config"
        return json.loads(sock.recv())
    finally:
        sock.close(linger=0)


def test_a_reload_asked_for_during_another_is_answered_for_its_own_file(daemon_factory,
                                                                         workdir):
    daemon = daemon_factory({"a": []})
    rewrite(daemon, make_config(workdir, models={"a": [], "b": []}))
    first = ask_reload(daemon, "first")
    wait_until(lambda: "the configuration from" in daemon.log(), 5, 0.001,
               message="the first reload to be taken")
    # The first validation runs in a child process for a few hundred ms: change the file
    # again and ask again while it does.
    rewrite(daemon, make_config(workdir, models={"a": [], "b": [], "c": []}))
    second = ask_reload(daemon, "second")
    first, second = answer(first), answer(second)
    log = daemon.log()
    asked = [i for i, line in enumerate(log.splitlines()) if "the configuration from" in line]
    applied = [i for i, line in enumerate(log.splitlines()) if "configuration reloaded" in line]
    assert len(asked) == 2 and len(applied) == 2, log
    assert asked[1] < applied[0], "the second request came after the first was done; the " \
                                  "test did not overlap them"
    assert first["success"] and first["data"]["added"] == ["b"], first
    assert second["success"] and second["data"]["added"] == ["c"], second
    assert sorted(names(daemon)) == ["a", "b", "c"]
    # Nothing was dropped: the file as it is now is what runs, so another reload is a no-op.
    again = daemon.request("reload-config", timeout=30)
    assert again["success"] and again["data"]["changed"] is False, again


def test_reloads_asked_for_the_same_file_share_one_validation(daemon_factory, workdir):
    daemon = daemon_factory({"a": []})
    rewrite(daemon, make_config(workdir, models={"a": [], "b": []}))
    socks = [ask_reload(daemon, f"r{i}") for i in range(4)]
    replies = [answer(sock) for sock in socks]
    assert [r["data"]["added"] for r in replies] == [["b"]] * 4, replies
    assert [r["correlation_id"] for r in replies] == ["r0", "r1", "r2", "r3"]
    assert daemon.log().count("configuration reloaded") == 1


# Fault injection (the test's only stand-in): the daemon runs with Reloader._apply replaced
# by one that raises on its first call, as a bug or an unexpected state there would. Nothing
# else is replaced; the reload, its validation child and sd_notify are real.
FAIL_FIRST_APPLY = """
from backend_mgmt import reloading as _reloading
_original_apply, _failed = _reloading.Reloader._apply, []
def _apply(self, new, change):
    if not _failed:
        _failed.append(True)
        raise RuntimeError("injected failure while applying a reload")
    return _original_apply(self, new, change)
_reloading.Reloader._apply = _apply
"""


def test_a_failure_during_a_reload_still_ends_with_ready_and_the_next_reload_works(
        daemon_factory, workdir):
    notifications = Notifications(os.path.join(workdir, "notify.sock"))
    try:
        daemon = daemon_factory({"a": []}, env={"NOTIFY_SOCKET": notifications.sock
                                                .getsockname()}, preamble=FAIL_FIRST_APPLY)
        wait_until(lambda: notifications.count("READY=1"), 5, message="READY=1 at start")
        rewrite(daemon, make_config(workdir, models={"a": [], "b": []}))
        failed = daemon.request("reload-config", timeout=30)
        assert failed["success"] is False and failed["code"] == "internal", failed
        assert "injected failure" in failed["error"]
        wait_until(lambda: notifications.count("READY=1") == 2, 5,
                   message="READY=1 after the failed reload")
        assert notifications.count("RELOADING=1") == 1
        assert names(daemon) == ["a"], "the failed reload left the old config in place"

        done = daemon.request("reload-config", timeout=30)
        assert done["success"] and done["data"]["added"] == ["b"], done
        wait_until(lambda: notifications.count("READY=1") == 3, 5,
                   message="READY=1 after the second reload")
        assert notifications.count("RELOADING=1") == 2
        assert sorted(names(daemon)) == ["a", "b"]
    finally:
        notifications.close()


def test_a_reload_that_cannot_even_start_is_answered_and_the_next_works(daemon_factory,
                                                                         workdir):
    """The snapshot the validation reads cannot be written (its path is taken by a
    directory): the request is answered, and the next reload works once it can."""
    daemon = daemon_factory({"a": []})
    snapshot = os.path.join(daemon.runtime_dir, "config-reload.snapshot")
    os.mkdir(snapshot)
    rewrite(daemon, make_config(workdir, models={"a": [], "b": []}))
    failed = daemon.request("reload-config", timeout=30)
    assert failed["success"] is False and failed["code"] == "internal", failed
    os.rmdir(snapshot)
    done = daemon.request("reload-config", timeout=30)
    assert done["success"] and done["data"]["added"] == ["b"], done
