"""The real daemon with real reference backends over real ZeroMQ sockets."""

import json
import os
import signal
import threading
import time

import psutil
import pytest
import zmq

from harness import pid_alive, ping_backend, wait_until

SLOW = ["--startup-delay", "1.0"]
NO_RESTART = {"reference": {"command": ["{python}", "-m", "backend_mgmt.reference_backend"],
                            "restart": {"policy": "no"}}}


def test_load_reports_ready_endpoint_that_answers(daemon_factory):
    daemon = daemon_factory({"demo": ["--startup-delay", "0.1"]})
    reply = daemon.load("demo")
    assert reply["success"], reply
    data = reply["data"]
    assert data["endpoint"].startswith("ipc://")
    assert data["protocols"] == ["ping", "sleep"]
    # The endpoint answers at the moment of the reply.
    pong = ping_backend(daemon.context, data["endpoint"], message="hi", correlation_id=42)
    assert (pong.correlation_id, pong.message) == (42, "hi")
    model = daemon.model("demo")
    assert model["state"] == "ready"
    assert pid_alive(model["pid"])
    for field in ("name", "type", "endpoint", "started_at", "uptime"):
        assert field in model


def test_load_of_ready_model_returns_at_once_with_same_backend(daemon_factory):
    daemon = daemon_factory({"demo": []})
    first = daemon.load("demo")["data"]["model"]["pid"]
    again = daemon.load("demo")
    assert again["success"]
    assert again["data"]["model"]["pid"] == first


