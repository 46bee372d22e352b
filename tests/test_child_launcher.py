"""The process launcher runs a backend as resources.user (real processes, real users)."""

import grp
import os
import pwd
import subprocess
import uuid

import pytest

from backend_mgmt.config import Resources
from backend_mgmt.launchers.base import LaunchError, LaunchSpec
from backend_mgmt.launchers.child import ChildLauncher
from backend_mgmt.loop import EventLoop

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")


@pytest.fixture
def throwaway_user():
    """A system user made for this test, in a primary and a supplementary group of its own;
    removed afterwards."""
    tag = uuid.uuid4().hex[:8]
    user, extra = f"bmt-u{tag}", f"bmt-g{tag}"
    subprocess.run(["groupadd", "--system", extra], check=True, timeout=30)
    try:
        subprocess.run(["useradd", "--system", "--no-create-home", "--user-group",
                        "--groups", extra, "--shell", "/usr/sbin/nologin", user],
                       check=True, timeout=30)
        try:
            yield user, extra
        finally:
            subprocess.run(["userdel", user], check=False, timeout=30)
    finally:
        subprocess.run(["groupdel", extra], check=False, timeout=30)


def run_backend(argv, resources, timeout=10):
    loop = EventLoop()
    launcher = ChildLauncher(loop, environ={"PATH": "/usr/bin:/bin", "HOME": "/root"})
    lines, exits = [], []

    def on_exit(info):
        exits.append(info)
        loop.stop()
    spec = LaunchSpec(name="m", argv=tuple(argv), env={}, endpoint="ipc:///nonexistent",
                      resources=resources)
    launcher.start(spec, lines.append, on_exit)
    timer = loop.call_later(timeout, loop.stop)
    loop.run()
    timer.cancel()
    loop.close()
    assert exits, f"the backend did not exit within {timeout} s"
    return lines, exits[0]


@needs_root
def test_resources_user_sets_uid_gid_and_supplementary_groups(throwaway_user):
    user, extra = throwaway_user
    entry = pwd.getpwnam(user)
    lines, info = run_backend(["sh", "-c", 'echo "$(id -u) $(id -g) $(id -G) $HOME $USER"'],
                              Resources(user=user))
    assert info.code == 0, lines
    uid, gid, *rest = lines[0].split()
    groups, home, name = set(rest[:-2]), rest[-2], rest[-1]
    assert (int(uid), int(gid)) == (entry.pw_uid, entry.pw_gid)
    assert str(grp.getgrnam(extra).gr_gid) in groups     # its supplementary group
    assert "0" not in groups                              # none of root's
    assert (home, name) == (entry.pw_dir, user)


@needs_root
def test_without_resources_user_the_backend_runs_as_the_daemon():
    lines, info = run_backend(["id", "-u"], Resources())
    assert info.code == 0 and lines == [str(os.geteuid())]


def test_resources_user_needs_a_root_daemon():
    spec = LaunchSpec(name="m", argv=("true",), env={}, endpoint="e",
                      resources=Resources(user="nobody"))
    with pytest.raises(LaunchError, match="needs the daemon to run as root"):
        ChildLauncher._identity(spec, euid=4242)


def test_an_unknown_user_is_a_clear_error():
    spec = LaunchSpec(name="m", argv=("true",), env={}, endpoint="e",
                      resources=Resources(user="no-such-user-xyz"))
    with pytest.raises(LaunchError, match="no such user 'no-such-user-xyz'"):
        ChildLauncher._identity(spec, euid=0)
