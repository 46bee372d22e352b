"""Exhaustion fails cleanly: file descriptors, waiting handshakes, partial messages, the
event socket. Against the real daemon, started with a low RLIMIT_NOFILE (soft and hard)."""

import json
import os
import resource
import signal
import time

import psutil
import pytest
import zmq

from backend_mgmt import wire

from harness import pid_alive, wait_until


@pytest.fixture
def context():
    ctx = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, 4096)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    yield ctx
    ctx.destroy(linger=0)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def status_on(sock, correlation_id, timeout=5.0):
    sock.send(wire.encode_control_request("status", None, correlation_id))
    if not sock.poll(int(timeout * 1000)):
        return None
    return json.loads(sock.recv())


def idle_clients(context, endpoint, count):
    socks = []
    for _ in range(count):
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        socks.append(sock)
    return socks


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_idle_connections_cannot_make_libzmq_abort_the_daemon(daemon_factory, context):
    """libzmq 4.3.4 aborts the process when accept() on an ipc socket fails with EMFILE
    (reproduced here before the fix: 300 idle connections to a daemon with a limit of 128
    killed it with SIGABRT). Now the daemon closes the flooded listener's connections before
    its limit, and accepts there again after a pause; the other sockets keep serving."""
    daemon = daemon_factory({"demo": []}, nofile=(256, 256))
    operator = context.socket(zmq.DEALER)
    operator.setsockopt(zmq.LINGER, 0)
    operator.connect(daemon.control_endpoint)
    assert status_on(operator, "before")["success"]
    for endpoint in (daemon.handshake_endpoint, daemon.control_endpoint):
        crowd = idle_clients(context, endpoint, 400)
        try:
            wait_until(lambda: daemon.log().count("not accepting new connections there") >= (
                1 if endpoint == daemon.handshake_endpoint else 2), 20,
                message=f"the daemon to stop accepting on {endpoint}")
            assert daemon.process.poll() is None, daemon.log()[-2000:]
            assert fd_count(daemon.process.pid) < 256
            if endpoint == daemon.handshake_endpoint:
                # The operator's control connection was never touched.
                reply = status_on(operator, "during")
                assert reply is not None and reply["success"], reply
        finally:
            for sock in crowd:
                sock.close(linger=0)
        time.sleep(0.2)
        assert daemon.process.poll() is None, daemon.log()[-2000:]
    # The crowd is gone: the daemon serves again, old client and new.
    wait_until(lambda: daemon.log().count("accepting new connections on") >= 2, 20,
               message="the daemon to accept again")
    late = context.socket(zmq.DEALER)
    late.setsockopt(zmq.LINGER, 0)
    late.connect(daemon.control_endpoint)
    try:
        reply = status_on(late, "after", timeout=10)
        assert reply is not None and reply["success"], "a new client is served again"
        try:
            assert daemon.handshake("demo", timeout=20).model_ipc_endpoint
        except TimeoutError:
            raise AssertionError(daemon.log()[-6000:])
    finally:
        late.close(linger=0)
        operator.close(linger=0)
    assert "Too many open files" not in daemon.log()
    assert daemon.process.poll() is None


def test_connections_are_counted_as_they_come_and_go(daemon_factory, context):
    daemon = daemon_factory({"demo": []}, nofile=(1024, 1024))
    connections = lambda: daemon.request("status")["data"]["connections"]   # noqa: E731
    base = connections()
    assert 0 < base["budget"] < 1024 - 128
    crowd = idle_clients(context, daemon.handshake_endpoint, 50)
    try:
        wait_until(lambda: connections()["open"] >= base["open"] + 50, 10,
                   message="50 more connections counted")
    finally:
        for sock in crowd:
            sock.close(linger=0)
    wait_until(lambda: connections()["open"] <= base["open"] + 1, 10,
               message="the closed connections to be counted out")
    assert connections()["resets"] == 0