def test_concurrent_loads_of_one_model_share_one_backend(daemon_factory):
    daemon = daemon_factory({"demo": SLOW})
    replies = []
    threads = [threading.Thread(target=lambda: replies.append(daemon.load("demo")))
               for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert len(replies) == 5 and all(r["success"] for r in replies), replies
    assert len({r["data"]["model"]["pid"] for r in replies}) == 1
    assert len(daemon.backend_pids()) == 1


def test_ten_models_load_in_parallel_and_status_stays_responsive(daemon_factory):
    names = {f"m{i}": SLOW for i in range(10)}
    daemon = daemon_factory(names)
    replies = {}
    threads = [threading.Thread(target=lambda n=n: replies.__setitem__(n, daemon.load(n)))
               for n in names]
    for thread in threads:
        thread.start()
    # While the loads run, status answers (it is not queued behind them).
    wait_until(lambda: len(daemon.request("status")["data"]["models"]) == 10, 10,
               message="all ten loads to show in status")
    states = {m["state"] for m in daemon.request("status")["data"]["models"]}
    assert "loading" in states
    for thread in threads:
        thread.join(30)
    assert len(replies) == 10 and all(reply["success"] for reply in replies.values()), replies
    assert {m["state"] for m in daemon.request("status")["data"]["models"]} == {"ready"}
    assert len(set(daemon.backend_pids())) == 10


def test_crash_at_start_is_reported_as_failed_with_exit_code_and_output(daemon_factory):
    daemon = daemon_factory({"bad": ["--fail-at-start", "7"]})
    reply = daemon.load("bad")
    assert not reply["success"]
    assert reply["code"] == "load_failed"
    assert "exited with code 7" in reply["error"]
    assert any("failing at start" in line for line in reply["data"]["output"])
    assert reply["data"]["last_exit"]["code"] == 7
    model = daemon.model("bad")
    assert model["state"] == "failed" and model["endpoint"] is None
    assert model["last_exit"]["code"] == 7


def test_startup_timeout_kills_the_backend(daemon_factory):
    backends = {"reference": {"command": ["{python}", "-m", "backend_mgmt.reference_backend"],
                              "startup_timeout": 1, "stop_timeout": 1}}
    daemon = daemon_factory({"hung": ["--no-handshake"]}, backends=backends)
    started = time.monotonic()
    reply = daemon.load("hung")
    assert not reply["success"]
    assert reply["code"] == "startup_timeout"
    assert "within 1 s" in reply["error"]
    assert time.monotonic() - started < 5
    wait_until(lambda: not daemon.backend_pids(), 5, message="the hung backend to be stopped")
    assert daemon.model("hung")["state"] == "failed"


def test_backend_exit_while_ready_is_shown_promptly(daemon_factory):
    daemon = daemon_factory({"shortlived": ["--exit-after", "0.5"]}, backends=NO_RESTART)
    assert daemon.load("shortlived")["success"]
    model = wait_until(lambda: (m := daemon.model("shortlived"))["state"] == "failed" and m,
                       5, message="the exit to show in status")
    assert model["last_exit"]["code"] == 3
    assert model["pid"] is None
    reply = daemon.handshake("shortlived")
    assert "failed" in reply.error_message and not reply.model_ipc_endpoint


def test_failed_model_can_be_loaded_again(daemon_factory):
    daemon = daemon_factory({"shortlived": ["--exit-after", "0.3"]}, backends=NO_RESTART)
    first = daemon.load("shortlived")["data"]["model"]["pid"]
    wait_until(lambda: daemon.model("shortlived")["state"] == "failed", 5)
    again = daemon.load("shortlived")
    assert again["success"] and again["data"]["model"]["pid"] != first


def test_unload_stops_the_backend_and_forgets_the_model(daemon_factory):
    daemon = daemon_factory({"demo": []})
    pid = daemon.load("demo")["data"]["model"]["pid"]
    endpoint_path = daemon.model("demo")["backend_endpoint"][len("ipc://"):]
    reply = daemon.request("unload-model", {"model_name": "demo"})
    assert reply["success"], reply
    assert reply["data"]["last_exit"]["code"] == 0       # it stopped on SIGTERM by itself
    assert not pid_alive(pid)
    assert daemon.model("demo") is None
    assert not os.path.exists(endpoint_path)
    again = daemon.request("unload-model", {"model_name": "demo"})
    assert again["code"] == "not_loaded"


def test_unload_kills_a_backend_that_ignores_sigterm(daemon_factory):
    backends = {"reference": {"command": ["{python}", "-m", "backend_mgmt.reference_backend"],
                              "stop_timeout": 0.5}}
    daemon = daemon_factory({"stubborn": ["--ignore-sigterm"]}, backends=backends)
    pid = daemon.load("stubborn")["data"]["model"]["pid"]
    reply = daemon.request("unload-model", {"model_name": "stubborn"})
    assert reply["success"]
    assert reply["data"]["last_exit"]["signal"] == signal.SIGKILL
    assert not pid_alive(pid)


def test_unload_during_load_cancels_the_load(daemon_factory):
    daemon = daemon_factory({"slow": ["--startup-delay", "5"]})
    result = {}
    loader = threading.Thread(target=lambda: result.update(daemon.load("slow")))
    loader.start()
    wait_until(lambda: (m := daemon.model("slow")) and m["state"] == "loading", 5)
    reply = daemon.request("unload-model", {"model_name": "slow"})
    assert reply["success"]
    loader.join(10)
    assert result["success"] is False and result["code"] == "cancelled"
    assert daemon.model("slow") is None
    assert not daemon.backend_pids()


def test_unknown_and_case_mismatched_model_names(daemon_factory):
    daemon = daemon_factory({"Llama-3": []})
    reply = daemon.request("load-model", {"model_name": "llama-3"})
    assert reply["code"] == "unknown_model"
    assert "did you mean: Llama-3" in reply["error"]
    reply = daemon.request("load-model", {"model_name": "nothing-like-it"})
    assert reply["code"] == "unknown_model" and "did you mean" not in reply["error"]


def test_list_models_shows_every_configured_model(daemon_factory):
    daemon = daemon_factory({"a": [], "b": []}, default_model="b")
    daemon.load("a")
    models = {m["name"]: m for m in daemon.request("list-models")["data"]["models"]}
    assert models["a"]["loaded"] and models["a"]["state"] == "ready"
    assert not models["b"]["loaded"] and models["b"]["state"] == "unloaded"
    assert models["b"]["default"]


# -- the client handshake --------------------------------------------------------------

def test_handshake_for_ready_unloaded_unknown_and_default(daemon_factory):
    daemon = daemon_factory({"demo": [], "other": []}, default_model="demo", on_demand=False)
    assert "not loaded" in daemon.handshake("demo").error_message
    endpoint = daemon.load("demo")["data"]["endpoint"]
    reply = daemon.handshake("demo")
    assert reply.model_ipc_endpoint == endpoint and list(reply.protocols) == ["ping", "sleep"]
    assert not reply.error_message
    assert daemon.handshake("").model_ipc_endpoint == endpoint        # default_model
    assert "unknown model" in daemon.handshake("nope").error_message
    assert "not loaded" in daemon.handshake("other").error_message


def test_handshake_without_default_model_is_an_error(daemon_factory):
    daemon = daemon_factory({"demo": []})
    assert "no default_model" in daemon.handshake("").error_message


def test_handshake_garbage_and_req_sockets(daemon_factory):
    daemon = daemon_factory({"demo": []}, default_model="demo", on_demand=False)
    sock = daemon.socket(zmq.DEALER, daemon.handshake_endpoint)
    sock.send(b"\xff\xff\xff")
    assert sock.poll(5000)
    from backend_mgmt.messages import Request, Response
    assert Response.FromString(sock.recv()).error_message
    sock.close()
    req = daemon.socket(zmq.REQ, daemon.handshake_endpoint)
    req.send(Request(requested_model="demo").SerializeToString())
    assert req.poll(5000)
    assert "not loaded" in Response.FromString(req.recv()).error_message
    req.close()


# -- bad input on the control socket ---------------------------------------------------

@pytest.mark.parametrize("frames, code", [
    ([b"not json"], "bad_json"),
    ([b"\xff\xfe"], "bad_json"),
    ([b"[1, 2]"], "bad_request"),
    ([b'{"params": {}}'], "missing_param"),
    ([b'{"command": 5}'], "bad_request"),
    ([b'{"command": "status", "params": [1]}'], "bad_request"),
    ([b'{"command": "explode"}'], "unknown_command"),
    ([b'{"command": "load-model", "params": {}}'], "missing_param"),
    ([b'{"command": "load-model", "params": {"model_name": 5}}'], "bad_param"),
    ([b"a", b"b"], "bad_frames"),
    ([b"x" * 100_000], "too_large"),
])
def test_bad_requests_get_exactly_one_error_reply(daemon_factory, frames, code):
    daemon = daemon_factory({"demo": []})
    sock = daemon.socket()
    sock.send_multipart(frames)
    assert sock.poll(5000), "no reply"
    reply = json.loads(sock.recv_multipart()[-1])
    assert reply["success"] is False and reply["code"] == code, reply
    assert not sock.poll(300), "a second reply"
    sock.close()
    assert daemon.request("status")["success"]


def test_correlation_id_is_echoed_even_on_errors(daemon_factory):
    daemon = daemon_factory({"demo": []})
    frames = daemon.send_raw([b'{"command": "nope", "correlation_id": "abc"}'])
    assert json.loads(frames[0])["correlation_id"] == "abc"


def test_req_socket_client_gets_a_reply(daemon_factory):
    daemon = daemon_factory({"demo": []})
    frames = daemon.send_raw([b'{"command": "status", "correlation_id": 1}'], kind=zmq.REQ)
    assert json.loads(frames[0])["success"]


def test_oversized_frame_beyond_hard_limit_does_not_hurt_the_daemon(daemon_factory):
    daemon = daemon_factory({"demo": []})
    sock = daemon.context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
    sock.connect(daemon.control_endpoint)
    try:
        wait_for_socket_event(monitor, zmq.EVENT_CONNECTED)
        sock.send(b"x" * (2 * 1024 * 1024))   # past MAXMSGSIZE: libzmq drops the peer
        # The daemon neither reads nor answers it: the connection is dropped, no reply.
        wait_for_socket_event(monitor, zmq.EVENT_DISCONNECTED)
        assert not sock.poll(0)
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)
    assert daemon.request("status")["success"]


