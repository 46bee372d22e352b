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
        assert listener.recv(4096).startswith(b"READY=1")
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
