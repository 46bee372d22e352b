"""An out-of-memory kill of a child-process backend is reported as such.

Real: the daemon is moved into a memory cgroup of its own with a small limit, and the
reference backend allocates more than that. Needs root and a writable memory cgroup
(v1 or v2); skipped with the reason where there is none."""

import os

import pytest

from backend_mgmt.launchers import oom
from harness import REFERENCE, wait_until

LIMIT = 150 * 1024 * 1024


def memory_cgroup_dir():
    path = oom.counter_file("self")
    return os.path.dirname(path) if path else None


@pytest.fixture
def limited_cgroup():
    parent = memory_cgroup_dir()
    if os.geteuid() != 0 or parent is None or not os.access(parent, os.W_OK):
        pytest.skip("needs root and a writable memory cgroup")
    path = os.path.join(parent, f"bm-oom-{os.getpid()}")
    os.mkdir(path)
    try:
        v1 = os.path.exists(os.path.join(path, "memory.limit_in_bytes"))
        limit_file = "memory.limit_in_bytes" if v1 else "memory.max"
        with open(os.path.join(path, limit_file), "w") as stream:
            stream.write(str(LIMIT))
        if v1 and os.path.exists(os.path.join(path, "memory.memsw.limit_in_bytes")):
            with open(os.path.join(path, "memory.memsw.limit_in_bytes"), "w") as stream:
                stream.write(str(LIMIT))
        yield path
    finally:
        wait_until(lambda: _try_rmdir(path), 10, 0.1, message=f"{path} to be empty")


def _try_rmdir(path):
    try:
        os.rmdir(path)
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


def test_counter_file_parsing(tmp_path, monkeypatch):
    events = tmp_path / "memory.events"
    events.write_text("low 0\nhigh 0\nmax 3\noom 2\noom_kill 2\n")
    assert oom.oom_kills(str(events)) == 2
    assert oom.oom_kills(str(tmp_path / "missing")) is None
    assert oom.counter_file(999999999) is None


def test_oom_killed_child_backend_is_reported(limited_cgroup, daemon_factory):
    # limited_cgroup first: it is torn down last, once the daemon has left it.
    backends = {"reference": {"command": REFERENCE, "restart": {"policy": "no"}}}
    daemon = daemon_factory({"big": ["--hold-memory", "400"]}, backends=backends)
    with open(os.path.join(limited_cgroup, "cgroup.procs"), "w") as stream:
        stream.write(str(daemon.process.pid))     # backends started from now on inherit it
    reply = daemon.load("big")
    assert reply["success"] is False, reply
    assert reply["data"]["last_exit"]["oom_killed"] is True
    assert "killed by the out-of-memory killer" in reply["error"], reply["error"]
    # The daemon itself is small enough to live on.
    assert daemon.request("status")["success"]
    daemon.terminate()