def wait_for_socket_event(monitor, wanted, timeout=10.0):
    from zmq.utils.monitor import recv_monitor_message
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0 and monitor.poll(int(left * 1000)), f"no socket event {wanted}"
        if recv_monitor_message(monitor)["event"] == wanted:
            return


# -- start-up and shutdown -------------------------------------------------------------

def test_sigterm_stops_backends_and_removes_sockets(daemon_factory):
    daemon = daemon_factory({"a": [], "b": []})
    pids = [daemon.load(n)["data"]["model"]["pid"] for n in ("a", "b")]
    assert daemon.terminate() == 0
    assert not any(pid_alive(pid) for pid in pids)
    assert os.listdir(daemon.runtime_dir) == []


def test_stop_service_command_shuts_down_cleanly(daemon_factory):
    daemon = daemon_factory({"a": []})
    pid = daemon.load("a")["data"]["model"]["pid"]
    assert daemon.request("stop-service")["success"]
    assert daemon.process.wait(15) == 0
    assert not pid_alive(pid)
    assert os.listdir(daemon.runtime_dir) == []


def test_shutdown_during_a_load_answers_the_load_and_stops_it(daemon_factory):
    daemon = daemon_factory({"slow": ["--startup-delay", "5"]})
    result = {}
    loader = threading.Thread(target=lambda: result.update(daemon.load("slow")))
    loader.start()
    wait_until(lambda: (m := daemon.model("slow")) and m["state"] == "loading", 5)
    pids = daemon.backend_pids()
    assert daemon.terminate() == 0
    loader.join(10)
    assert result["success"] is False and result["code"] == "cancelled"
    assert not any(pid_alive(pid) for pid in pids)