MODELS = 12
NOFILE_FOR_LOADS = 48


def test_loads_past_the_file_descriptor_limit_fail_cleanly_and_the_daemon_recovers(
        daemon_factory, context):
    """Many loads at once with a low limit: each load answers (ready, or failed with the
    reason), none stays loading, no backend runs that status does not show, the daemon
    does not abort, and the failed ones load once descriptors are free again. Every request
    goes over one connection made beforehand: an accept() that hits EMFILE would make libzmq
    abort, which is what the connection budget keeps away from real limits."""
    models = {f"m{i}": ["--startup-delay", "0.5"] for i in range(MODELS)}
    daemon = daemon_factory(models, nofile=(NOFILE_FOR_LOADS, NOFILE_FOR_LOADS))
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(daemon.control_endpoint)
    try:
        assert status_on(sock, "warm")["success"]
        print(f"daemon fds at rest: {fd_count(daemon.process.pid)} of {NOFILE_FOR_LOADS}")
        for name in models:
            sock.send(wire.encode_control_request("load-model", {"model_name": name}, name))
        replies = {}
        deadline = time.monotonic() + 60
        while len(replies) < len(models):
            assert sock.poll(max(1, int((deadline - time.monotonic()) * 1000))), (
                f"loads not answered: {sorted(set(models) - set(replies))}")
            reply = json.loads(sock.recv())
            replies[reply["correlation_id"]] = reply
        failed = {name: r for name, r in replies.items() if not r["success"]}
        print(f"{len(models) - len(failed)} loads ready, {len(failed)} failed: "
              f"{sorted({r['error'] for r in failed.values()})}")
        assert failed, "the limit was not reached: lower NOFILE_FOR_LOADS"
        for reply in failed.values():
            assert reply["code"] in ("load_failed", "startup_timeout"), reply
            assert "open files" in reply["error"] or "file descriptor" in reply["error"], reply
        assert daemon.process.poll() is None, daemon.log()[-3000:]
        status = status_on(sock, "after")["data"]
        states = {m["name"]: m["state"] for m in status["models"]}
        assert "loading" not in states.values(), states
        shown = {m["pid"] for m in status["models"] if m["pid"]}
        wait_until(lambda: {p for p in daemon.backend_pids() if pid_alive(p)} <= shown, 10,
                   message="no backend process that status does not show")
        daemon.seen_pids.update(shown)
        # Recovery: unload everything, then load (and unload) the ones that failed, one at a
        # time.
        for name in models:
            sock.send(wire.encode_control_request("unload-model", {"model_name": name}, name))
        for _ in models:
            assert sock.poll(30000), "unload not answered"
            sock.recv()
        for name in failed:
            sock.send(wire.encode_control_request("load-model", {"model_name": name}, name))
            assert sock.poll(30000), f"load of {name} not answered"
            reply = json.loads(sock.recv())
            assert reply["success"], reply
            daemon.seen_pids.add(reply["data"]["model"]["pid"])
            sock.send(wire.encode_control_request("unload-model", {"model_name": name}, name))
            assert sock.poll(30000), f"unload of {name} not answered"
            assert json.loads(sock.recv())["success"]
    finally:
        sock.close(linger=0)
    assert "Too many open files (src/" not in daemon.log()
    assert daemon.process.poll() is None


def nofile_of(pid):
    with open(f"/proc/{pid}/limits") as stream:
        for line in stream:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    raise AssertionError("no 'Max open files' line")


def test_soft_limit_raised_to_hard_and_backends_get_the_inherited_one(daemon_factory):
    daemon = daemon_factory({"demo": []}, nofile=(256, 2048))
    assert nofile_of(daemon.process.pid) == (2048, 2048)
    assert "file descriptor limit raised from 256 to 2048" in daemon.log()
    pid = daemon.load("demo")["data"]["model"]["pid"]
    assert nofile_of(pid) == (256, 2048)
