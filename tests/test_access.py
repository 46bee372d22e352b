"""Backend endpoints: the model's own directory, and the socket checked and given to the
clients' group before it is handed out (access.py); then with the real daemon."""

import grp
import os
import pwd
import socket
import stat

import pytest

from backend_mgmt import access
from harness import REFERENCE

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="changing owners needs root")


def bind_socket(path, umask=0):
    old = os.umask(umask)
    try:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
    finally:
        os.umask(old)
    return sock


def clients_owner(uid=None):
    """An Owner whose clients' group is 'nogroup' (any group other than ours would do)."""
    gid = grp.getgrnam("nogroup").gr_gid
    return access.Owner(uid=os.geteuid() if uid is None else uid, gid=os.getegid(),
                        client_gid=gid)


@needs_root
def test_model_directory_belongs_to_the_backend_user_and_the_clients(tmp_path):
    nobody = pwd.getpwnam("nobody")
    path = tmp_path / "models" / "demo"
    owner = clients_owner(uid=nobody.pw_uid)
    access.prepare_model_directory(str(path), owner)
    st = path.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == \
        (nobody.pw_uid, owner.client_gid, 0o750)
    assert stat.S_IMODE((tmp_path / "models").stat().st_mode) == 0o755
    access.prepare_model_directory(str(path), owner)          # again: idempotent


def test_a_symlink_in_place_of_the_model_directory_is_refused(tmp_path):
    (tmp_path / "models").mkdir(mode=0o755)
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    (tmp_path / "models" / "demo").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(access.AccessError, match="not a directory"):
        access.prepare_model_directory(str(tmp_path / "models" / "demo"), clients_owner())
    assert stat.S_IMODE((tmp_path / "elsewhere").stat().st_mode) == 0o700   # not chmodded


@needs_root
def test_the_socket_gets_the_clients_group_and_0660_whatever_the_umask(tmp_path):
    path = tmp_path / "backend.sock"
    sock = bind_socket(path, umask=0)            # created 0777 (0755 with umask 022 is as bad)
    try:
        owner = clients_owner()
        access.secure_socket(str(path), owner)
        st = os.lstat(path)
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, owner.client_gid)
    finally:
        sock.close()


def test_a_symlink_instead_of_the_socket_is_refused_and_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("x")
    os.chmod(victim, 0o600)
    (tmp_path / "backend.sock").symlink_to(victim)
    with pytest.raises(access.AccessError, match="not a socket"):
        access.secure_socket(str(tmp_path / "backend.sock"), clients_owner())
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600


def test_a_regular_file_instead_of_the_socket_is_refused(tmp_path):
    (tmp_path / "backend.sock").write_text("")
    with pytest.raises(access.AccessError, match="not a socket"):
        access.secure_socket(str(tmp_path / "backend.sock"), clients_owner())


@needs_root
def test_a_socket_of_another_user_is_refused(tmp_path):
    """E.g. a hard link the backend's user made to someone else's socket."""
    path = tmp_path / "backend.sock"
    sock = bind_socket(path)
    try:
        nobody = pwd.getpwnam("nobody").pw_uid
        os.chown(path, nobody, -1)                  # someone's: neither root nor the backend's
        backend_user = access.Owner(uid=nobody - 1, gid=0, client_gid=None)
        with pytest.raises(access.AccessError, match="not to the backend's user"):
            access.secure_socket(str(path), backend_user)
    finally:
        sock.close()


def test_a_socket_with_two_links_is_refused(tmp_path):
    path = tmp_path / "backend.sock"
    sock = bind_socket(path)
    try:
        os.link(path, tmp_path / "other")
        with pytest.raises(access.AccessError, match="2 links"):
            access.secure_socket(str(path), clients_owner())
    finally:
        sock.close()


def test_backend_endpoint_is_in_the_models_own_directory_and_0660(daemon_factory):
    """A backend with umask 0 still gets a 0660 socket before its endpoint is handed out,
    in <runtime dir>/models/<model>/, which is removed once the backend is gone."""
    backends = {"reference": {"command": ["sh", "-c", 'umask 000; exec "$0" "$@"',
                                          *REFERENCE]}}
    daemon = daemon_factory({"demo": []}, backends=backends)
    reply = daemon.load("demo")
    assert reply["success"], reply
    path = reply["data"]["endpoint"][len("ipc://"):]
    assert os.path.dirname(os.path.dirname(path)) == os.path.join(daemon.runtime_dir, "models")
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o750
    assert daemon.request("unload-model", {"model_name": "demo"})["success"]
    assert not os.path.exists(os.path.join(daemon.runtime_dir, "models"))