def test_backends_die_with_a_killed_daemon(daemon_factory):
    daemon = daemon_factory({"a": []})
    pid = daemon.load("a")["data"]["model"]["pid"]
    daemon.process.send_signal(signal.SIGKILL)
    daemon.process.wait(5)
    wait_until(lambda: not pid_alive(pid), 5, message="the orphaned backend to die")


def test_second_daemon_is_refused_and_first_keeps_serving(daemon_factory):
    first = daemon_factory({"a": []})
    second = daemon_factory({"a": []}, wait=False)
    assert second.process.wait(10) == 69
    assert "already running" in second.log()
    assert first.request("status")["success"]


def test_second_daemon_on_same_socket_path_is_refused(daemon_factory, workdir):
    first = daemon_factory({"a": []})
    other_runtime = os.path.join(workdir, "run2")
    second = daemon_factory({"a": []}, wait=False, runtime_dir=other_runtime,
                            endpoints={"cli_management": first.control_endpoint})
    assert second.process.wait(10) == 69
    assert "in use by another process" in second.log()
    assert first.request("status")["success"]


def test_stale_socket_files_from_a_crashed_run_are_replaced(daemon_factory, workdir):
    import socket as pysocket
    runtime_dir = os.path.join(workdir, "run")
    os.makedirs(runtime_dir)
    for name in ("control.sock", "handshake.sock"):
        stale = pysocket.socket(pysocket.AF_UNIX)
        stale.bind(os.path.join(runtime_dir, name))
        stale.close()          # leaves the file with nobody listening
    daemon = daemon_factory({"a": []})
    assert daemon.request("status")["success"]


def test_runtime_dir_and_socket_permissions(daemon_factory):
    daemon = daemon_factory({"a": []})
    # as root 0751 (operators list it, anyone passes through to the 0660 sockets), else 0700
    assert os.stat(daemon.runtime_dir).st_mode & 0o777 == (0o751 if os.geteuid() == 0 else 0o700)
    control = os.path.join(daemon.runtime_dir, "control.sock")
    assert os.stat(control).st_mode & 0o777 == 0o660


