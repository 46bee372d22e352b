"""The runtime dir is trusted only when it is ours; the instance lock (runtime.py)."""

import os
import pwd

import pytest

from backend_mgmt import runtime
from backend_mgmt.runtime import InstanceLock, StartupError


def test_a_new_runtime_dir_is_created_private_then_given_its_mode(tmp_path):
    path = tmp_path / "run"
    runtime.prepare_directory(str(path), "no-such-group-here")
    assert path.is_dir()
    assert path.stat().st_mode & 0o777 == (runtime.DIRECTORY_MODE if os.geteuid() == 0
                                           else 0o700)


def test_a_symlinked_runtime_dir_is_refused(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "run").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(StartupError, match="is a symlink"):
        runtime.prepare_directory(str(tmp_path / "run"), "backend-mgmt")


@pytest.mark.parametrize("mode", [0o770, 0o777, 0o1777, 0o752])
def test_a_group_or_world_writable_runtime_dir_is_refused(tmp_path, mode):
    path = tmp_path / "run"
    path.mkdir()
    os.chmod(path, mode)
    with pytest.raises(StartupError, match="writable by group or others"):
        runtime.prepare_directory(str(path), "backend-mgmt")
    assert path.stat().st_mode & 0o7777 == mode         # left as found


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create a directory for nobody")
def test_a_runtime_dir_someone_else_created_first_is_refused(tmp_path):
    nobody = pwd.getpwnam("nobody")
    path = tmp_path / "run"
    path.mkdir(mode=0o755)
    os.chown(path, nobody.pw_uid, nobody.pw_gid)
    with pytest.raises(StartupError, match=f"belongs to uid {nobody.pw_uid}"):
        runtime.prepare_directory(str(path), "backend-mgmt")


def test_a_file_where_the_runtime_dir_should_be_is_refused(tmp_path):
    (tmp_path / "run").write_text("")
    with pytest.raises(StartupError, match="not a directory"):
        runtime.prepare_directory(str(tmp_path / "run"), "backend-mgmt")


def test_the_non_root_fallback_is_not_a_predictable_shared_path():
    environ = {"HOME": "/home/x"}
    uid = 12345
    chosen = runtime.runtime_dir(None, environ, euid=uid)
    assert not chosen.startswith("/tmp"), chosen
    assert chosen.endswith("/.cache/backend-mgmt")
    assert runtime.runtime_dir(None, {"XDG_RUNTIME_DIR": "/run/user/12345"}, euid=uid) == \
        "/run/user/12345/backend-mgmt"
    assert runtime.runtime_dir(None, {}, euid=0) == "/run/backend-mgmt"


def test_the_lock_file_is_not_followed_through_a_symlink(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / runtime.LOCK_NAME).symlink_to(victim)
    with pytest.raises(StartupError, match="symlink"):
        InstanceLock(str(tmp_path)).acquire()
    assert victim.read_text() == "precious\n"


def test_one_lock_holder_at_a_time(tmp_path):
    first = InstanceLock(str(tmp_path))
    first.acquire()
    try:
        with pytest.raises(StartupError, match=f"pid {os.getpid()}"):
            InstanceLock(str(tmp_path)).acquire()
    finally:
        first.release()
    assert not (tmp_path / runtime.LOCK_NAME).exists()


def test_the_lock_cannot_be_won_by_two_daemons_at_once(tmp_path):
    """A holds the lock; B has opened the lock file and is about to flock it; A exits
    (unlinking the file, then closing it); C starts, creates a new lock file and locks it.
    B's flock on the old, unlinked inode now succeeds too. B must notice that what it
    locked is no longer the lock file, and then find C holding the real one."""
    a, b, c = (InstanceLock(str(tmp_path)) for _ in range(3))
    a.acquire()
    b_fd = b._open()                   # B, between its open() and its flock()
    a.release()
    c.acquire()
    try:
        with pytest.raises(StartupError, match="already running"):
            if not b._lock(b_fd):      # B notices its file is stale and starts over...
                b.acquire()            # ...and meets C
        assert b._fd is None
    finally:
        c.release()
        b.release()
