"""Adoption after a daemon restart, in-process: what the systemd launcher finds (with a
fake `systemctl` on PATH: these machines have no systemd as PID 1; tests/system adopts real
units)."""

import os

import pytest

from backend_mgmt.launchers import records, systemctl
from backend_mgmt.launchers.systemd import SystemdLauncher
from backend_mgmt.loop import EventLoop

from harness import short_tempdir


def unit(name):
    return f"backend-mgmt-{name}.service"


def test_show_of_several_units_is_told_apart_by_id():
    text = ("Id=backend-mgmt-a.service\nActiveState=active\nMainPID=10\n\n"
            "Id=backend-mgmt-b.service\nActiveState=inactive\nMainPID=0\n\n"
            "Id=backend-mgmt-x.service\nActiveState=active\n")
    shown = systemctl.parse_show_many(text, [unit("a"), unit("b"), unit("c")])
    assert shown == {unit("a"): {"Id": unit("a"), "ActiveState": "active", "MainPID": "10"},
                     unit("b"): {"Id": unit("b"), "ActiveState": "inactive", "MainPID": "0"}}
    assert systemctl.parse_show("A=b=c\nnoise\nD=\n") == {"A": "b=c", "D": ""}
    assert systemctl.show_argv(unit("a"), ("MainPID", "Id")) == [
        "systemctl", "show", "--property=Id,MainPID", "--", unit("a")]


@pytest.fixture
def fake_systemctl(tmp_path, monkeypatch):
    """A `systemctl` that logs its arguments and prints what the test put in ``answer``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "systemctl"
    script.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/calls\ncat {tmp_path}/answer\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return tmp_path


def test_recover_asks_systemd_once_about_every_unit(fake_systemctl):
    pid = os.getpid()                     # any live process: the handle watches its pidfd
    runtime_dir = short_tempdir()
    loop = EventLoop()
    launcher = SystemdLauncher(loop, runtime_dir)
    try:
        state_dir = launcher.state_dir

        def record(name, **fields):
            records.write_record(state_dir, records.UnitRecord(
                model=name, unit=unit(name), run="0123abcd0123abcd", pid=pid, **fields))
        record("ready", invocation="i1")
        record("loading")
        record("stopping")
        record("gone")
        record("ended")
        records.write_json(os.path.join(state_dir, records.exit_name(
            unit("ended"), "0123abcd0123abcd")), {"unit": unit("ended"), "result": "signal",
                                                  "exit_code": "killed", "exit_status": "KILL"})
        record("other")
        with open(os.path.join(state_dir, "backend-mgmt-bad.service.json"), "w") as stream:
            stream.write("{garbled")
        (fake_systemctl / "answer").write_text("\n\n".join(
            f"Id={unit(name)}\nActiveState={active}\nMainPID={main}\nInvocationID=i1\n"
            f"ControlGroup=/cg/{name}" for name, active, main in (
                ("gone", "inactive", 0), ("loading", "active", pid),
                ("other", "active", pid + 100000), ("ready", "active", pid),
                ("stopping", "deactivating", pid))) + "\n")
        found = {a.record.model: a for a in launcher.recover()}
        calls = (fake_systemctl / "calls").read_text().splitlines()
        assert len(calls) == 1, calls      # one systemctl show for every unit, not one each
        assert calls[0].split("-- ")[1].split() == [
            unit(n) for n in ("gone", "loading", "other", "ready", "stopping")]
        assert sorted(found) == ["ended", "gone", "loading", "other", "ready", "stopping"]
        ready = found["ready"]
        assert ready.running.pid == pid and ready.ended is None
        assert ready.running.control_group == "/cg/ready"
        assert found["loading"].running is not None and found["stopping"].running is not None
        assert found["ended"].ended.signal == 9 and found["ended"].running is None
        assert "is inactive" in found["gone"].ended.describe()
        assert "runs another process" in found["other"].ended.describe()
        left = sorted(os.listdir(state_dir))
        assert left == sorted(["backend-mgmt-bad.service.json"] + [
            records.record_name(unit(n)) for n in ("loading", "ready", "stopping")])
    finally:
        for handle in list(launcher.units.values()):
            handle._close_pidfd()
        launcher.close()
        loop.close()
