"""What an operator meets on day one, against the real daemon: errors that say why (permission
versus no daemon, unknown model names), reload verdicts, who asked, readable log lines."""

import json
import os
import pwd
import subprocess
import sys

import pytest

from backend_mgmt import config as config_module
from harness import REPO, wait_until


def cli(*args, env=None, user=None, timeout=60):
    def become_user():
        entry = pwd.getpwnam(user)
        os.setgroups([])
        os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)
    return subprocess.run([sys.executable, "-m", "backend_mgmt", *args], capture_output=True,
                          text=True, timeout=timeout,
                          preexec_fn=become_user if user is not None else None,
                          env={**os.environ, "PYTHONPATH": REPO, **(env or {})})


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switches to user nobody")


@needs_root
def test_a_user_who_may_not_use_the_socket_is_told_it_is_about_permission(daemon_factory):
    daemon = daemon_factory({"demo": []})
    endpoint = daemon.request("status")["data"]["cli_endpoint"]
    result = cli("status", env={"BACKEND_MGMT_CONTROL": endpoint}, user="nobody")
    assert result.returncode == 69, result.stdout + result.stderr
    assert "permission denied" in result.stderr, result.stderr
    assert "does not exist" not in result.stderr and "not reachable" not in result.stderr
    # Without a daemon it is still "no daemon", not a permission problem.
    path = endpoint[len("ipc://"):]
    daemon.terminate()
    result = cli("status", env={"BACKEND_MGMT_CONTROL": endpoint})
    assert result.returncode == 69 and "does not exist" in result.stderr, result.stderr
    assert not os.path.exists(path)


def test_logs_of_an_unknown_model_is_an_error_with_a_suggestion(daemon_factory):
    daemon = daemon_factory({"demo": []})
    result = cli("logs", "Demo", "--config", daemon.config_path)
    assert result.returncode == 1 and "did you mean 'demo'" in result.stderr, result.stderr
    result = cli("logs", "nosuch", "--config", daemon.config_path)
    assert result.returncode == 1 and "unknown model 'nosuch'" in result.stderr
    assert "configured: demo" in result.stderr, result.stderr
    result = cli("logs", "nosuch", "--json", "--config", daemon.config_path)
    assert result.returncode == 1 and json.loads(result.stdout)["code"] == "unknown_model"


def test_reload_of_an_invalid_config_exits_78_with_and_without_json(daemon_factory):
    daemon = daemon_factory({"demo": []})
    with open(daemon.config_path, "a") as stream:
        stream.write("\nmodle_backends: {}\n")
    for extra in ([], ["--json"]):
        result = cli("reload-config", "--config", daemon.config_path, *extra)
        assert result.returncode == 78, (extra, result.stdout, result.stderr)
    reply = json.loads(result.stdout)
    assert reply["code"] == "config_invalid" and reply["data"]["problems"]
    assert "configuration not reloaded" in daemon.log()


def test_changes_are_logged_with_who_asked_and_reloads_in_words(daemon_factory):
    daemon = daemon_factory({"demo": []})
    assert cli("load-model", "demo", "--config", daemon.config_path).returncode == 0
    me = pwd.getpwuid(os.geteuid()).pw_name
    wait_until(lambda: f"load-model demo requested by user {me} (uid {os.geteuid()}, pid "
               in daemon.log(), timeout=10, message="the request logged with its sender")
    assert "status requested" not in daemon.log()        # only what changes something
    daemon.reconfigure(lambda document: document["supported_models"].append(
        {"name": "echo", "type": "reference"}))
    wait_until(lambda: "configuration reloaded: models added: echo" in daemon.log(),
               timeout=30, message="the reload logged in words")
    assert "{'changed'" not in daemon.log()


def test_status_table_shows_no_uptime_for_a_failed_model(daemon_factory):
    daemon = daemon_factory({"bad": ["--fail-at-start", "4"]})
    cli("load-model", "bad", "--config", daemon.config_path)
    result = cli("status", "--config", daemon.config_path)
    row = next(line for line in result.stdout.splitlines() if line.startswith("bad "))
    assert " failed " in row and " 0s " not in row, row
    entry = daemon.model("bad")
    assert entry["unit"] is None and entry["unit_active"] is None
    assert any("failing at start" in line for line in entry["output"]), entry


def test_start_service_json_when_already_running(daemon_factory):
    daemon = daemon_factory({"demo": []})
    result = cli("start-service", "--json", "--config", daemon.config_path,
                 env={"BACKEND_MGMT_CONTROL": daemon.request("status")["data"]["cli_endpoint"]})
    document = json.loads(result.stdout)
    assert result.returncode == 0 and document["success"] is True, result.stdout


def test_describe_change_in_words():
    change = config_module.ConfigChange(added=("a", "b"), need_restart=("access",))
    assert config_module.describe_change(change.as_dict()) == \
        "models added: a, b; changed but needs a service restart: access"
    assert config_module.describe_change(config_module.ConfigChange().as_dict()) == \
        "nothing changed"


def test_check_config_reports_schema_and_cross_field_problems_in_one_run(workdir):
    path = os.path.join(workdir, "config.yaml")
    with open(path, "w") as stream:
        stream.write("model_backends:\n  reference: r.py\nsupported_models:\n"
                     "  - {name: a, type: referense}\nmodle: 1\n")
    result = cli("check-config", "--config", path)
    assert result.returncode == 78
    assert "modle: unknown key" in result.stderr, result.stderr
    assert "supported_models[0].type: no backend for model type 'referense'" in result.stderr


def test_the_daemon_runs_from_a_source_tree_on_pythonpath(workdir):
    """Debian's interpreter with the source tree on PYTHONPATH (as the benchmarks run it):
    the isolated validation child (python -I ignores PYTHONPATH) still finds the package."""
    from harness import Daemon, make_config
    document = make_config(workdir, models={"demo": []})
    daemon = Daemon(document, directory=workdir,
                    env={"PYTHONPATH": REPO, "PATH": os.environ["PATH"]})
    daemon.python = "/usr/bin/python3"
    try:
        daemon.start()
        assert daemon.request("status")["success"]
    finally:
        daemon.close()
