"""The launcher interface (launchers/base.py): what every launcher and every handle offers,
so that the daemon never asks whether a launcher has a method."""

import pytest

from backend_mgmt.launchers.base import Launcher, Running
from backend_mgmt.launchers.child import ChildLauncher, ChildProcess
from backend_mgmt.launchers.systemd import SystemdLauncher, TransientUnit
from backend_mgmt.loop import EventLoop


class Minimal(Launcher):
    name = "minimal"


def test_a_launcher_that_only_starts_has_the_rest_by_default():
    loop = EventLoop()
    try:
        launcher = Minimal(loop)
        assert launcher.recover() == []
        answers = []
        launcher.restart_pending(answers.append)
        assert answers == []                   # answered from the loop, never inside the call
        loop.call_later(0.05, loop.stop)
        loop.run()
        assert answers == [False]              # its backends die with the daemon: a stop
        assert launcher.close() is None
        with pytest.raises(NotImplementedError):
            launcher.start(None, None, None)
    finally:
        loop.close()


def test_a_handle_states_what_the_manager_reads_and_calls():
    handle = Running()
    assert (handle.pid, handle.unit, handle.control_group, handle.exited) == \
        (None, None, None, False)
    assert handle.note_ready(["ping"]) is None and handle.note_ready(None) is None
    ended = []
    handle.set_exit_callback(ended.append)
    assert handle._on_exit == ended.append
    for call in (lambda: handle.stop(1.0), handle.kill):
        with pytest.raises(NotImplementedError):
            call()


def test_both_launchers_and_their_handles_use_the_interface():
    assert issubclass(ChildLauncher, Launcher) and issubclass(SystemdLauncher, Launcher)
    assert issubclass(ChildProcess, Running) and issubclass(TransientUnit, Running)
    assert ChildLauncher.name == "process" and SystemdLauncher.name == "systemd"
    # The child launcher keeps the defaults: nothing survives the daemon.
    assert ChildLauncher.recover is Launcher.recover
    assert ChildLauncher.restart_pending is Launcher.restart_pending
