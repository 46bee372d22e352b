"""Adoption after a daemon restart, in-process: what the systemd launcher finds (with a
fake `systemctl` on PATH: these machines have no systemd as PID 1; tests/system adopts real
units), and what the manager makes of it (with a fake handle at the launcher boundary)."""

import os
import subprocess
import time

import pytest
import zmq

from backend_mgmt import config, states
from backend_mgmt.launchers import records, systemctl, systemd
from backend_mgmt.launchers.base import Running
from backend_mgmt.launchers.systemd import SystemdLauncher
from backend_mgmt.loop import EventLoop
from backend_mgmt.manager import BackendManager
from backend_mgmt.runtime import StartupError

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
    listed = systemctl.parse_list_units(
        f"{unit('a')} loaded active running backend-mgmt model a b\n"
        f"{unit('b')} loaded deactivating stop-sigterm backend-mgmt model b\n\nnoise\n")
    assert listed == {unit("a"): "active", unit("b"): "deactivating"}


@pytest.fixture
def fake_systemctl(tmp_path, monkeypatch):
    """A `systemctl` that logs its arguments and prints what the test put in ``list-units``
    or ``show``, by subcommand."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "systemctl"
    script.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/calls\ncat {tmp_path}/"$1"\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return tmp_path


@pytest.fixture
def processes():
    """Live processes to stand for backends (the launcher watches their pidfds)."""
    started = []

    def start():
        started.append(subprocess.Popen(["sleep", "60"]))
        return started[-1].pid
    yield start
    for process in started:
        process.kill()
        process.wait()


def test_recover_asks_systemd_once_and_says_which_were_ready(fake_systemctl, processes,
                                                            monkeypatch):
    pids = {name: processes() for name in ("ready", "loading", "stopping", "other",
                                           "nopid", "moved")}
    # Where the kernel puts each process: "moved" runs in another unit's group now.
    cgroups = {pids[name]: f"/backend-mgmt.slice/{unit(name)}" for name in pids}
    cgroups[pids["moved"]] = "/system.slice/else.service"
    monkeypatch.setattr(systemd, "service_cgroup", lambda path: cgroups.get(
        int(path.split("/")[2])))
    runtime_dir = short_tempdir()
    loop = EventLoop()
    launcher = SystemdLauncher(loop, runtime_dir)
    try:
        state_dir = launcher.state_dir

        def record(name, **fields):
            records.write_record(state_dir, records.UnitRecord(
                model=name, unit=unit(name), run="0123abcd0123abcd", **fields))
        record("ready", pid=pids["ready"], ready_at=1.0, protocols=("ping",),
               invocation="i1")
        record("loading", pid=pids["loading"])
        record("stopping", pid=pids["stopping"], ready_at=1.0, protocols=("ping",))
        record("gone", pid=pids["ready"])
        record("failed", pid=pids["ready"])
        record("ended", pid=pids["ready"])
        records.write_json(os.path.join(state_dir, records.exit_name(
            unit("ended"), "0123abcd0123abcd")), {"unit": unit("ended"), "result": "signal",
                                                  "exit_code": "killed", "exit_status": "KILL"})
        record("other", pid=pids["moved"])
        record("nopid")
        with open(os.path.join(state_dir, "backend-mgmt-bad.service.json"), "w") as stream:
            stream.write("{garbled")
        (fake_systemctl / "list-units").write_text("".join(
            f"{unit(name)} loaded {active} {sub} backend-mgmt model {name}\n"
            for name, active, sub in (("ready", "active", "running"),
                                      ("loading", "active", "running"),
                                      ("stopping", "deactivating", "stop-sigterm"),
                                      ("failed", "failed", "failed"),
                                      ("other", "active", "running"),
                                      ("nopid", "active", "running"),
                                      ("elses", "active", "running"))))
        # Asked only about what the list and the kernel do not settle.
        (fake_systemctl / "show").write_text(
            f"Id={unit('nopid')}\nActiveState=active\nMainPID={pids['nopid']}\n"
            f"InvocationID=i2\nControlGroup=/cg/nopid\n\n"
            f"Id={unit('other')}\nActiveState=active\nMainPID={pids['other']}\n"
            f"InvocationID=i3\nControlGroup=/cg/other\n")
        found = {a.record.model: a for a in launcher.recover()}
        calls = (fake_systemctl / "calls").read_text().splitlines()
        assert [call.split()[0] for call in calls] == ["list-units", "show"], calls
        assert calls[1].split("-- ")[1].split() == [unit("nopid"), unit("other")]
        assert sorted(found) == ["ended", "failed", "gone", "loading", "nopid", "other",
                                 "ready", "stopping"]
        ready = found["ready"]
        assert ready.was_ready and ready.running.pid == pids["ready"] and ready.ended is None
        assert ready.running.control_group == f"/backend-mgmt.slice/{unit('ready')}"
        assert ready.running.record.invocation == "i1"
        assert not found["loading"].was_ready and found["loading"].running is not None
        assert not found["stopping"].was_ready      # being stopped: unloaded, not served
        assert found["stopping"].running is not None and found["stopping"].stopping
        assert not any(found[name].stopping for name in ("ready", "loading", "nopid"))
        assert found["nopid"].running.pid == pids["nopid"]
        assert found["nopid"].running.control_group == "/cg/nopid"
        assert found["ended"].ended.signal == 9 and found["ended"].running is None
        assert "is gone" in found["gone"].ended.describe()
        assert "is failed" in found["failed"].ended.describe()
        assert "runs another process" in found["other"].ended.describe()
        left = sorted(os.listdir(state_dir))
        assert left == sorted(["backend-mgmt-bad.service.json"] + [
            records.record_name(unit(n)) for n in ("loading", "nopid", "ready", "stopping")])
    finally:
        for handle in list(launcher.units.values()):
            handle._close_pidfd()
        launcher.close()
        loop.close()


def test_recover_asks_systemd_about_each_unit_when_the_list_fails(fake_systemctl, processes):
    pid = processes()
    runtime_dir = short_tempdir()
    loop = EventLoop()
    launcher = SystemdLauncher(loop, runtime_dir)
    try:
        records.write_record(launcher.state_dir, records.UnitRecord(
            model="a", unit=unit("a"), run="0123abcd0123abcd", pid=pid))
        # no list-units answer: cat fails, as systemctl would
        (fake_systemctl / "show").write_text(
            f"Id={unit('a')}\nActiveState=active\nMainPID={pid}\nInvocationID=i\n")
        (found,) = launcher.recover()
        assert found.running.pid == pid
        calls = (fake_systemctl / "calls").read_text().splitlines()
        assert [call.split()[0] for call in calls] == ["list-units", "show"], calls
    finally:
        for handle in list(launcher.units.values()):
            handle._close_pidfd()
        launcher.close()
        loop.close()


class FakeUnit(Running):
    """The launcher boundary: a running unit that records what the manager asks of it."""
    unit = "backend-mgmt-demo.service"
    pid = 4242

    def __init__(self):
        self.stopped = []
        self.noted = []

    def stop(self, timeout):
        self.stopped.append(timeout)

    def kill(self):
        self.stopped.append("kill")

    def note_ready(self, protocols):
        self.noted.append(protocols)


@pytest.fixture
def manager():
    directory = short_tempdir()
    document = {"runtime_dir": directory,
                "model_backends": {"t": {"command": ["x"], "startup_timeout": 0.3}},
                "supported_models": [{"name": "demo", "type": "t"}]}
    loop = EventLoop()
    context = zmq.Context()
    manager = BackendManager(loop, context, config.from_document(document), None, directory)
    yield manager
    context.destroy(linger=0)
    loop.close()


def adoption(was_ready, endpoint):
    record = records.UnitRecord(model="demo", unit=FakeUnit.unit, endpoint=endpoint,
                                started_at=time.time() - 60, ready_at=time.time() - 50,
                                protocols=("ping",))
    return records.Adoption(record, running=FakeUnit(), was_ready=was_ready)


def test_an_adopted_backend_that_was_ready_is_ready_at_once_and_hung_if_it_does_not_answer(
        manager):
    seen = []
    manager.registry.listeners.append(lambda b, old, new: seen.append(new))
    found = adoption(True, f"ipc://{manager.runtime_dir}/nobody.sock")
    manager.adopt([found])
    backend = manager.registry.get("demo")
    # Ready before the loop ever runs: the first handshake gets it.
    assert backend.state == states.READY and backend.protocols == ["ping"]
    assert backend.ready_at == found.record.ready_at
    # Told it is ready (a real unit writes nothing: its record says so already).
    assert found.running.noted == [["ping"]]
    assert manager.ready_backend("demo") is backend
    manager.loop.call_later(1.0, manager.loop.stop)
    manager.loop.run()
    # Nobody answered within startup_timeout: hung, stopped; its exit takes the restart path.
    assert found.running.stopped == [backend.spec.stop_timeout]
    assert backend.phase == states.STOPPING_HUNG
    assert "adopted backend failed its handshake" in backend.stop_reason
    assert seen == [states.LOADING, states.READY]


def test_an_adopted_backend_not_known_ready_is_probed_as_loading(manager):
    found = adoption(False, f"ipc://{manager.runtime_dir}/nobody.sock")
    manager.adopt([found])
    backend = manager.registry.get("demo")
    assert backend.state == states.LOADING
    assert found.running.noted == [None]    # its stale readiness is cleared in the record
    manager._stop_watching_startup(backend)


def test_recover_refuses_to_start_when_systemd_cannot_say_how_the_units_are(fake_systemctl,
                                                                           processes):
    """A unit systemd cannot answer for is not counted as gone (its record forgotten while it
    may still run and hold its GPU): the daemon does not start, and the record stays for the
    next try."""
    pid = processes()
    runtime_dir = short_tempdir()
    loop = EventLoop()
    launcher = SystemdLauncher(loop, runtime_dir)
    try:
        record = records.UnitRecord(model="a", unit=unit("a"), run="0123abcd0123abcd", pid=pid)
        records.write_record(launcher.state_dir, record)
        # Neither list-units nor show answers: cat fails, as a systemctl without systemd would.
        with pytest.raises(StartupError, match="not starting without them"):
            launcher.recover()
        assert os.path.exists(os.path.join(launcher.state_dir, records.record_name(unit("a"))))
    finally:
        launcher.close()
        loop.close()


# -- the listing begun early (start-up: cli.cmd_serve) ---------------------------------------

def test_recover_takes_the_listing_begun_before_it(fake_systemctl, processes, monkeypatch):
    """Broken by: _unit_states starting a listing of its own instead of taking the launcher's:
    systemctl is asked twice, and the answer is the later one."""
    pid = processes()
    monkeypatch.setattr(systemd, "service_cgroup", lambda path: f"/backend-mgmt.slice/{unit('a')}")
    (fake_systemctl / "list-units").write_text(f"{unit('a')} loaded active running a\n")
    listing = systemd.UnitListing.start()
    listing.process.wait(10)
    (fake_systemctl / "list-units").write_text(f"{unit('a')} loaded failed failed a\n")
    loop = EventLoop()
    launcher = SystemdLauncher(loop, short_tempdir(), listing)
    try:
        records.write_record(launcher.state_dir, records.UnitRecord(
            model="a", unit=unit("a"), run="0123abcd0123abcd", pid=pid))
        [found] = launcher.recover()
        assert found.running is not None and found.running.pid == pid
        calls = (fake_systemctl / "calls").read_text().splitlines()
        assert [call.split()[0] for call in calls] == ["list-units"]
    finally:
        launcher.close()
        loop.close()


def test_a_listing_no_launcher_takes_is_ended(fake_systemctl, monkeypatch):
    """Broken by: Service._choose_launcher keeping the listing when it picks the process
    launcher (close_unit_listing not called): the systemctl child is left running."""
    from backend_mgmt.daemon import Service
    (fake_systemctl / "list-units").write_text("")
    script = fake_systemctl / "bin" / "systemctl"
    script.write_text("#!/bin/sh\nexec sleep 30\n")
    listing = systemd.UnitListing.start()
    cfg = config.from_document({"model_backends": {"t": {"command": ["x"]}},
                                "supported_models": [{"name": "m", "type": "t"}],
                                "runtime_dir": short_tempdir(), "launcher": "process"})
    service = Service(cfg, environ={}, unit_listing=listing)
    try:
        launcher = service._choose_launcher()
        assert launcher.name == "process"
        assert listing.process.poll() is not None
    finally:
        listing.close()
        service.loop.close()
        service.context.destroy(linger=0)
