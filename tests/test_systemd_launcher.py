"""The systemd launcher's pure parts. Starting real transient units needs systemd as PID 1,
which these machines do not have: tests/system/ does that in a booted container."""

import os
import re
import signal
import sys
import time

import pytest

from backend_mgmt.config import Resources
from backend_mgmt.launchers import systemd
from backend_mgmt.launchers.base import LaunchSpec
from backend_mgmt.launchers.command import run_async
from backend_mgmt.launchers.inotify import DirectoryWatch
from backend_mgmt.loop import EventLoop
from backend_mgmt import unit_exit

VALID_UNIT = re.compile(r"^[A-Za-z0-9:_.\\-]+\.service$")


@pytest.mark.parametrize("name", [
    "Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-8B", "a b c", "--property=User=root",
    "ünïcødé-模型", "../../etc/passwd", "x" * 300, "$(reboot)", "@", "-", "a\nb", ".hidden"])
def test_unit_names_are_valid_and_inert(name):
    unit = systemd.unit_name(name)
    assert VALID_UNIT.match(unit), unit
    assert unit.startswith("backend-mgmt-") and len(unit) < 120
    assert "/" not in unit and " " not in unit and "@" not in unit


def test_unit_names_differ_for_names_that_slug_alike():
    assert systemd.unit_name("a/b") != systemd.unit_name("a b")
    assert systemd.unit_name("Model") != systemd.unit_name("model")


def test_systemd_run_argv_carries_resources_env_and_exit_record():
    spec = LaunchSpec(
        name="m/1", argv=("/usr/bin/python3", "-m", "x", "--ipc-endpoint", "ipc:///run/a b"),
        env={"CUDA_VISIBLE_DEVICES": "0,1", "A": "x y"}, endpoint="ipc:///run/a",
        resources=Resources(memory_max="512M", cpu_quota="200%", user="nobody",
                            properties=(("Nice", "5"),)))
    unit = systemd.unit_name("m/1")
    argv = systemd.systemd_run_argv(spec, unit, "/run/backend-mgmt/units", 7,
                                    python="/usr/bin/python3")
    cut = argv.index("--")
    options, command = argv[:cut], argv[cut + 1:]
    assert command == list(spec.argv)          # passed through untouched, no shell
    assert f"--unit={unit}" in options and "--collect" in options
    assert "--property=MemoryMax=512M" in options
    assert "--property=CPUQuota=200%" in options
    assert "--property=User=nobody" in options and "--property=Nice=5" in options
    assert "--property=TimeoutStopSec=7s" in options
    assert f"--property=SyslogIdentifier={unit[:-8]}" in options
    assert "--setenv=CUDA_VISIBLE_DEVICES=0,1" in options and "--setenv=A=x y" in options
    assert (f"--property=ExecStopPost=+/usr/bin/python3 -m backend_mgmt.unit_exit "
            f"/run/backend-mgmt/units {unit}") in options      # '+' because of User=
    plain = systemd.systemd_run_argv(LaunchSpec(name="m", argv=("x",), env={}, endpoint="e",
                                                resources=Resources()),
                                     "u.service", "/d", 1, python="/p")
    assert "--property=ExecStopPost=/p -m backend_mgmt.unit_exit /d u.service" in plain


@pytest.mark.parametrize("record, expected", [
    ({"result": "success", "exit_code": "exited", "exit_status": "0"}, "exited with code 0"),
    ({"result": "exit-code", "exit_code": "exited", "exit_status": "3"}, "exited with code 3"),
    ({"result": "signal", "exit_code": "killed", "exit_status": "TERM"}, "killed by SIGTERM"),
    ({"result": "core-dump", "exit_code": "dumped", "exit_status": "SEGV"},
     "killed by SIGSEGV"),
    ({"result": "oom-kill", "exit_code": "killed", "exit_status": "KILL"},
     "killed by the out-of-memory killer"),
    ({"result": "resources", "exit_code": "", "exit_status": ""},
     "unit ended with result resources"),
])
def test_exit_records(record, expected):
    assert systemd.exit_info_from_record(record).describe() == expected


def test_unit_exit_helper_writes_the_record_that_is_read_back(tmp_path, monkeypatch):
    monkeypatch.setenv("SERVICE_RESULT", "exit-code")
    monkeypatch.setenv("EXIT_CODE", "exited")
    monkeypatch.setenv("EXIT_STATUS", "137")
    watch = DirectoryWatch(str(tmp_path))
    try:
        assert unit_exit.main([str(tmp_path), "backend-mgmt-x.service"]) == 0
        assert "backend-mgmt-x.service.exit" in watch.names()
    finally:
        watch.close()
    launcher = object.__new__(systemd.SystemdLauncher)
    launcher.state_dir = str(tmp_path)
    info, when = launcher.read_exit("backend-mgmt-x.service")
    assert info.code == 137 and abs(when - time.time()) < 60


def test_run_async_collects_output_and_exit_code():
    loop = EventLoop()
    results = []

    def done(result):
        results.append(result)
        loop.stop()
    run_async(loop, [sys.executable, "-c",
                     "import sys; print('x' * 200000); print('err', file=sys.stderr); "
                     "sys.exit(4)"], done, timeout=20)
    loop.call_later(30, loop.stop)
    loop.run()
    (result,) = results
    assert result.returncode == 4 and len(result.stdout) == 200001
    assert result.stderr == "err\n" and not result.ok


def test_run_async_kills_a_command_past_its_timeout():
    loop = EventLoop()
    results = []
    run_async(loop, ["sleep", "30"], lambda r: (results.append(r), loop.stop()), timeout=0.3)
    loop.call_later(10, loop.stop)
    started = time.monotonic()
    loop.run()
    assert results and results[0].timed_out and results[0].returncode == -signal.SIGKILL
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("cgroup, unit", [
    ("0::/system.slice/backend-mgmt.service\n", "backend-mgmt.service"),       # cgroup v2
    ("12:pids:/system.slice/backend-mgmt.service\n"
     "1:name=systemd:/system.slice/backend-mgmt.service\n0::/\n", "backend-mgmt.service"),
    ("0::/user.slice/user-0.slice/session-3.scope\n", None),                  # a login shell
    ("9:name=systemd:/\n4:memory:/process_api/4579a733\n0::/\n", None),        # a container
    ("0::/init.scope\n", None),
])
def test_own_unit_from_the_cgroup_file(tmp_path, cgroup, unit):
    path = tmp_path / "cgroup"
    path.write_text(cgroup)
    assert systemd.own_unit(str(path)) == unit


def test_own_unit_without_a_cgroup_file_is_none(tmp_path):
    assert systemd.own_unit(str(tmp_path / "missing")) is None
