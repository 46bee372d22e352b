"""The systemd launcher's pure parts. Starting real transient units needs systemd as PID 1,
which these machines do not have: tests/system/ does that in a booted container."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

from backend_mgmt.config import Resources
from backend_mgmt.launchers import records, systemd
from backend_mgmt.launchers.base import LaunchSpec
from backend_mgmt.loop import run_async
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
    argv = systemd.systemd_run_argv(spec, unit, "/run/backend-mgmt/units", 7, "0123abcd",
                                    python="/usr/bin/python3")
    cut = argv.index("--")
    options, command = argv[:cut], argv[cut + 1:]
    assert command == list(spec.argv)          # passed through untouched, no shell
    assert f"--unit={unit}" in options and "--collect" in options
    assert "--slice=backend-mgmt.slice" in options
    assert "--property=MemoryMax=512M" in options
    assert "--property=CPUQuota=200%" in options
    assert "--property=User=nobody" in options and "--property=Nice=5" in options
    assert "--property=TimeoutStopSec=7s" in options
    assert f"--property=SyslogIdentifier={unit[:-8]}" in options
    assert f"--property=LogExtraFields=BACKEND_MGMT_MODEL={spec.name}" in options
    assert "--property=MemoryAccounting=yes" in options
    assert "--property=CPUAccounting=yes" in options
    assert "--setenv=CUDA_VISIBLE_DEVICES=0,1" in options and "--setenv=A=x y" in options
    isolated = "/usr/bin/env -i --chdir=/ "
    assert (f"--property=ExecStopPost=+{isolated}/usr/bin/python3 -I -m backend_mgmt.unit_exit "
            f"/run/backend-mgmt/units {unit} 0123abcd") in options      # '+' because of User=
    plain = systemd.systemd_run_argv(LaunchSpec(name="m", argv=("x",), env={}, endpoint="e",
                                                resources=Resources()),
                                     "u.service", "/d", 1, "0123abcd", python="/p")
    assert (f"--property=ExecStopPost={isolated}/p -I -m backend_mgmt.unit_exit /d u.service "
            f"0123abcd") in plain


def test_exit_record_helper_is_isolated_from_what_the_unit_plants(tmp_path):
    """The helper runs as root in the backend's unit: its environment (PYTHONPATH, HOME, ...)
    and working directory are the backend's to choose. Plant a sitecustomize.py on
    PYTHONPATH, a .pth in HOME's user site-packages and a fake backend_mgmt package in the
    working directory, each of which would create a marker; run the command line as systemd
    would (split into words, the unit's environment and working directory): no marker, and a
    record. (What systemd reports about the unit is checked in the booted system test.)"""
    marker = tmp_path / "marker"
    plant = f"import pathlib; pathlib.Path({str(marker)!r}).touch()\n"
    (tmp_path / "pypath").mkdir()
    (tmp_path / "pypath" / "sitecustomize.py").write_text(plant)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    user_site = tmp_path / "home" / ".local" / "lib" / version / "site-packages"
    user_site.mkdir(parents=True)
    (user_site / "evil.pth").write_text(plant)
    (tmp_path / "cwd" / "backend_mgmt").mkdir(parents=True)
    (tmp_path / "cwd" / "backend_mgmt" / "__init__.py").write_text(plant)
    (tmp_path / "cwd" / "backend_mgmt" / "unit_exit.py").write_text(plant)
    state_dir = tmp_path / "units"
    state_dir.mkdir()
    unit, run = "backend-mgmt-x.service", "0123abcd0123abcd"
    unit_env = {"PYTHONPATH": str(tmp_path / "pypath"), "HOME": str(tmp_path / "home"),
                "PYTHONSTARTUP": str(tmp_path / "pypath" / "sitecustomize.py"),
                "PATH": os.environ["PATH"]}
    # Prove the plants work: the same interpreter, not isolated, runs them.
    subprocess.run([sys.executable, "-c", "pass"], env=unit_env, cwd=tmp_path / "cwd",
                   check=True)
    assert marker.exists(), "the planted sitecustomize/.pth did not run: the test proves nothing"
    marker.unlink()
    command = systemd.exit_record_command(sys.executable, str(state_dir), unit, run)
    assert "$" not in command        # systemd 252 mangles '$' after a daemon-reload
    result = subprocess.run(shlex.split(command), env=unit_env, cwd=tmp_path / "cwd",
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert not marker.exists(), "the exit-record helper ran code the unit planted"
    exit_name = records.exit_name(unit, run)
    record = json.loads((state_dir / exit_name).read_text())
    assert record["unit"] == unit and set(record) >= {"result", "exit_code", "exit_status",
                                                       "invocation", "time"}
    assert [p.name for p in state_dir.iterdir()] == [exit_name]     # no temporary left


@pytest.mark.parametrize("properties, expected", [
    ({"Result": "exit-code", "ExecMainCode": "1", "ExecMainStatus": "3", "InvocationID": "ab"},
     ("exit-code", "exited", "3", "ab")),
    ({"Result": "signal", "ExecMainCode": "2", "ExecMainStatus": "9", "InvocationID": "cd"},
     ("signal", "killed", "KILL", "cd")),
    ({"Result": "core-dump", "ExecMainCode": "3", "ExecMainStatus": "11"},
     ("core-dump", "dumped", "SEGV", "")),
    ({"Result": "success", "ExecMainCode": "1", "ExecMainStatus": "0"},
     ("success", "exited", "0", "")),
])
def test_exit_record_from_what_systemd_shows(properties, expected):
    fields = unit_exit.record_from_properties(properties)
    assert (fields["result"], fields["exit_code"], fields["exit_status"],
            fields["invocation"]) == expected
    # and read back as systemd's own variables would be
    record = {"result": fields["result"], "exit_code": fields["exit_code"],
              "exit_status": fields["exit_status"]}
    assert records.exit_info(record) == records.exit_info(
        {"result": expected[0], "exit_code": expected[1], "exit_status": expected[2]})


def test_unit_exit_asks_systemd_when_the_environment_is_clean(tmp_path, monkeypatch):
    for name in ("SERVICE_RESULT", "EXIT_CODE", "EXIT_STATUS", "INVOCATION_ID"):
        monkeypatch.delenv(name, raising=False)
    asked = []

    def ask(unit):
        asked.append(unit)
        return {"result": "exit-code", "exit_code": "exited", "exit_status": "3",
                "invocation": "0123"}
    unit, run = "backend-mgmt-u.service", "0123abcd0123abcd"
    assert unit_exit.main([str(tmp_path), unit, run], ask=ask) == 0
    info, invocation = records.read_exit(str(tmp_path), unit, run)
    assert asked == [unit] and invocation == "0123" and info.code == 3


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
    assert records.exit_info(record).describe() == expected


def test_unit_exit_helper_writes_the_record_that_is_read_back(tmp_path, monkeypatch):
    monkeypatch.setenv("SERVICE_RESULT", "exit-code")
    monkeypatch.setenv("EXIT_CODE", "exited")
    monkeypatch.setenv("EXIT_STATUS", "137")
    monkeypatch.setenv("INVOCATION_ID", "5f3c0ffee")
    unit, run = "backend-mgmt-x.service", "0123abcd0123abcd"
    watch = DirectoryWatch(str(tmp_path))
    try:
        assert unit_exit.main([str(tmp_path), unit, run]) == 0
        names = watch.names()
        assert f"{unit}.{run}.exit" in names
        assert records.parse_exit_name(f"{unit}.{run}.exit") == (unit, run)
    finally:
        watch.close()
    info, invocation = records.read_exit(str(tmp_path), unit, run)
    assert info.code == 137 and invocation == "5f3c0ffee"
    assert records.read_exit(str(tmp_path), unit, "ffffffffffffffff") is None   # other run
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_unit_exit_helper_keeps_the_old_two_argument_form(tmp_path, monkeypatch):
    """Units started before run ids existed still call it with DIR UNIT after an upgrade."""
    monkeypatch.setenv("SERVICE_RESULT", "signal")
    monkeypatch.setenv("EXIT_CODE", "killed")
    monkeypatch.setenv("EXIT_STATUS", "TERM")
    unit = "backend-mgmt-old.service"
    assert unit_exit.main([str(tmp_path), unit]) == 0
    assert records.parse_exit_name(f"{unit}.exit") == (unit, None)
    info, _ = records.read_exit(str(tmp_path), unit, None)
    assert info.signal == signal.SIGTERM


@pytest.mark.parametrize("argv", [["../../etc", "x.service"], ["backend-mgmt-a/../b.service"],
                                  ["backend-mgmt-a.service", "../x"],
                                  ["backend-mgmt-a.service", "XYZ"]])
def test_unit_exit_helper_refuses_names_that_are_not_ours(tmp_path, argv):
    assert unit_exit.main([str(tmp_path), *argv]) == 2
    assert os.listdir(tmp_path) == []


def test_unit_records_round_trip_and_refuse_what_does_not_hold_up(tmp_path):
    unit = "backend-mgmt-demo-1234abcd.service"
    record = records.UnitRecord(model="demo", unit=unit, endpoint="ipc:///run/x.sock",
                                started_at=1.5e9, stop_timeout=7.0, gpus="0,1",
                                run=records.new_run_id(), definition="d" * 32, pid=4242,
                                invocation="abc")
    records.write_record(str(tmp_path), record)
    assert records.read_record(str(tmp_path), unit) == record
    assert records.read_record(str(tmp_path), "backend-mgmt-none.service") is None
    path = tmp_path / records.record_name(unit)
    for bad in ['[]', '{"model": 1, "unit": "%s"}' % unit, '{"model": "m", "unit": "other"}',
                '{"model": "m", "unit": "%s", "pid": 1}' % unit,
                '{"model": "m", "unit": "%s", "started_at": "x"}' % unit,
                '{"model": "m", "unit": "%s", "stop_timeout": 1e400}' % unit,
                '{"model": "m", "unit": "%s", "run": "../x"}' % unit, "not json",
                '{"model": "m", "unit": "%s", "x": "%s"}' % (unit, "y" * 70000)]:
        path.write_text(bad)
        with pytest.raises(records.BadRecord):
            records.read_record(str(tmp_path), unit)
    path.unlink()
    os.symlink("/etc/passwd", path)          # never followed
    with pytest.raises(records.BadRecord):
        records.read_record(str(tmp_path), unit)


def test_definition_digest_ignores_placement_but_not_the_command():
    base = LaunchSpec(name="m", argv=("x", "--a"), env={"A": "1", "CUDA_VISIBLE_DEVICES": "0",
                                                          "NOTIFY_SOCKET": "@a"},
                      endpoint="e", resources=Resources(memory_max="1G"), stop_timeout=5)
    from dataclasses import replace
    assert base.definition == replace(base, env={"A": "1", "CUDA_VISIBLE_DEVICES": "1",
                                                 "NOTIFY_SOCKET": "@b"}).definition
    assert base.definition == replace(base, started_at=123.0).definition
    for changed in (replace(base, argv=("x", "--b")), replace(base, env={"A": "2"}),
                    replace(base, resources=Resources(memory_max="2G")),
                    replace(base, stop_timeout=6)):
        assert changed.definition != base.definition


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
