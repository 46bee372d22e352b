"""The backend-mgmt command against a real daemon (and without one)."""

import json
import os
import subprocess
import sys


from harness import REPO


def cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "backend_mgmt", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": REPO})


def test_no_daemon_exits_69_quickly(daemon_factory, workdir):
    daemon = daemon_factory({"a": []})
    daemon.terminate()
    result = cli("status", "--config", daemon.config_path)
    assert result.returncode == 69
    assert "not reachable" in result.stderr
    result = cli("--json", "status", "--config", daemon.config_path)
    assert result.returncode == 69 and json.loads(result.stdout)["success"] is False


def test_usage_error_exits_2():
    assert cli("load-model").returncode == 2
    assert cli("frobnicate").returncode == 2


def test_status_load_unload_as_a_person_and_as_a_script(daemon_factory):
    daemon = daemon_factory({"demo": [], "bad": ["--fail-at-start", "4"]})
    config = ["--config", daemon.config_path]
    result = cli("load-model", "demo", *config)
    assert result.returncode == 0 and "demo ready at ipc://" in result.stdout
    result = cli("status", *config)
    assert result.returncode == 0
    assert "NAME" in result.stdout and "demo" in result.stdout and "ready" in result.stdout
    # Global options after the subcommand as well as before it.
    result = cli(*config, "--timeout", "5", "status", "--json")
    document = json.loads(result.stdout)
    assert document["success"] and document["data"]["models"][0]["name"] == "demo"
    result = cli("load-model", "bad", *config)
    assert result.returncode == 1
    assert "exited with code 4" in result.stderr and "[load_failed]" in result.stderr
    result = cli("list-models", "--json", *config)
    states = {m["name"]: m["state"] for m in json.loads(result.stdout)["data"]["models"]}
    assert states == {"demo": "ready", "bad": "failed"}
    result = cli("unload-model", "demo", *config)
    assert result.returncode == 0 and "demo unloaded" in result.stdout
    result = cli("unload-model", "demo", "--json", *config)
    assert result.returncode == 1 and json.loads(result.stdout)["code"] == "not_loaded"
    result = cli("stop-service", *config)
    assert result.returncode == 0
    assert daemon.process.wait(15) == 0


def test_timeout_when_daemon_does_not_answer(daemon_factory):
    import signal
    daemon = daemon_factory({"a": []})
    daemon.process.send_signal(signal.SIGSTOP)
    try:
        result = cli("status", "--timeout", "0.5", "--config", daemon.config_path)
        assert result.returncode == 69 and "within 0.5 s" in result.stderr
    finally:
        daemon.process.send_signal(signal.SIGCONT)


def test_check_config_json(tmp_path):
    result = cli("check-config", "--json", "--config",
                 os.path.join(REPO, "etc", "backend-mgmt", "config.yaml"))
    assert result.returncode == 0 and json.loads(result.stdout)["valid"] is True


def test_start_service_without_systemd_then_logs(workdir):
    import yaml
    from harness import make_config, pid_alive, wait_until
    config_path = os.path.join(workdir, "config.yaml")
    with open(config_path, "w") as stream:
        yaml.safe_dump(make_config(workdir, models={"demo": []}), stream)
    config = ["--config", config_path]
    pid = None
    try:
        result = cli("start-service", *config)
        assert result.returncode == 0, result.stderr
        assert "started" in result.stdout
        status = json.loads(cli("status", "--json", *config).stdout)
        pid = status["data"]["pid"]
        assert cli("start-service", *config).stdout.strip() == "backend-mgmt is already running"
        assert cli("load-model", "demo", *config).returncode == 0
        result = cli("logs", "demo", "-n", "1", *config)
        assert result.returncode == 0
        lines = result.stdout.splitlines()
        assert len(lines) == 1 and "[demo]" in lines[0]
        assert cli("stop-service", *config).returncode == 0
        wait_until(lambda: not pid_alive(pid), 15, message="the detached daemon to exit")
    finally:
        if pid and pid_alive(pid):
            os.kill(pid, 9)