def test_backend_gets_the_progress_socket_not_systemds(daemon_factory, workdir):
    import socket as pysocket
    notify_path = os.path.join(workdir, "notify")
    listener = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_DGRAM)
    listener.bind(notify_path)
    try:
        backends = {"reference": {"command": [
            "sh", "-c", 'echo "notify=${NOTIFY_SOCKET:-none} ep=$BACKEND_MGMT_ENDPOINT"; '
            'exec "$0" "$@"', "{python}", "-m", "backend_mgmt.reference_backend"]}}
        # "{python}" only expands as a whole argv element, which it is here.
        daemon = daemon_factory({"a": []}, backends=backends,
                                env={"NOTIFY_SOCKET": notify_path})
        assert daemon.load("a")["success"]
        line = wait_until(lambda: [l for l in daemon.log().splitlines() if "] notify=" in l], 5,
                          message="the backend's environment line")[0]
        assert "notify=@backend-mgmt/" in line and "/notify ep=ipc://" in line
        assert notify_path not in line
    finally:
        listener.close()


def test_backend_output_is_logged_with_the_model_name(daemon_factory):
    daemon = daemon_factory({"chatty": []})
    daemon.load("chatty")
    wait_until(lambda: "[chatty] INFO reference-backend: listening on" in daemon.log(), 5)


def test_a_squatted_progress_address_is_a_clean_startup_error(daemon_factory, workdir):
    """Anyone can bind an abstract socket name first; the daemon must not start without its
    progress socket (it would never hear its backends, and the squatter would): exit 69 with
    one line that says so, no traceback."""
    import socket as pysocket
    from backend_mgmt import progress
    squatter = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_DGRAM)
    squatter.bind("\0" + progress.listener_name(os.path.join(workdir, "run")))
    try:
        daemon = daemon_factory({"a": []}, wait=False)
        assert daemon.process.wait(15) == 69
        log_text = daemon.log()
        assert "Traceback" not in log_text, log_text
        lines = [line for line in log_text.splitlines() if line.strip() and "INFO]" not in line]
        assert len(lines) == 1, lines
        assert "progress socket address @backend-mgmt/" in lines[0]
        assert "already bound by another process" in lines[0]
        assert os.listdir(daemon.runtime_dir) == []       # nothing left behind
    finally:
        squatter.close()


def _helper_pid(daemon, name):
    line = wait_until(lambda: next((l for l in daemon.log().splitlines()
                                    if f"[{name}] INFO reference-backend: helper pid" in l), None),
                      10, message="the helper's pid in the log")
    return int(line.rsplit(" ", 1)[1])


def test_what_happens_to_a_child_backends_own_children(daemon_factory):
    """README, 'Backend contract': an unload stops the backend's whole process group; when
    the daemon itself is killed, PR_SET_PDEATHSIG kills the backend, but its own children
    live on (outside systemd: nothing else signals them)."""
    daemon = daemon_factory({"parent": ["--spawn-helper"]})
    assert daemon.load("parent")["success"]
    helper = _helper_pid(daemon, "parent")
    assert pid_alive(helper)
    assert daemon.request("unload-model", {"model_name": "parent"}, timeout=15)["success"]
    wait_until(lambda: not pid_alive(helper), 10, message="the helper to go with its group")

    pid = daemon.load("parent")["data"]["model"]["pid"]
    helper = wait_until(lambda: next((int(l.rsplit(" ", 1)[1])
                                      for l in daemon.log().splitlines()
                                      if "helper pid" in l and int(l.rsplit(" ", 1)[1]) != helper),
                                     None), 10, message="the second helper's pid")
    try:
        daemon.process.send_signal(signal.SIGKILL)
        daemon.process.wait(5)
        wait_until(lambda: not pid_alive(pid), 10, message="the backend to die with the daemon")
        # The backend's main thread shows as a zombie while its other threads (zmq's I/O
        # threads) are still exiting; its children are handed to a new parent only when the
        # last thread is gone. So wait for that hand-over rather than read ppid at once.
        wait_until(lambda: not pid_alive(helper) or psutil.Process(helper).ppid() != pid, 10,
                   message="the helper to be handed to a new parent")
        assert pid_alive(helper), "the README says the backend's own child outlives the daemon"
    finally:
        try:
            os.kill(helper, signal.SIGKILL)
        except ProcessLookupError:
            pass
